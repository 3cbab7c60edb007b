"""Shared pieces of the tests: a tiny model and data, and the plain-PyTorch reference loop."""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch.utils.data import DataLoader

from megatrain_lightning import MegatrainStrategy
from megatrain_lightning import schedule as S
from megatrain_lightning.config import Config
from megatrain_lightning.models.lm import CausalLM
from megatrain_lightning.models.llama import Llama


class RecordingLM(CausalLM):
    """CausalLM that remembers each micro-batch's loss."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.losses.append(loss.item())
        return loss


def make_batches(config: Config, n: int, batch: int = 2, seq_len: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=g) for _ in range(n)]


def make_model(name: str = "tiny", seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    return Llama(Config.from_name(name, **overrides))


def kept_budget_GiB(config: Config, n_layers: int) -> float:
    """device_state_GiB that keeps the resident unit (embedding, final norm, head) and the first `n_layers` layers."""
    return S.DEVICE_STATE_BYTES * (config.embedding_params + n_layers * config.layer_params) / 2**30


def nvme_budget_GiB(model: torch.nn.Module, on_disk: int, dtype: torch.dtype = torch.float32) -> float:
    """storage=nvme's ram_budget_GiB that leaves exactly `on_disk` of `model`'s trunk layers to files (placement's
    rule, checked)."""
    from megatrain_lightning import placement
    from megatrain_lightning.models import surgery
    from megatrain_lightning.models.llama import Trunk
    from megatrain_lightning.storage.store import Layout
    trunk = next(m for m in model.modules() if isinstance(m, Trunk))

    def layout(named) -> Layout:
        named = list(named)
        frozen = {n for n, p in named if not p.requires_grad}
        in_copy = {n for n in frozen if dict(named)[n].dtype == dtype != torch.float32}  # as model_store keeps them
        return Layout([(n, p.shape) for n, p in named], frozen=frozen, in_copy=in_copy)
    rest = [(name, owners[0][2]) for name, owners in surgery.param_refs(model, skip=trunk).values()]
    layouts = [layout(b.named_parameters()) for b in trunk] + [layout(rest)]
    layer_ram, fixed, _ = placement.nvme_terms(layouts, dtype)
    order = sorted(range(len(layer_ram)), key=lambda i: layouts[i].trainable != 0)  # wholly frozen layers go first

    def need(n: int) -> float:  # RAM with the first n layers of that order in files
        return fixed + sum(layer_ram[i] for i in order[n:])
    budget = need(on_disk) + 0.5 * (need(on_disk - 1) - need(on_disk)) if on_disk else need(0)
    assert len(placement.nvme_units(layouts, dtype, budget / 2**30)) == on_disk
    return budget / 2**30


def loader(batches: list[torch.Tensor]) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False)


def lm_kwargs(steps: int, lr: float = 1e-2) -> dict:
    return dict(lr=lr, weight_decay=0.1, warmup_steps=2, max_steps=steps, min_lr_ratio=0.1)


def reference_run(model: Llama, batches, steps: int, accumulate: int, clip: float | None, lr: float = 1e-2,
                  clip_algorithm: str = "norm", pieces: int | None = None):
    """Plain PyTorch: torch.optim.AdamW, clip_grad_norm_, LambdaLR, gradient accumulation like Lightning's.
    `pieces`: each micro-batch's backward runs this many sequences at a time (its loss weighted by their share), so
    gradients are summed in the order the batch sweep sums them. Adam amplifies rounding: after 4 steps plain PyTorch
    over pieces of one sequence differs from itself over the whole batch by up to 1.2e-5 (tiny-qwen2's MLP)."""
    model = copy.deepcopy(model)
    # the same loss function as the run under test (tests/test_loss.py checks it against F.cross_entropy over all
    # logits): this loop checks the engine, store and optimizer, not the loss
    lm = CausalLM(model.config, model=model, **lm_kwargs(steps, lr))
    conf = lm.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    # The fused CPU kernel, which the host optimizer also runs. The default for-loop kernel rounds differently,
    # and Adam's m/sqrt(v) amplifies that on near-zero gradients (k_proj.bias under RoPE: ~5e-5 relative).
    for group in opt.param_groups:
        group["fused"], group["foreach"] = True, False
    losses, first_grads = [], None
    it = iter(batches)
    for step in range(steps):
        for _ in range(accumulate):
            batch = next(it)
            size = pieces or len(batch)
            total = 0.0
            for lo in range(0, len(batch), size):
                loss = lm.loss(batch[lo:lo + size]) * (len(batch[lo:lo + size]) / len(batch))
                total += loss.item()
                (loss / accumulate).backward()
            losses.append(total)
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
        # in the optimizer's parameter order, as Lightning clips: the global norm is then summed identically
        params = [p for g in opt.param_groups for p in g["params"]]
        if clip and clip_algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, clip)
        elif clip:
            torch.nn.utils.clip_grad_value_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad()
    return losses, first_grads, {n: p.detach().clone() for n, p in lm.named_parameters()}


