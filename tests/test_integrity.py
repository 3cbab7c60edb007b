"""No silent wrong results: damaged checkpoint data is named (and a directory resumes from its newest intact
checkpoint), a diverging run stops at the step it diverges and never saves non-finite weights, a damaged NVMe
state file stops the run, the gradient norm is logged, and devices > 1 is refused."""

from __future__ import annotations

import copy
import csv
import json
import logging
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from megatrain_lightning import MegatrainStrategy
from megatrain_lightning.checkpointing import directories as ckpt
from tests import resume_run
from tests.helpers import RecordingLM, lm_kwargs, loader, make_batches, make_model, reference_run, rel_err
from tests.test_checkpoint import NVME


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(resume_run.token_file(tmp_path_factory.mktemp("data") / "tokens.npy"))


@pytest.fixture(scope="module")
def two_saves(data, tmp_path_factory) -> Path:
    """A checkpoint directory with the checkpoints of steps 2 and 4."""
    d = tmp_path_factory.mktemp("saves")
    resume_run.run(data, str(d / "run"), 4, ckpt_dir=str(d / "ckpt"), save_every=2)
    return d / "ckpt"


def _flip(file: Path, at_end: int = 1000) -> None:
    """Flips the bits of one byte inside the tensor data (the header stays valid)."""
    raw = bytearray(file.read_bytes())
    raw[len(raw) - at_end] ^= 0xFF
    file.write_bytes(bytes(raw))


def test_flipped_bits_in_tensor_data_are_named(two_saves, data, tmp_path):
    bad = shutil.copytree(two_saves / "epoch=0-step=4.ckpt", tmp_path / "bad.ckpt")
    _flip(bad / ckpt.unit_file(2))
    with pytest.raises(ckpt.CheckpointError, match=rf"damaged checkpoint file .*{ckpt.unit_file(2)}: the data of "
                                                   r"\S+ does not match its hash"):
        resume_run.run(data, str(tmp_path / "out"), 5, resume=str(bad))


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(two_saves, data, tmp_path, caplog):
    ckpts = shutil.copytree(two_saves, tmp_path / "ckpt")
    _flip(ckpts / "epoch=0-step=4.ckpt" / ckpt.unit_file(0))
    with caplog.at_level(logging.WARNING):
        resume_run.run(data, str(tmp_path / "out"), 4, resume=str(ckpts))
    assert any("does not match its hash" in r.message and "epoch=0-step=2.ckpt" in r.message for r in caplog.records)
    # resumed at step 2, trained steps 3 and 4: the same state as the straight run's step-4 checkpoint
    resumed = json.loads((tmp_path / "out" / "losses.json").read_text())
    assert resumed["global_step"] == 4 and len(resumed["losses"]) == 2 * resume_run.ACCUMULATE
    from safetensors.torch import load_file
    state = load_file(tmp_path / "out" / "state.safetensors")
    good = load_file(two_saves / "epoch=0-step=4.ckpt" / ckpt.unit_file(0))
    for name, value in good.items():
        key = name if "/" in name else f"master/{name}"
        assert torch.equal(state[key], value), name


def _fit(model, steps, lr=1e-2, clip=None, callbacks=(), logger=False, **strategy_kwargs):
    lm = RecordingLM(model.config, model=copy.deepcopy(model), **lm_kwargs(steps, lr))
    trainer = L.Trainer(strategy=MegatrainStrategy(**strategy_kwargs), accelerator="cpu", max_steps=steps,
                        gradient_clip_val=clip, logger=logger, callbacks=list(callbacks), log_every_n_steps=1,
                        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lm, train_dataloaders=loader(make_batches(model.config, steps)))
    return trainer, lm


@pytest.mark.parametrize("clip", [None, 1.0])  # eager updates behind backward; deferred behind the next forward
def test_divergence_stops_the_run_and_keeps_the_good_checkpoints(clip, tmp_path):
    saves = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, save_last=True)
    with pytest.raises((FloatingPointError, ckpt.CheckpointError),
                       match=r"training diverged at step \d+: the (loss|gradient norm) is (nan|inf)|weight .* NaN or inf"):
        _fit(make_model("tiny"), 30, lr=1e6, clip=clip, callbacks=[saves])
    saved = ckpt.candidates(tmp_path)
    assert saved  # a few steps ran before the divergence showed
    for path in [*saved, tmp_path / "last.ckpt"]:
        for unit in path.glob("unit_*.safetensors"):
            from safetensors.torch import load_file
            assert all(torch.isfinite(t).all() for t in load_file(unit).values()), unit


