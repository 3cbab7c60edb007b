"""The chunked head + loss (gradients formed in forward, loss.py) computes the same loss and gradients as
F.cross_entropy over all logits through autograd (CPU)."""

import copy

import pytest
import torch

from megatrain_lightning.lm import CausalLM
from tests.helpers import make_batches, make_model, rel_err


def _loss_and_grads(model, batch, chunk, scale=1.0):
    lm = CausalLM(model.config, model=copy.deepcopy(model), loss_chunk_tokens=chunk)
    loss = lm.loss(batch)
    (loss * scale).backward()  # the incoming gradient is not always 1 (accumulation divides the loss)
    return loss.detach(), {n: p.grad for n, p in lm.named_parameters()}


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])  # untied; tied (the head's weight is the embedding's)
@pytest.mark.parametrize("chunk", [1, 7, 16, 4096])  # 7: chunks that do not divide the 2 x 16 tokens
def test_chunked_loss_matches_one_pass(chunk, preset):
    model = make_model(preset)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    labels = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    labels[0, :5] = -100  # a prompt: not trained on
    batch = {"input_ids": ids, "labels": labels}
    want_loss, want = _loss_and_grads(model, batch, None, scale=0.5)
    got_loss, got = _loss_and_grads(model, batch, chunk, scale=0.5)
    assert abs(got_loss - want_loss) <= 1e-6 * abs(want_loss)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name


def test_frozen_head_gets_no_gradient():
    """A frozen head (requires_grad=False) gets no weight gradient; the hidden states' still match."""
    model = make_model("tiny")
    model.lm_head.weight.requires_grad_(False)
    batch = make_batches(model.config, 1)[0]
    want_loss, want = _loss_and_grads(model, batch, None)
    got_loss, got = _loss_and_grads(model, batch, 7)
    assert got["model.lm_head.weight"] is None and want["model.lm_head.weight"] is None
    assert abs(got_loss - want_loss) <= 1e-6 * abs(want_loss)
    for name in want:
        if want[name] is not None:
            assert rel_err(got[name], want[name]) < 1e-5, name


def test_chunked_loss_under_bf16_autocast_tracks_fp32():
    """Under autocast the head's matmuls run in bf16 and the softmax in fp32, as F.cross_entropy on .float() logits
    does: both within bf16 tolerance of the fp32 loss and gradients."""
    model = make_model("tiny")
    g = torch.Generator().manual_seed(4)
    batch = torch.randint(0, model.config.vocab_size, (2, 17), generator=g)
    want_loss, want = _loss_and_grads(model, batch, None)
    for chunk in (None, 5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_loss, got = _loss_and_grads(model, batch, chunk)
        assert abs(got_loss - want_loss) <= 1e-2 * abs(want_loss), chunk
        for name in want:
            assert rel_err(got[name], want[name]) < 3e-2, (chunk, name)


def test_chunk_must_be_positive():
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        CausalLM(make_model("tiny").config, loss_chunk_tokens=0)


def test_chunked_loss_without_grad_equals_with():
    """Validation (no grad): the same loss, without forming gradients."""
    model = make_model("tiny")
    batch = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(5))
    lm = CausalLM(model.config, model=copy.deepcopy(model), loss_chunk_tokens=5)
    with_grad = lm.loss(batch)
    with torch.no_grad():
        without = lm.loss(batch)
    assert not without.requires_grad and torch.allclose(without, with_grad.detach(), rtol=1e-6)
