"""One training run on packed token data, the way the resume tests need it: in this process, or as a separate
process (`python -m tests.resume_run ARGS_JSON`) that a test starts, kills or resumes.

It saves the store's final state (master weights, Adam moments) and the per-micro-batch losses to `out_dir`; with
`devices` > 1 (Lightning starts the other ranks as processes running this module again), each rank its own units'
state and its losses, under names with its rank.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file

from megatrain_lightning import MegatrainStrategy, SaveOnSignal
from megatrain_lightning.config import Config
from megatrain_lightning.data import TokensDataModule
from tests.helpers import RecordingLM, lm_kwargs

TOTAL_STEPS = 6
SEQ_LEN, MICRO_BATCH, ACCUMULATE = 16, 2, 2


def token_file(path: Path, n_windows: int = 18, vocab: int = 256) -> Path:
    """A .npy token stream: n_windows training windows (and a little validation)."""
    g = np.random.default_rng(3)
    np.save(path, g.integers(0, vocab, size=n_windows * SEQ_LEN + SEQ_LEN * 2, dtype=np.uint16))
    return path


def run(data: str, out_dir: str, max_steps: int, storage: str = "ram", ckpt_dir: str | None = None,
        save_every: int | None = None, resume: str | None = None, precision: str = "32-true",
        ram_budget_GiB: float | None = None, nvme_dir: str | None = None, drives: int = 1,
        device_state_GiB: float | None = None, signal_at_batch: int | None = None, devices: int = 1,
        micro_batch: int = MICRO_BATCH, fail_at_batch: int | None = None, last_rank_kwargs: dict | None = None,
        clip: float = 1.0, accelerator: str = "cpu", step_cache_GiB: float | None = None, num_nodes: int = 1,
        replicate_nodes: bool = False, model: dict | None = None, freeze_bf16: str | None = None,
        keep_activations: int | None = None) -> None:
    """`signal_at_batch`: the process sends itself SIGTERM during that micro-batch (SaveOnSignal handles it).
    `drives`: storage=nvme stripes over this many directories under `out_dir` (stand-ins for drives). `devices`: CPU
    ranks (gloo), each with `micro_batch` sequences; `fail_at_batch`: the last rank raises during that micro-batch; `last_rank_kwargs`: strategy
    arguments of the last rank only; `clip` 0: no clipping (updates then start as gradients land); `accelerator` "gpu":
    one GPU a rank (NCCL); `step_cache_GiB`: the strategy's (None: auto, which on the CPU caches nothing);
    `num_nodes` > 1: this process is node NODE_RANK's (the test starts one per node, MASTER_PORT shared), and
    `replicate_nodes` the strategy's. `model`: overrides of the tiny preset's fields. `freeze_bf16`: parameters whose
    name matches this pattern are frozen and held in bf16 (a base under LoRA; run with precision="bf16-mixed").
    `keep_activations`: the strategy's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = Config.from_name("tiny", **(model or {}))
    torch.manual_seed(0)
    lm = RecordingLM(config, **lm_kwargs(TOTAL_STEPS))  # built on meta, initialized by the strategy from the seed
    if freeze_bf16 is not None:
        lm.configure_model = _frozen_in_bf16(lm, freeze_bf16)
    dm = TokensDataModule(data, seq_len=SEQ_LEN, micro_batch=micro_batch, val_fraction=0.1, seed=11,
                          vocab_size=config.vocab_size)
    callbacks = []
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=save_every, save_top_k=-1))
    if signal_at_batch is not None:  # several ranks: the last one alone gets it
        callbacks += [SaveOnSignal(ckpt_dir), _SignalAt(signal_at_batch, devices - 1)]
    if fail_at_batch is not None:
        callbacks.append(_FailAt(fail_at_batch, devices - 1))
    last = int(os.environ.get("LOCAL_RANK", 0)) == devices - 1 > 0  # Lightning sets it for the ranks it starts
    strategy = MegatrainStrategy(**{**dict(storage=storage, ram_budget_GiB=ram_budget_GiB,
                                           nvme_dir=nvme_dir or [str(out / f"nvme{k}") for k in range(drives)],
                                           device_state_GiB=device_state_GiB, step_cache_GiB=step_cache_GiB,
                                           replicate_nodes=replicate_nodes, keep_activations=keep_activations),
                                    **((last_rank_kwargs or {}) if last else {})})
    trainer = L.Trainer(strategy=strategy, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                        precision=precision, max_steps=max_steps,
                        accumulate_grad_batches=ACCUMULATE, gradient_clip_val=clip or None, logger=False,
                        enable_checkpointing=bool(save_every), callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, deterministic=True)
    trainer.fit(lm, datamodule=dm, ckpt_path=resume)
    state = {}
    for which in ("master", "exp_avg", "exp_avg_sq"):
        state.update({f"{which}/{k}": v.contiguous() for k, v in strategy.store.named(which).items()})
    tag = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
    save_file(state, out / f"state{tag}.safetensors")
    (out / f"losses{tag}.json").write_text(json.dumps({"losses": lm.losses, "global_step": trainer.global_step,
                                                       "store_bytes": strategy.store.nbytes,
                                                       "window_bytes": strategy.store.nvme.nbytes
                                                       if strategy.store.nvme else 0,
                                                       "on_disk": [i for i, u in enumerate(strategy.store.units)
                                                                   if u.on_disk],
                                                       "kept": sorted(strategy.engine.device_states.units)
                                                       if strategy.engine.device_states else [],
                                                       "cached": sorted(strategy.engine.step_cache.units)
                                                       if strategy.engine.step_cache else [],
                                                       "kept_blocks": strategy.engine.kept.blocks}))


def _frozen_in_bf16(lm: RecordingLM, pattern: str):
    """`lm.configure_model`, then the parameters matching `pattern` frozen and held in bf16 (still on meta)."""
    build = lm.configure_model

    def configure_model() -> None:
        build()
        for p in (p for name, p in lm.named_parameters() if re.search(pattern, name)):
            p.requires_grad_(False)
            p.data = p.data.to(torch.bfloat16)
    return configure_model


class _SignalAt(L.Callback):
    def __init__(self, batch: int, rank: int = 0) -> None:
        self.batch, self.rank = batch, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


class _FailAt(L.Callback):
    def __init__(self, batch: int, rank: int) -> None:
        self.batch, self.rank = batch, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch and trainer.global_rank == self.rank:
            raise RuntimeError(f"rank {self.rank} failed on purpose at batch {batch_idx}")


if __name__ == "__main__":
    run(**json.loads(sys.argv[1]))
