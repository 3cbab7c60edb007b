"""Builds the run's objects from a composed Hydra config (the `conf/` tree); train.py and the tests use it."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from megatrain_lightning.checkpointing import directories as ckpt
from megatrain_lightning.config import Config
from megatrain_lightning.data import ByteTextDataModule, ChatDataModule, JsonlDataModule, TokensDataModule
from megatrain_lightning.errors import UserError
from megatrain_lightning.options import EngineOptions, OptionError
from megatrain_lightning.models.lm import CausalLM
from megatrain_lightning.checkpointing.preemption import SaveOnSignal
from megatrain_lightning.strategy import PRECISIONS, MegatrainStrategy


def check(cfg: DictConfig) -> None:
    """Every field train.py takes and every file it names, checked before anything is built (Lightning and the
    data modules would otherwise fail later, with a traceback or, for some, not at all)."""
    tr, optim, data = cfg.trainer, cfg.optim, cfg.data

    def need(ok: bool, field: str, what: str, value) -> None:
        if not ok:
            raise UserError(f"{field}: must be {what}, got {value!r}")

    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for field in ("max_steps", "val_check_interval", "accumulate_grad_batches", "log_every_n_steps"):
        v = tr.get(field, 1)
        need(integer(v) and v >= 1, f"trainer.{field}", "an integer >= 1", v)
    clip = tr.get("gradient_clip_val")
    need(clip is None or (isinstance(clip, (int, float)) and clip >= 0), "trainer.gradient_clip_val",
         ">= 0 (or null: no clipping)", clip)
    need(tr.get("precision") in PRECISIONS, "trainer.precision", " or ".join(PRECISIONS), tr.get("precision"))
    need(isinstance(optim.lr, (int, float)) and optim.lr > 0, "optim.lr", "> 0", optim.lr)
    need(isinstance(optim.weight_decay, (int, float)) and optim.weight_decay >= 0, "optim.weight_decay", ">= 0",
         optim.weight_decay)
    betas = list(optim.betas) if OmegaConf.is_list(optim.betas) else optim.betas
    need(isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas),
         "optim.betas", "two numbers in [0, 1)", betas)
    need(integer(optim.warmup_steps) and optim.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0",
         optim.warmup_steps)
    need(isinstance(optim.min_lr_ratio, (int, float)) and 0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio",
         "in [0, 1]", optim.min_lr_ratio)
    for field in ("seq_len", "micro_batch"):
        need(integer(data[field]) and data[field] >= 1, f"data.{field}", "an integer >= 1", data[field])
    keep = cfg.get("keep_checkpoints", 2)
    need(integer(keep) and (keep >= 1 or keep == -1), "keep_checkpoints", "an integer >= 1 (or -1: all)", keep)
    files = [("data.path", data.get("path"), data.kind != "bytes" or data.get("path") is not None),
             ("data.tokenizer", data.get("tokenizer"), data.kind in ("jsonl", "chat")),
             ("data.chat_template", data.get("chat_template"), data.kind == "chat" and data.get("chat_template")),
             ("resume", cfg.resume, cfg.resume is not None)]
    if cfg.model.name == "hf":
        files.append(("model.path", cfg.model.get("path"), True))
    for field, value, needed in files:
        if needed and (value in (None, "", "???")):
            raise UserError(f"{field}: required (data={data.kind}, model={cfg.model.name})")
        if needed and not Path(value).exists():
            raise UserError(f"{field}: {value} does not exist")
    if cfg.model.name == "hf" and data.kind == "bytes":  # the checkpoint's embedding rows are its tokenizer's ids
        raise UserError("data: model=hf needs text tokenized with the model's tokenizer: data=jsonl or data=chat "
                        "with data.tokenizer=<model dir>/tokenizer.json, or data=tokens (ids of that tokenizer); "
                        "data=bytes would feed raw bytes as its token ids")
    if tr.get("accelerator") in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"trainer.accelerator: {tr.accelerator} asked for, but no CUDA GPU is visible "
                            "(leave trainer=gpu out to train on the CPU)")
    options = engine_options(cfg.storage)
    if options.storage == "nvme":
        dirs = options.nvme_dir  # one directory per drive: the layers stripe over them
        if len({str(Path(d).resolve()) for d in dirs}) < len(dirs):
            raise UserError(f"storage.nvme_dir: {list(dirs)} names a directory twice")
        for d in dirs:
            nvme = Path(d)
            try:
                nvme.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=nvme):
                    pass
            except OSError as e:
                raise UserError(f"storage.nvme_dir: {nvme} is not a writable directory ({e.strerror})") from None


def new_run_dir(run_dir: Path) -> None:
    """Makes the run's directory; one that already holds a run's checkpoints is refused (two runs' checkpoints would
    mix, and the second's saves would rotate away the first's). Checked by the first process only: the other ranks
    of a launch share its directory."""
    first = all(int(os.environ.get(v, "0") or 0) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK"))
    checkpoints = run_dir / ckpt.RUN_CHECKPOINTS
    if first and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise UserError(f"hydra.run.dir: {run_dir} already holds a run's checkpoints; give each run its own "
                        f"directory (resume={run_dir} continues that run into a new one)")
    run_dir.mkdir(parents=True, exist_ok=True)


def model_config(cfg: DictConfig) -> Config:
    if cfg.name == "hf" and OmegaConf.is_missing(cfg, "path"):
        raise UserError("model.path: required: model=hf needs model.path, a Hugging Face checkpoint directory")
    try:
        return Config.from_dict(OmegaConf.to_container(cfg, resolve=True))
    except UserError:
        raise
    except ValueError as e:  # config.py is pure Python (the planner loads it) and raises plain ValueErrors
        raise UserError(f"model: {e}") from None


DATA_KINDS = ("bytes", "tokens", "jsonl", "chat")


def datamodule(cfg: DictConfig, config: Config, seed: int) -> L.LightningDataModule:
    if cfg.kind not in DATA_KINDS:
        raise UserError(f"unknown data kind {cfg.kind!r}; known: {', '.join(DATA_KINDS)}")
    if cfg.seq_len > config.max_seq_len:
        raise UserError(f"data.seq_len {cfg.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    if config.sliding_window and cfg.seq_len > config.sliding_window:
        raise UserError(f"data.seq_len {cfg.seq_len} exceeds the model's sliding window {config.sliding_window} "
                        "(attention here is full causal, which equals the window's only up to its length)")
    common = dict(seq_len=cfg.seq_len, micro_batch=cfg.micro_batch, seed=seed)
    if cfg.kind == "bytes":
        if config.vocab_size < 256:
            raise UserError(f"byte-level data needs vocab_size >= 256, the model has {config.vocab_size}")
        return ByteTextDataModule(cfg.path, **common)
    for key in ("path",) + (("tokenizer",) if cfg.kind in ("jsonl", "chat") else ()):
        if OmegaConf.is_missing(cfg, key) or not cfg.get(key):
            raise UserError(f"data={cfg.kind} needs data.{key}")
    common.update(val_fraction=cfg.val_fraction, vocab_size=config.vocab_size)
    if cfg.kind == "tokens":
        return TokensDataModule(cfg.path, dtype=cfg.get("dtype"), **common)
    if cfg.kind == "chat":
        return ChatDataModule(cfg.path, cfg.tokenizer, chat_template=cfg.get("chat_template"), **common)
    return JsonlDataModule(cfg.path, cfg.tokenizer, text_field=cfg.text_field, prompt_field=cfg.prompt_field,
                           response_field=cfg.response_field, eos_token=cfg.eos_token, **common)


def strategy(cfg: DictConfig, trace_dir: str | None = None, init_from: str | None = None) -> MegatrainStrategy:
    """The strategy of conf/storage (`cfg`): its fields are the engine's options (options.EngineOptions)."""
    return MegatrainStrategy(engine_options(cfg), init_from=init_from, trace_dir=trace_dir)


