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


def _bf16_base(model, narrow: bool):
    """The frozen parameters rounded to bf16: held as bf16 tensors (`narrow`) or as fp32 tensors of the same values."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16) if narrow else p.data.to(torch.bfloat16).float()
    return model


@pytest.mark.parametrize("where", ["ram", "ram-copy", "kept", "nvme", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA"))])
def test_a_frozen_bf16_base_is_held_in_bf16_alone(where, tmp_path):
    """Frozen parameters loaded in bf16 and trained in bf16-mixed have no fp32 master: 2 bytes a parameter in the
    store, and training is bit for bit that of the same values held in fp32 (the store then keeps their master, and
    with stream="copy" a bf16 copy too), in RAM (the master streams, or the copy), kept on the "device" and in
    files; a checkpoint of the bf16 base resumes to the same state."""
    base = _frozen_model()
    kwargs = {"ram": {}, "ram-copy": dict(stream="copy"), "kept": dict(device_state_GiB=kept_budget_GiB(base.config, 2)),
              "nvme": dict(storage="nvme", nvme_dir=tmp_path), "cuda": dict(device="cuda")}[where]
    batches = make_batches(base.config, STEPS * 2)
    runs = {}
    for narrow in (True, False):
        model = _bf16_base(base, narrow)
        if where == "nvme":
            kwargs["ram_budget_GiB"] = nvme_budget_GiB(model, 1, torch.bfloat16)
        # on the GPU a smaller step: two runs differ in the last bits there (attention's backward accumulates in no
        # fixed order), which Adam at lr 1e-2 turns into visible differences of small weights
        runs[narrow] = megatrain_run(model, batches, STEPS, 2, 1.0, precision="bf16-mixed", record_grads=False,
                                     lr=1e-3 if where == "cuda" else 1e-2, **kwargs)
    (losses, _, weights, strategy), (want_losses, _, want_weights, want_strategy) = runs[True], runs[False]
    exact = where != "cuda"
    assert losses == want_losses if exact else torch.allclose(torch.tensor(losses), torch.tensor(want_losses),
                                                               rtol=1e-3)
    initial = {"model." + n: p for n, p in _bf16_base(base, True).named_parameters()}
    for name, want in want_weights.items():
        if initial[name].requires_grad:
            assert torch.equal(weights[name], want) if exact else rel_err(weights[name], want) < 1e-2, name
        else:
            assert weights[name].dtype == torch.bfloat16 and torch.equal(weights[name], initial[name]), name
    store, n_frozen = strategy.store, sum(p.numel() for p in base.parameters() if not p.requires_grad)
    n = sum(p.numel() for p in base.parameters())
    assert sum(store.units[i].layout.numel - store.units[i].layout.master_numel for i in range(len(store.units))) \
        == n_frozen
    if where == "nvme":
        assert any(u.on_disk for u in store.units)
    else:
        tiles = sum(u.tile.nbytes for u in store.units)
        assert tiles == 16 * (n - n_frozen)  # master, m, v, gradient of the trainable parameters only
        if store.stream == "copy":
            assert store.nbytes == tiles + 2 * n  # and the bf16 copy of every parameter: 2 bytes a frozen one in all
        else:
            assert store.nbytes == tiles + 2 * n_frozen  # the masters stream; the frozen parameters' bf16 alone
        # the fp32 master it no longer keeps, less the bf16 bytes that are now their only copy under stream="master"
        assert want_strategy.store.nbytes - store.nbytes == (4 if store.stream == "copy" else 2) * n_frozen

    strategy.lightning_module.trainer.save_checkpoint(tmp_path / "ckpt")
    lm = RecordingLM(base.config, model=_bf16_base(base, True), **lm_kwargs(STEPS))
    trainer = L.Trainer(strategy=MegatrainStrategy(**kwargs), accelerator=str(kwargs.get("device", "cpu")),
                        precision="bf16-mixed",
                        max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(lm, train_dataloaders=loader(batches), ckpt_path=tmp_path / "ckpt")  # at max_steps: loads only
    for which in ("master", "exp_avg", "exp_avg_sq"):
        got, want = trainer.strategy.store.named(which), store.named(which)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want), which


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


def test_nvme_puts_a_wholly_frozen_layer_on_the_drives_first(tmp_path):
    """Layer 1 is frozen whole: with room in RAM for all but one layer it is the one in a file (only read there),
    not layer 0 (whose update would read and write its state on the drive every step); training is unchanged."""
    model = _frozen_model()
    batches = make_batches(model.config, 4)
    losses, _, weights, strategy = megatrain_run(model, batches, 2, 2, 1.0, record_grads=False, storage="nvme",
                                                 ram_budget_GiB=nvme_budget_GiB(model, 1), nvme_dir=tmp_path)
    assert [i for i, u in enumerate(strategy.store.units) if u.on_disk] == [1]
    ref_losses, _, ref_weights = reference_run(model, batches, 2, 2, 1.0)
    assert all(abs(a - b) <= TOL * abs(b) for a, b in zip(losses, ref_losses, strict=True))
    assert all(rel_err(weights[n], w) < TOL for n, w in ref_weights.items())
