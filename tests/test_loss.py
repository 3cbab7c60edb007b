"""The chunked head + loss computes the same loss and gradients as one pass over all tokens (fp32, CPU)."""

import copy

import pytest
import torch

from megatrain_lightning.lm import CausalLM
from tests.helpers import make_model, rel_err


def _loss_and_grads(model, batch, chunk):
    lm = CausalLM(model.config, model=copy.deepcopy(model), loss_chunk_tokens=chunk)
    loss = lm.loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in lm.named_parameters()}


@pytest.mark.parametrize("chunk", [1, 7, 16])  # 7: chunks that do not divide the 2 x 16 tokens
def test_chunked_loss_matches_one_pass(chunk):
    model = make_model("tiny")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    labels = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    labels[0, :5] = -100  # a prompt: not trained on
    batch = {"input_ids": ids, "labels": labels}
    want_loss, want = _loss_and_grads(model, batch, None)
    got_loss, got = _loss_and_grads(model, batch, chunk)
    assert abs(got_loss - want_loss) <= 1e-6 * abs(want_loss)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name


def test_chunk_must_be_positive():
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        CausalLM(make_model("tiny").config, loss_chunk_tokens=0)
