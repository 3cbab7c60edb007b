"""The strategy inside Lightning: registry, loggers, progress bar, checkpoints, and clear errors."""

import copy
import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file
from torch import nn

import megatrain_lightning
from megatrain_lightning import MegatrainStrategy
from megatrain_lightning.config import Config
from megatrain_lightning.models.lm import CausalLM
from tests.helpers import RecordingLM, lm_kwargs, loader, make_batches, make_model


def _trainer(**kwargs):
    base = dict(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0)
    return L.Trainer(**{**base, **kwargs})


def test_strategy_resolves_by_name():
    import importlib

    importlib.reload(megatrain_lightning)  # registering twice is harmless
    trainer = L.Trainer(strategy="megatrain", accelerator="cpu", logger=False)
    assert isinstance(trainer.strategy, MegatrainStrategy)
    assert trainer.strategy.root_device == torch.device("cpu")



@pytest.mark.parametrize("first", ["megatrain_lightning", "lightning"])
def test_the_name_resolves_whichever_package_is_imported_first(first):
    """Importing the package loads neither torch nor lightning (the planner imports its torch-free modules); the
    name is registered when Lightning's strategies load, before or after."""
    import subprocess
    import sys

    code = (f"import sys; import {first}; "
            "assert {'torch', 'lightning'}.isdisjoint(sys.modules) or " + repr(first) + " == 'lightning', 'torch loaded'; "
            "import lightning as L, megatrain_lightning as M; "
            "s = L.Trainer(strategy='megatrain', accelerator='cpu', logger=False).strategy; "
            "assert isinstance(s, M.MegatrainStrategy), type(s); "
            "import lightning.pytorch.strategies as m; assert type(m.__loader__).__name__ == 'SourceFileLoader'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

def test_logger_progress_bar_checkpoint_and_resume(tmp_path):
    model = make_model("tiny")
    batches = make_batches(model.config, 8)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    trainer = L.Trainer(strategy="megatrain", accelerator="cpu", max_steps=4, limit_val_batches=0,
                        logger=CSVLogger(tmp_path, name="logs"), callbacks=[ckpt, TQDMProgressBar()],
                        log_every_n_steps=1, enable_model_summary=False)
    lm = CausalLM(model.config, model=copy.deepcopy(model), **lm_kwargs(8))
    trainer.fit(lm, train_dataloaders=loader(batches[:4]))
    assert trainer.progress_bar_callback is not None and trainer.progress_bar_callback.train_progress_bar.n == 4

    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    # the checkpoint directory holds the store's trained fp32 weights and Adam moments, not the meta module
    saved = {}
    for f in sorted((tmp_path / "ckpt" / "last.ckpt").glob("unit_*.safetensors")):
        saved.update(load_file(f))
    store = trainer.strategy.store
    for name, w in store.named("master").items():
        assert torch.equal(saved[name], w), name
    assert all(saved[k].abs().sum() > 0 for k in saved if k.startswith("exp_avg/") and k.endswith("proj.weight"))

    # resuming into a fresh model restores weights, moments and the step, then trains on
    lm2 = RecordingLM(model.config, model=make_model("tiny", seed=5), **lm_kwargs(8))
    t2 = L.Trainer(strategy="megatrain", accelerator="cpu", max_steps=6, limit_val_batches=0, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    t2.fit(lm2, train_dataloaders=loader(batches[4:]), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert t2.global_step == 6 and len(lm2.losses) == 2
    opt = t2.strategy.optimizers[0]
    assert all(opt.state[p]["step"].item() == 6 for g in opt.param_groups for p in g["params"])


def test_error_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'llama-7'.*known presets"):
        Config.from_name("llama-7")


@pytest.mark.parametrize("k", [0, -1])
def test_error_checkpoint_interval(k):
    with pytest.raises(ValueError, match="checkpoint_interval must be an integer >= 1"):
        MegatrainStrategy(checkpoint_interval=k)


class PlainMLP(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))

    def training_step(self, batch, batch_idx):
        return self.net(batch.float()).sum()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters())


def test_error_module_without_streamable_blocks():
    with pytest.raises(ValueError, match="PlainMLP has no streamable blocks.*Trunk"):
        _trainer(strategy="megatrain").fit(PlainMLP(), train_dataloaders=loader([torch.ones(2, 4)] * 2))


class SGDLM(CausalLM):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_error_unsupported_optimizer():
    model = make_model("tiny")
    with pytest.raises(TypeError, match="supports AdamW, Adam.*got SGD"):
        _trainer(strategy="megatrain").fit(SGDLM(model.config, model=model),
                                           train_dataloaders=loader(make_batches(model.config, 2)))


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_error_unsupported_precision(precision):
    model = make_model("tiny")
    with pytest.raises(ValueError, match="supports precision 'bf16-mixed' or '32-true'"):
        _trainer(strategy="megatrain", precision=precision).fit(
            CausalLM(model.config, model=model), train_dataloaders=loader(make_batches(model.config, 2)))


def test_meta_init_builds_layer_by_layer():
    """Without a prebuilt model, configure_model runs on meta and the strategy initializes into the store."""
    config = Config.from_name("tiny")
    lm = CausalLM(config, **lm_kwargs(1))
    trainer = _trainer(strategy="megatrain", max_steps=1)
    trainer.fit(lm, train_dataloaders=loader(make_batches(config, 1)))
    masters = trainer.strategy.store.named("master")
    assert sum(w.numel() for w in masters.values()) == config.n_params
    q = masters["model.model.layers.2.self_attn.q_proj.weight"]
    assert 0.015 < q.std().item() < 0.025  # Block.reset_parameters: normal(0, 0.02), then one small step
    assert torch.equal(masters["model.model.norm.weight"].round(decimals=1), torch.ones(config.hidden_size))