def test_a_non_finite_master_is_never_saved(tmp_path):
    trainer, _ = _fit(make_model("tiny"), 2)
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    trainer.strategy.store.units[1].master[7] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match=r"not saved: the weight model\.model\.layers\.1\.\S+ holds NaN"):
        trainer.save_checkpoint(tmp_path / "good.ckpt")
    assert ckpt.candidates(tmp_path) == [tmp_path / "good.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.ckpt"]  # the temporary was removed


class _Overwrite(L.Callback):
    """Overwrites the state file of a file-backed layer with NaN after the first step, as a failing disk or another
    process would."""

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 1:
            tier = trainer.strategy.store.nvme
            tier.flush()
            path = tier.path(min(tier.shapes))
            path.write_bytes(torch.full((path.stat().st_size // 4,), float("nan")).numpy().tobytes())


def test_a_damaged_nvme_state_file_stops_the_run(tmp_path):
    with pytest.raises(FloatingPointError, match=r"diverged at step [12]: the (loss|gradient norm) is nan"):
        _fit(make_model("tiny"), 6, clip=1.0, callbacks=[_Overwrite()], nvme_dir=tmp_path, **NVME)


def test_the_gradient_norm_is_logged(tmp_path):
    model = make_model("tiny")
    batches = make_batches(model.config, 1)
    _, first_grads, _ = reference_run(model, batches, 1, 1, clip=1.0)
    want = torch.stack([g.norm() for g in first_grads.values()]).norm()
    _fit(model, 1, clip=1.0, logger=CSVLogger(tmp_path, name="logs"))
    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    got = [float(r["grad_norm"]) for r in rows if r.get("grad_norm")]
    assert len(got) == 1 and rel_err(torch.tensor(got[0]), want) < 1e-5


@pytest.mark.parametrize("preset,strategy_kwargs", [("tiny", {}), ("tiny-qwen2", {}), ("tiny", "nvme")])
def test_state_dict_and_load_from_checkpoint_give_the_trained_weights(preset, strategy_kwargs, tmp_path):
    """After fit, `lm.state_dict()` holds the store's fp32 masters (not meta tensors), also of file-backed layers,
    and `CausalLM.load_from_checkpoint(directory)` builds a CPU model with them (tied weights included)."""
    from megatrain_lightning.models.lm import CausalLM

    if strategy_kwargs == "nvme":
        strategy_kwargs = dict(nvme_dir=tmp_path / "nvme", **NVME)
    model = make_model(preset)
    trainer, lm = _fit(model, 2, **strategy_kwargs)
    masters = trainer.strategy.store.named("master")
    state = lm.state_dict()
    params = {k: v for k, v in state.items() if k.startswith("model.")}
    assert params.keys() == {"model." + k for k in model.state_dict()}
    for k, v in params.items():
        assert v.device.type == "cpu" and not v.is_meta and v.dtype == torch.float32, k
        want = masters.get(k, masters.get("model.model.embed_tokens.weight"))  # tied head: the embedding's master
        assert torch.equal(v, want), k
    assert not torch.equal(params["model.model.layers.0.mlp.up_proj.weight"],
                           model.state_dict()["model.layers.0.mlp.up_proj.weight"])  # trained, not the initial

    trainer.save_checkpoint(tmp_path / "ckpt" / "step2.ckpt")
    loaded = CausalLM.load_from_checkpoint(tmp_path / "ckpt")
    assert loaded.hparams.lr == lm.hparams.lr
    for k, v in loaded.state_dict().items():
        if k in params:
            assert torch.equal(v, params[k]), k
    batch = make_batches(model.config, 1)[0]
    with torch.no_grad():
        reference = copy.deepcopy(model)
        reference.load_state_dict({k.removeprefix("model."): v for k, v in params.items()})
        assert torch.allclose(loaded.model(batch), reference(batch))
