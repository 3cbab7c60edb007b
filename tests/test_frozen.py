"""Frozen parameters (requires_grad=False, still handed to the optimizer as `AdamW(self.parameters())` does) are
never updated, get no weight decay and keep neither Adam moments nor a gradient buffer, as under plain PyTorch."""

import copy

import lightning as L
import pytest
import torch

from megatrain_lightning import MegatrainStrategy
from megatrain_lightning.checkpointing import directories as ckpt
from megatrain_lightning.config import Config
from tests.helpers import (RecordingLM, kept_budget_GiB, lm_kwargs, loader, make_batches, make_model, megatrain_run,
                           nvme_budget_GiB, reference_run, rel_err)

STEPS, TOL = 4, 1e-5
# the embedding, a whole layer, one matrix of another layer and the final norm (the head stays trainable)
FROZEN = ("model.embed_tokens.weight", "model.layers.1.", "model.layers.0.self_attn.q_proj.weight",
          "model.norm.weight")


def _frozen_model():
    model = make_model("tiny")
    for name, p in model.named_parameters():
        if name.startswith(FROZEN):
            p.requires_grad_(False)
    assert sum(not p.requires_grad for p in model.parameters()) == 3 + 9  # what FROZEN names
    return model


@pytest.mark.parametrize("clip,strategy_kwargs", [
    (None, {}),  # eager host updates behind backward
    (1.0, {}),  # deferred behind the next forward, norm clipping over the trainable gradients only
    (1.0, dict(device_state_GiB=kept_budget_GiB(Config.from_name("tiny"), 2))),  # kept on the "device"
    (1.0, "nvme"),  # file-backed layers
])
def test_frozen_parameters_match_plain_pytorch(clip, strategy_kwargs, tmp_path):
    model = _frozen_model()
    batches = make_batches(model.config, STEPS * 2)
    ref_losses, _, ref_weights = reference_run(model, batches, STEPS, 2, clip)
    if strategy_kwargs == "nvme":
        strategy_kwargs = dict(storage="nvme", ram_budget_GiB=nvme_budget_GiB(model, 3), nvme_dir=tmp_path)
    losses, _, weights, strategy = megatrain_run(model, batches, STEPS, 2, clip, record_grads=False,
                                                 **strategy_kwargs)
    for got, want in zip(losses, ref_losses, strict=True):
        assert abs(got - want) <= TOL * abs(want)
    initial = {"model." + n: p for n, p in model.named_parameters()}
    for name, want in ref_weights.items():
        assert rel_err(weights[name], want) < TOL, name
        frozen = not initial[name].requires_grad
        assert torch.equal(weights[name], initial[name]) == frozen, name  # frozen: bit-identical, others moved
    # no moments and no gradient buffer for frozen parameters
    store = strategy.store
    trainable = {n for n, p in initial.items() if p.requires_grad}
    assert store.named("exp_avg").keys() == store.named("grad").keys() == trainable


def test_frozen_parameters_cost_less_host_memory():
    """4 bytes per frozen parameter (its master) instead of 16 (master, m, v, gradient)."""
    full, frozen = make_model("tiny"), _frozen_model()
    n_frozen = sum(p.numel() for p in frozen.parameters() if not p.requires_grad)
    sizes = []
    for model in (full, frozen):
        _, _, _, strategy = megatrain_run(model, make_batches(model.config, 1), 1, 1, None, record_grads=False)
        sizes.append(sum(u.tile.nbytes for u in strategy.store.units))
    assert sizes[0] - sizes[1] == 12 * n_frozen


def test_resume_with_other_parameters_frozen_is_an_error(tmp_path):
    model = _frozen_model()
    batches = make_batches(model.config, 2)

    def fit(m, **kwargs):
        lm = RecordingLM(m.config, model=copy.deepcopy(m), **lm_kwargs(2))
        trainer = L.Trainer(strategy=MegatrainStrategy(), accelerator="cpu", max_steps=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(lm, train_dataloaders=loader(batches), **kwargs)
        return trainer

    fit(model).save_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ckpt.CheckpointError, match=r"other parameters frozen.*\n.*model.model.embed_tokens.weight: trainable now"):
        fit(make_model("tiny"), ckpt_path=tmp_path / "ckpt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("strategy_kwargs", [dict(device_state_GiB=0.0),  # every update on the host, D2H gradients
                                             dict(device_state_GiB=kept_budget_GiB(Config.from_name("tiny"), 2)),
                                             dict(stream="copy")])  # a page-locked bf16 copy; default kept units
def test_cuda_frozen_parameters_stay_and_the_rest_track_fp32(strategy_kwargs):
    """On the GPU (bf16-mixed, staging ring with accumulation 2, kept units whose tile has a frozen part): frozen
    weights bit-identical, the others within bf16 tolerances of plain fp32 PyTorch."""
    model = _frozen_model()
    batches = make_batches(model.config, STEPS * 2)
    _, _, ref_weights = reference_run(model, batches, STEPS, 2, 1.0, lr=1e-3)
    _, _, weights, _ = megatrain_run(model, batches, STEPS, 2, 1.0, precision="bf16-mixed", lr=1e-3, device="cuda",
                                     record_grads=False, **strategy_kwargs)
    initial = {"model." + n: p for n, p in model.named_parameters()}
    for name, want in ref_weights.items():
        if initial[name].requires_grad:
            assert rel_err(weights[name], want) < 1e-2, name
        else:
            assert torch.equal(weights[name], initial[name]), name


def test_nvme_placement_counts_what_frozen_layers_hold(tmp_path):
    """storage=nvme puts a layer on disk only when its state does not fit: a frozen layer holds 4 bytes/parameter,
    so a budget that holds the frozen model's state keeps every layer in RAM (at 16 bytes/parameter it did not)."""
    model = _frozen_model()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    budget_GiB = (16 * trainable + 4 * frozen) / 2**30
    _, _, weights, strategy = megatrain_run(model, make_batches(model.config, 2), 2, 1, None, record_grads=False,
                                            storage="nvme", ram_budget_GiB=budget_GiB, nvme_dir=tmp_path)
    assert not any(u.on_disk for u in strategy.store.units)
    _, _, _, strategy = megatrain_run(model, make_batches(model.config, 2), 2, 1, None, record_grads=False,
                                      storage="nvme", ram_budget_GiB=budget_GiB * 0.9, nvme_dir=tmp_path)
    assert any(u.on_disk for u in strategy.store.units)  # below it, the first layers go to their files