def engine_options(cfg: DictConfig) -> EngineOptions:
    try:
        return EngineOptions.from_conf(OmegaConf.to_container(cfg, resolve=True))
    except OptionError as e:
        raise UserError(f"{e.conf_field}: {e.detail}") from None


class _Bar(TQDMProgressBar):
    """tqdm's bar counting micro-batches: its total is the epoch's, or the micro-batches max_steps leaves when fewer
    (Lightning's counts optimizer steps there: 12 micro-batches of 6 steps showed as 12/?, or 25/4 elsewhere;
    Rich's bar heads it "Epoch 0/-2")."""

    @property
    def total_train_batches(self) -> int | float:
        t = self.trainer
        total = t.num_training_batches
        if t.max_steps > 0:
            total = min(total, (t.max_steps - t.global_step) * t.accumulate_grad_batches)
        return total


def trainer(cfg: DictConfig, out_dir: str | Path) -> L.Trainer:
    out_dir = Path(out_dir)
    # each save writes the whole training state once; the newest `keep_checkpoints` stay (an older intact one is
    # what a resume falls back to when the newest is damaged); last.ckpt links to the newest
    checkpoints = ModelCheckpoint(dirpath=out_dir / ckpt.RUN_CHECKPOINTS, save_last="link", monitor="step", mode="max",
                                  save_top_k=cfg.get("keep_checkpoints", 2),
                                  every_n_train_steps=cfg.trainer.val_check_interval)
    init_from = cfg.model.get("path") if cfg.model.name == "hf" else None
    callbacks = [checkpoints, FirstStep()] + ([SaveOnSignal()] if cfg.get("save_on_signal", True) else [])
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(_Bar(refresh_rate=cfg.trainer.get("log_every_n_steps", 1)))
    return L.Trainer(strategy=strategy(cfg.storage, init_from=init_from), callbacks=callbacks,
                     logger=CSVLogger(out_dir, name="logs"), default_root_dir=out_dir, **cfg.trainer)


