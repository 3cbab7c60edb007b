"""A Trunk of the user's own blocks: blocks that differ only in a Python attribute (a per-layer scale, window or
layer index) compute what they would under Lightning's default strategy (each is its own template)."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatrain_lightning import MegatrainStrategy, Trunk
from tests.helpers import assert_trains_like, loader


class Scaled(nn.Module):
    def __init__(self, dim: int, scale: float, layer_idx: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.scale, self.layer_idx = scale, layer_idx  # not parameters: only the block's configuration

    def forward(self, x):
        return x + self.scale * torch.tanh(self.proj(x)) * (1 + self.layer_idx % 2)


class Dropped(nn.Module):
    """A block with dropout and a buffer (like a router's bias, not a parameter: it gets no update)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.3)
        self.register_buffer("bias", torch.linspace(-1, 1, dim))

    def forward(self, x):
        return x + self.drop(torch.tanh(self.proj(x) + self.bias))


class Toy(L.LightningModule):
    def __init__(self, block=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 16)
        make = block or (lambda i: Scaled(16, scale=0.5 * (i + 1), layer_idx=i))
        self.trunk = Trunk([make(i) for i in range(4)])
        self.head = nn.Linear(16, 32)
        self.losses = []

    def on_train_start(self) -> None:
        torch.manual_seed(2)  # the same random numbers from here under either strategy

    def training_step(self, batch, batch_idx):
        logits = self.head(self.trunk(self.embed(batch[:, :-1])))
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)


def _fit(strategy, block=None):
    toy = Toy(block)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 32, (2, 9), generator=g) for _ in range(6)]
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=3, accumulate_grad_batches=2,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(toy, train_dataloaders=loader(batches))
    return toy, trainer


def test_blocks_that_differ_only_in_attributes_match_the_default_strategy():
    want, _ = _fit("auto")
    got, trainer = _fit(MegatrainStrategy())
    assert_trains_like(got, want, trainer)
    assert len(set(map(id, trainer.strategy.engine.templates))) == 4  # one template per configuration


@pytest.mark.parametrize("checkpoint_interval", [1, 2])
def test_dropout_recomputes_the_forward_masks_and_buffers_work(checkpoint_interval):
    """The recompute in backward draws the same dropout masks as the forward (as torch.utils.checkpoint does with
    its RNG state preserved): losses and weights equal Lightning's default strategy; a block's buffer is used."""
    want, _ = _fit("auto", block=lambda i: Dropped(16))
    got, trainer = _fit(MegatrainStrategy(checkpoint_interval=checkpoint_interval), block=lambda i: Dropped(16))
    assert_trains_like(got, want, trainer)


class Masked(nn.Module):
    """y = (x * w) * dropout mask: y / (x * w) shows the forward's mask; d(sum(y * c))/dx = c * w * mask shows the
    recompute's."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(dim))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(x * self.w)


class MaskProbe(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = Trunk([Masked(64)])
        self.seen = []

    def training_step(self, batch, batch_idx):
        x = batch.float().requires_grad_()
        y = self.trunk(x)
        x.register_hook(lambda g: self.seen.append(((y.detach() != 0), (g != 0))))
        return (y * 3.0).sum()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_recompute_draws_the_forward_dropout_mask(compile):
    """On the GPU, eager and torch.compile'd blocks: the mask the backward uses is the one the forward drew."""
    probe = MaskProbe()
    trainer = L.Trainer(strategy=MegatrainStrategy(compile=compile), accelerator="gpu", devices=1, max_steps=3,
                        precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(probe, train_dataloaders=loader([torch.ones(8, 64) for _ in range(3)]))
    assert len(probe.seen) == 3
    for forward_mask, backward_mask in probe.seen:
        assert 0.3 < forward_mask.float().mean() < 0.7  # dropout did drop
        assert torch.equal(forward_mask, backward_mask)


class Buffered(nn.Module):
    """A block built in configure_model (on the meta device) with a buffer; `set_in_reset` chooses whether its
    reset_parameters sets the buffer."""

    def __init__(self, dim: int, set_in_reset: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.set_in_reset = set_in_reset
        self.register_buffer("bias", torch.linspace(-1, 1, dim))

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()
        if self.set_in_reset:
            with torch.no_grad():
                self.bias.copy_(torch.linspace(-1, 1, self.bias.numel()))

    def forward(self, x):
        return x + torch.tanh(self.proj(x) + self.bias)


class BuiltLate(Toy):
    def __init__(self, set_in_reset: bool) -> None:
        L.LightningModule.__init__(self)
        self.set_in_reset, self.losses = set_in_reset, []

    def configure_model(self) -> None:
        self.embed = nn.Embedding(32, 16)
        self.trunk = Trunk([Buffered(16, self.set_in_reset) for _ in range(2)])
        self.head = nn.Linear(16, 32)


def test_a_meta_built_block_buffer_must_be_set_by_reset_parameters():
    """Built on the meta device, a buffer has no value: reset_parameters sets it, or the run stops naming it."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 32, (2, 9), generator=g) for _ in range(2)]

    def fit(set_in_reset):
        model = BuiltLate(set_in_reset)
        trainer = L.Trainer(strategy=MegatrainStrategy(), accelerator="cpu", max_steps=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, train_dataloaders=loader(batches))
        return trainer

    trainer = fit(True)
    assert all(torch.equal(b["bias"], torch.linspace(-1, 1, 16)) for b in trainer.strategy.engine.buffers)
    with pytest.raises(ValueError, match=r"Buffered was built on the meta device and its buffers \['bias'\] have no "
                                         "values"):
        fit(False)
