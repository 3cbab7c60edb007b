"""Builds the run's objects from a composed Hydra config (the `conf/` tree); train.py and the tests use it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from megatrain_lightning.config import Config
from megatrain_lightning.data import ByteTextDataModule, JsonlDataModule, TokensDataModule
from megatrain_lightning.lm import CausalLM
from megatrain_lightning.preemption import SaveOnSignal
from megatrain_lightning.strategy import MegatrainStrategy


def model_config(cfg: DictConfig) -> Config:
    if cfg.name == "hf" and OmegaConf.is_missing(cfg, "path"):
        raise ValueError("model=hf needs model.path: a Hugging Face checkpoint directory")
    return Config.from_dict(OmegaConf.to_container(cfg, resolve=True))


DATA_KINDS = ("bytes", "tokens", "jsonl")


def datamodule(cfg: DictConfig, config: Config, seed: int) -> L.LightningDataModule:
    if cfg.kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {cfg.kind!r}; known: {', '.join(DATA_KINDS)}")
    if cfg.seq_len > config.max_seq_len:
        raise ValueError(f"data.seq_len {cfg.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    common = dict(seq_len=cfg.seq_len, micro_batch=cfg.micro_batch, seed=seed)
    if cfg.kind == "bytes":
        if config.vocab_size < 256:
            raise ValueError(f"byte-level data needs vocab_size >= 256, the model has {config.vocab_size}")
        return ByteTextDataModule(cfg.path, **common)
    for key in ("path",) + (("tokenizer",) if cfg.kind == "jsonl" else ()):
        if OmegaConf.is_missing(cfg, key) or not cfg.get(key):
            raise ValueError(f"data={cfg.kind} needs data.{key}")
    common.update(val_fraction=cfg.val_fraction, vocab_size=config.vocab_size)
    if cfg.kind == "tokens":
        return TokensDataModule(cfg.path, dtype=cfg.get("dtype"), **common)
    return JsonlDataModule(cfg.path, cfg.tokenizer, text_field=cfg.text_field, prompt_field=cfg.prompt_field,
                           response_field=cfg.response_field, eos_token=cfg.eos_token, **common)


def strategy(cfg: DictConfig, trace_dir: str | None = None, init_from: str | None = None) -> MegatrainStrategy:
    return MegatrainStrategy(init_from=init_from, checkpoint_interval=cfg.checkpoint_interval, prefetch_depth=cfg.prefetch_depth,
                             storage=cfg.kind, stream=cfg.get("stream", "auto"),
                             ram_budget_GiB=cfg.get("ram_budget_GiB"), nvme_dir=cfg.get("nvme_dir", "nvme_state"),
                             compile=cfg.get("compile"), offload_checkpoints=cfg.get("offload_checkpoints"),
                             device_state_GiB=cfg.get("device_state_GiB"), trace_dir=trace_dir)


def trainer(cfg: DictConfig, out_dir: str | Path) -> L.Trainer:
    out_dir = Path(out_dir)
    # each save writes the whole training state once; the newest `keep_checkpoints` stay (an older intact one is
    # what a resume falls back to when the newest is damaged); last.ckpt links to the newest
    checkpoints = ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last="link", monitor="step", mode="max",
                                  save_top_k=cfg.get("keep_checkpoints", 2),
                                  every_n_train_steps=cfg.trainer.val_check_interval)
    init_from = cfg.model.get("path") if cfg.model.name == "hf" else None
    return L.Trainer(strategy=strategy(cfg.storage, init_from=init_from), callbacks=[checkpoints, SaveOnSignal()],
                     logger=CSVLogger(out_dir, name="logs"), default_root_dir=out_dir, **cfg.trainer)


def lightning_module(cfg: DictConfig, config: Config) -> CausalLM:
    # plain values: hyperparameters go into checkpoints, which load with weights_only=True
    return CausalLM(config, max_steps=cfg.trainer.max_steps, **OmegaConf.to_container(cfg.optim, resolve=True))