class _NoTips(logging.Filter):
    """Lightning's advertising lines (they start with a light bulb)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡")


def logging_to(run_dir: Path) -> None:
    """One line per message on the console and in `run_dir`/train.log (Lightning's loggers propagate to these
    instead of printing through handlers of their own)."""
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(), logging.FileHandler(run_dir / "train.log")]
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_NoTips())
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True


class FirstStep(L.Callback):
    """The step this run started from (a resumed run's checkpoint's), for the summary's counts."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step


def summary(trainer: L.Trainer, run_dir: Path, seconds: float, answer=None) -> str:
    """The end-of-run lines: where things are, the last losses, this run's speed against the planner's."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    first = next((c.step for c in trainer.callbacks if isinstance(c, FirstStep)), 0)
    if first is None:  # training never started: a resumed run already at max_steps
        return (f"nothing to train: the checkpoint is at step {trainer.global_step}, trainer.max_steps is "
                f"{trainer.max_steps}; to go on, raise it (e.g. trainer.max_steps={2 * trainer.global_step}) and "
                f"resume again; run directory {run_dir}")
    steps = trainer.global_step - first
    resumed = f" (steps {first + 1}-{trainer.global_step}, resumed at {first})" if first else ""
    lines = [f"done: {steps} steps{resumed} in {seconds:.3g} s; run directory {run_dir}"]
    callback = trainer.checkpoint_callback
    last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    if last:
        lines.append(f"last checkpoint: {last}")
    losses = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("train_loss", "val_loss", "val_ppl") if k in metrics)
    if losses:
        lines.append(losses)
    if steps:
        measured = seconds / steps
        line = f"{measured:.3g} s/step end to end (setup, validation and saves included)"
        if answer is not None:
            line += f"; the planner predicted {answer.step_time_s:.3g} s/step of training alone"
        lines.append(line)
    return "\n".join(lines)


def lightning_module(cfg: DictConfig, config: Config) -> CausalLM:
    hp = OmegaConf.to_container(cfg.optim, resolve=True)  # plain values: hyperparameters go into checkpoints
    hp["lora"] = OmegaConf.to_container(cfg.lora, resolve=True) if cfg.get("lora") is not None else None
    if config.transformers_type:  # a family Llama does not have: the transformers model itself
        from megatrain_lightning.hf.model import HFCausalLM, config_json

        # model=hf: the checkpoint's config.json (and its weights, imported by the strategy); a preset: its shape,
        # from a random start
        hf_config = (json.loads((Path(cfg.model.path) / "config.json").read_text()) if cfg.model.name == "hf"
                     else config_json(config))
        return HFCausalLM(config, hf_config, max_steps=cfg.trainer.max_steps, **hp)
    if config.n_experts:
        raise UserError(f"model={config.name}: a mixture of experts with no transformers_type (mixtral, qwen3_moe, "
                        "gpt_oss, glm4_moe or deepseek_v3): train.py's Llama has no experts")
    return CausalLM(config, max_steps=cfg.trainer.max_steps, **hp)