class FirstGrads(L.Callback):
    """Copies the host fp32 gradients right before the first optimizer step (before clipping)."""

    def __init__(self) -> None:
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = {k: v.clone() for k, v in trainer.strategy.store.named("grad").items()}


def megatrain_run(model: Llama, batches, steps: int, accumulate: int, clip: float | None,
                  precision: str = "32-true", lr: float = 1e-2, clip_algorithm: str = "norm",
                  record_grads: bool = True, callbacks=(), **strategy_kwargs):
    """`record_grads`: copy the step-1 gradients in a hook (a hook that reads gradients keeps the host updates
    from starting during backward)."""
    lm = RecordingLM(model.config, model=copy.deepcopy(model), **lm_kwargs(steps, lr))
    grads = FirstGrads()
    strategy = MegatrainStrategy(**strategy_kwargs)
    device = str(strategy_kwargs.get("device", "cpu"))
    trainer = L.Trainer(strategy=strategy, accelerator=device.split(":")[0], callbacks=([grads] if record_grads else []) + list(callbacks),
                        precision=precision, max_steps=steps, accumulate_grad_batches=accumulate,
                        gradient_clip_val=clip, gradient_clip_algorithm=clip_algorithm, logger=False,
                        enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(lm, train_dataloaders=loader(batches))
    weights = {k: v.clone() for k, v in strategy.store.named("master").items()}
    return lm.losses, grads.grads, weights, strategy


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_trains_like(got, want, trainer) -> None:
    """A module trained under the megatrain strategy (`got`, its `trainer`) against the same module under Lightning's
    default (`want`): every recorded loss (`.losses`) within 1e-5 and every weight (the store's master) within 1e-5,
    relative."""
    for a, b in zip(got.losses, want.losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (got.losses, want.losses)
    masters = trainer.strategy.store.named("master")
    for name, p in want.named_parameters():
        assert rel_err(masters[name], p.detach()) < 1e-5, name


def assert_adam_state_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float,
                            lr: float) -> None:
    """Every tensor within `tol` (relative norm), after setting aside a few elements (at most 1 in 1000, at least
    one) that differ by less than a fifth of one learning-rate step: Adam's update m/(sqrt(v) + eps) amplifies the
    rounding of a gradient element that sums to ~eps (a token seen once: its embedding row's first gradient), and
    two exact computations that sum in another order (another batch split, another CPU's kernels) round
    differently. Seen: one element of 16384 off by 1.2e-3 with lr 1e-2, the others to 1e-8."""
    assert got.keys() == want.keys()
    for k in want:
        a, b = got[k].double(), want[k].double()
        diff = (a - b).abs()
        stray = diff > 1e-3 * lr  # a visible part of one step: rounding alone moves a weight ~1e-8
        assert stray.sum() <= max(1, b.numel() // 1000) and (diff[stray] <= 0.2 * lr).all(), (k, diff.max().item())
        a, b = a[~stray], b[~stray]
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < tol, (k, err)
