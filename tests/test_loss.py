"""The chunked head + loss (gradients formed in forward, loss.py) computes the same loss and gradients as
F.cross_entropy over all logits through autograd (CPU)."""

import copy

import pytest
import torch

from megatrain_lightning.models.lm import CausalLM
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


_PEAK_SCRIPT = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("loss", sys.argv[1])  # the module alone: no package, no lightning
loss = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loss)
linear_cross_entropy = loss.linear_cross_entropy
V, D, N, c = 16384, 64, 1024, 512
g = torch.Generator().manual_seed(0)
hidden = torch.randn(N, D, generator=g, requires_grad=True)
weight = (0.02 * torch.randn(V, D, generator=g)).requires_grad_()
labels = torch.randint(0, V, (N,), generator=g)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
def high_water():  # peak RSS since the last reset (VmHWM)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
with torch.autocast("cpu", dtype=torch.bfloat16):
    linear_cross_entropy(hidden[:c], weight, labels[:c], c).backward()  # warm-up: libraries, thread pools
hidden.grad = weight.grad = None
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the RSS now (Linux): the imports' own peak does not count
except OSError:
    print("no-reset")  # a sandbox that keeps /proc read-only
    sys.exit(0)
base = rss()
with torch.autocast("cpu", dtype=torch.bfloat16):
    linear_cross_entropy(hidden, weight, labels, c).backward()
print(high_water() - base)
"""


def test_the_chunked_loss_holds_what_the_planner_counts():
    """Peak memory of the head + loss beyond its inputs, measured (RSS in a subprocess whose large allocations are
    returned to the OS on free) against the planner's head_bytes: one chunk's fp32 logits turned into probabilities
    plus their compute-dtype copy, the fp32 weight gradient and one chunk's compute-dtype part of it, the hidden-state
    gradient. Holding the previous chunk's probabilities while the next chunk's logits form, or torch.logsumexp's
    [c, V] temporary, would add 6 bytes per logit or more (the code before this test held 2.2 times the bound)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    V, D, N, c, cb = 16384, 64, 1024, 512, 2
    bound = (4 + cb) * V * c + (4 + cb) * V * D + cb * N * D  # planner/workload.py Workload.head_bytes
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    path = Path(__file__).resolve().parents[1] / "megatrain_lightning" / "models" / "loss.py"
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True, env=env,
                         check=True)
    last = out.stdout.strip().splitlines()[-1]
    if last == "no-reset":
        pytest.skip("/proc/self/clear_refs is not writable here: the peak RSS cannot be reset after the imports")
    peak = int(last)
    assert peak <= 1.1 * bound, (peak, bound)
    assert peak >= 0.5 * bound, (peak, bound)  # it does measure the logits


def test_the_final_norm_in_pieces_equals_it_whole_and_keeps_less_for_backward():
    """model.rms_norm_in_pieces: the same output and input gradient (the norm is per token; the weight's gradient sums
    in another order), while autograd keeps the pieces' inputs only, not the fp32 intermediates of every token."""
    from megatrain_lightning.models.llama import rms_norm, rms_norm_in_pieces

    def run(fn, dtype):
        torch.manual_seed(0)
        x = torch.randn(4, 64, 16, dtype=dtype, requires_grad=True)
        w = torch.randn(16, dtype=dtype, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            out = fn(x, w, 1e-5)
        return out, torch.autograd.grad(out, [x, w], torch.randn_like(out)), sum(saved), x.nbytes + 8 * w.nbytes

    in_pieces = lambda *a: rms_norm_in_pieces(*a, tokens=32)  # noqa: E731
    whole, (gx, gw), _, _ = run(rms_norm, torch.float32)
    pieces, (px, pw), _, _ = run(in_pieces, torch.float32)
    assert torch.equal(pieces, whole) and torch.equal(px, gx)
    torch.testing.assert_close(pw, gw, rtol=1e-5, atol=1e-6)  # sums over 8 pieces vs one
    *_, whole_bytes, _ = run(rms_norm, torch.bfloat16)
    *_, piece_bytes, inputs = run(in_pieces, torch.bfloat16)
    assert piece_bytes <= inputs < whole_bytes / 4  # the pieces' inputs (the weight once per piece)
