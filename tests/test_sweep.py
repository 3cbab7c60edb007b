"""The batch sweep (a layer runs the micro-batch in chunks of whole sequences while its weights are on the device) and
the step cache (weights and gradient sums kept on the device over an accumulation): the same numbers as plain
PyTorch, one chunk's activations at a time, weights in once and gradients out once per step."""

import json

import lightning as L
import pytest
import torch
from torch import nn

from megatrain_lightning import MegatrainStrategy, Trunk
from megatrain_lightning import schedule as S
from megatrain_lightning.errors import UserError
from tests.helpers import (assert_trains_like, kept_budget_GiB, loader, make_batches, make_model, megatrain_run,
                           reference_run, rel_err)
from tests.test_parity import TOL, tol

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
STEPS, ACCUMULATE, BATCH, SEQ = 4, 2, 5, 16


# weights after 4 steps of runs that sum the same gradients in another order (see reference_run: plain PyTorch
# against itself, 1.2e-5)
ROUNDING_TOL = 5e-5
CUDA_WEIGHTS_TOL = 1e-3


def _assert_matches(got, want, grads: bool = True, weights_tol: float | None = None) -> None:
    losses, first_grads, weights = got[:3]
    for a, b in zip(losses, want[0], strict=True):
        assert abs(a - b) <= TOL * abs(b), (losses, want[0])
    if grads:
        for name in want[1]:
            assert rel_err(first_grads[name], want[1][name]) < TOL, name
    for name in want[2]:
        assert rel_err(weights[name], want[2][name]) < max(tol(name), weights_tol or 0), name


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])  # untied; tied embeddings + qkv bias
@pytest.mark.parametrize("checkpoint_interval", [1, 2])
@pytest.mark.parametrize("chunk_tokens", [SEQ, 2 * SEQ])  # 5 chunks of 1 sequence; chunks of 2, 2 and 1
def test_sweep_matches_plain_pytorch_and_the_unchunked_run(preset, checkpoint_interval, chunk_tokens):
    """AdamW, clipping, accumulation and the LR schedule: chunked equals a plain PyTorch loop over the same pieces,
    and the plain loop and the run with the whole micro-batch at once in losses and gradients (their weights part by
    Adam-amplified rounding only: see reference_run)."""
    model = make_model(preset)
    batches = make_batches(model.config, STEPS * ACCUMULATE, batch=BATCH, seq_len=SEQ)
    pieces = reference_run(model, batches, STEPS, ACCUMULATE, 1.0, pieces=chunk_tokens // SEQ)
    want = reference_run(model, batches, STEPS, ACCUMULATE, 1.0)
    whole = megatrain_run(model, batches, STEPS, ACCUMULATE, 1.0, checkpoint_interval=checkpoint_interval)
    got = megatrain_run(model, batches, STEPS, ACCUMULATE, 1.0, checkpoint_interval=checkpoint_interval,
                        chunk_tokens=chunk_tokens)
    _assert_matches(got, pieces)
    _assert_matches(got, want, weights_tol=ROUNDING_TOL)
    _assert_matches(got, whole[:3], weights_tol=ROUNDING_TOL)
    assert got[3].engine.sweep.chunk_of == {(BATCH, SEQ, torch.float32): chunk_tokens // SEQ}


@pytest.mark.parametrize("mode", ["eager", "value-clip", "kept", "nvme", "frozen"])
def test_sweep_in_every_update_mode(mode, tmp_path):
    """Eager updates during backward (no clipping), a value clip, units kept on the device, file-backed layers and
    frozen parameters all see the chunked gradients."""
    model = make_model("tiny")
    clip, algorithm, kwargs = 1.0, "norm", {}
    if mode == "eager":
        clip = None
    elif mode == "value-clip":
        clip, algorithm = 0.05, "value"
    elif mode == "kept":
        kwargs = dict(device_state_GiB=kept_budget_GiB(model.config, 1))
    elif mode == "nvme":
        kwargs = dict(storage="nvme", ram_budget_GiB=2e-3, nvme_dir=str(tmp_path))  # some layers on disk
    elif mode == "frozen":
        for name, p in model.named_parameters():
            p.requires_grad_(not name.endswith("mlp.up_proj.weight"))
    batches = make_batches(model.config, STEPS * ACCUMULATE, batch=BATCH, seq_len=SEQ)
    want = reference_run(model, batches, STEPS, ACCUMULATE, clip, clip_algorithm=algorithm, pieces=2)
    got = megatrain_run(model, batches, STEPS, ACCUMULATE, clip, clip_algorithm=algorithm, chunk_tokens=2 * SEQ,
                        record_grads=False, **kwargs)
    _assert_matches(got, want, grads=False)
    if mode == "kept":
        assert got[3].engine.device_states is not None
    if mode == "nvme":
        assert got[3].store.nvme is not None


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("chunk_tokens", [None, SEQ])
def test_step_cache_matches_plain_pytorch(clip, chunk_tokens):
    """Weights and gradient sums kept on the device over 3 micro-batches (every unit; and beside kept units)."""
    model = make_model("tiny")
    batches = make_batches(model.config, 3 * 3, batch=4, seq_len=SEQ)
    want = reference_run(model, batches, 3, 3, clip, pieces=1 if chunk_tokens else None)
    got = megatrain_run(model, batches, 3, 3, clip, record_grads=clip is not None, step_cache_GiB=1.0,
                        chunk_tokens=chunk_tokens)
    assert sorted(got[3].engine.step_cache.units) == list(range(model.config.n_layer + 1))
    _assert_matches(got, want, grads=clip is not None)
    # the resident unit kept whole on the device, the first layer cached, the rest through the host's add
    budget = S.DEVICE_GRAD_BYTES * 2 * model.config.layer_params / 2**30
    got = megatrain_run(model, batches, 3, 3, clip, record_grads=False, step_cache_GiB=budget,
                        device_state_GiB=kept_budget_GiB(model.config, 0), chunk_tokens=chunk_tokens)
    assert got[3].engine.step_cache.units == {0} and got[3].engine.device_states.units == {model.config.n_layer}
    _assert_matches(got, want, grads=False)


def test_step_cache_with_file_backed_layers(tmp_path):
    """storage=nvme: the cached sums land in the RAM gradients of file-backed layers once, at the step's end."""
    model = make_model("tiny")
    batches = make_batches(model.config, 3 * 3, batch=4, seq_len=SEQ)
    want = reference_run(model, batches, 3, 3, 1.0)
    got = megatrain_run(model, batches, 3, 3, 1.0, record_grads=False, step_cache_GiB=1.0, storage="nvme",
                        ram_budget_GiB=2e-3, nvme_dir=str(tmp_path))
    assert got[3].store.nvme is not None and got[3].engine.step_cache is not None
    _assert_matches(got, want, grads=False)


def _traced(tmp_path, **kwargs) -> dict:
    model = make_model("tiny")
    megatrain_run(model, make_batches(model.config, 3 * 3, batch=4, seq_len=SEQ), 3, 3, 1.0,
                  trace_dir=str(tmp_path), trace_step=1, record_grads=False, **kwargs)
    return json.loads((tmp_path / "step1.json").read_text())


def _count(trace: dict, lane: str, kind: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for e in trace["events"]:
        if e["lane"] == lane and e["kind"] == kind:
            out[e["layer"]] = out.get(e["layer"], 0) + 1
    return out


def test_cached_units_load_once_and_ship_once_per_step(tmp_path):
    """A traced step of 3 micro-batches, each in 4 chunks: every layer's weights cross to the device once and every
    unit's gradients leave once (no host add); without the cache, twice per micro-batch and once per micro-batch."""
    n = make_model("tiny").config.n_layer
    trace = _traced(tmp_path / "cached", step_cache_GiB=1.0, chunk_tokens=SEQ)
    assert _count(trace, S.H2D, S.LOAD) == {i: 1 for i in range(n)}
    assert _count(trace, S.D2H, S.GRAD) == {i: 1 for i in range(n + 1)}
    assert _count(trace, S.CPU, S.ACCUMULATE) == {}
    assert _count(trace, S.COMPUTE, S.RECOMPUTE) == {i: 3 * 4 for i in range(n)}  # 3 micro-batches x 4 chunks
    trace = _traced(tmp_path / "plain", step_cache_GiB=0, chunk_tokens=SEQ)
    assert _count(trace, S.H2D, S.LOAD) == {i: 3 * 2 for i in range(n)}
    assert _count(trace, S.D2H, S.GRAD) == {i: 3 for i in range(n + 1)}  # chunked: still once per micro-batch
    assert _count(trace, S.CPU, S.ACCUMULATE) == {i: 2 for i in [*range(n), n]}


class _Meter:
    """Bytes autograd holds saved at once (saved_tensors_hooks), each storage counted once (pieces of a checkpointed
    layer save the same weights), and the peak."""

    def __init__(self) -> None:
        self.live = self.peak = 0
        self.refs: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        return _Saved(t, self)

    @staticmethod
    def unpack(box):
        return box.t

    def add(self, key: int, nbytes: int, sign: int) -> None:
        self.refs[key] = self.refs.get(key, 0) + sign
        if self.refs[key] == (1 if sign > 0 else 0):  # first holder in, last holder out
            self.live += sign * nbytes
            self.peak = max(self.peak, self.live)


class _Saved:
    def __init__(self, t: torch.Tensor, meter: _Meter) -> None:
        storage = t.untyped_storage()
        self.t, self.meter, self.key, self.n = t, meter, storage.data_ptr(), storage.nbytes()
        meter.add(self.key, self.n, +1)

    def __del__(self) -> None:
        self.meter.add(self.key, self.n, -1)


def _saved_peak(chunk_tokens) -> int:
    model = make_model("tiny", n_layer=4)
    meter = _Meter()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        megatrain_run(model, make_batches(model.config, 2, batch=8, seq_len=32), 1, 2, 1.0, chunk_tokens=chunk_tokens)
    return meter.peak


def test_activations_are_one_chunks():
    """What autograd keeps for backward grows with the chunk, not with the batch: chunks of 1 and 2 of 8 sequences
    differ by one sequence's activations, an eighth of the whole batch's above the chunk-independent rest."""
    whole, one, two = _saved_peak(None), _saved_peak(32), _saved_peak(64)
    per_sequence = two - one
    assert per_sequence > 0
    assert abs((whole - one) - 7 * per_sequence) <= 0.1 * (whole - one)
    assert one < whole / 3


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, scale, shared):
        # scale: [B, 1, 1], one per sequence (sliced with the chunk); shared: [8], the same for every sequence
        return x + scale * torch.tanh(self.proj(x) + shared)


class _PerSample(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = Trunk([_Scaled() for _ in range(3)], per_sample_extras=(0,))
        self.losses = []

    def training_step(self, batch, batch_idx):
        scale = torch.arange(1, batch.shape[0] + 1, dtype=batch.dtype).view(-1, 1, 1) / batch.shape[0]
        loss = self.trunk(batch, scale, torch.linspace(-1, 1, 8)).square().mean()
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)


def test_per_sample_extras_are_sliced_with_the_chunk():
    def fit(strategy):
        module = _PerSample()
        g = torch.Generator().manual_seed(1)
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=3, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, train_dataloaders=loader([torch.randn(6, 4, 8, generator=g) for _ in range(3)]))
        return module, trainer

    want, _ = fit("auto")
    got, trainer = fit(MegatrainStrategy(chunk_tokens=8))  # 2 sequences of 4 tokens per chunk
    assert trainer.strategy.engine.sweep.chunk_of[(6, 4, torch.float32)] == 2
    assert_trains_like(got, want, trainer)


class _IgnoresScale(_Scaled):
    def forward(self, x, scale, shared):
        return x + torch.tanh(self.proj(x) + shared)


def test_an_undeclared_per_sequence_extra_is_named(caplog):
    """Chunked, an extra with the batch's size first that the Trunk does not declare per-sample gets a warning."""
    module = _PerSample()
    module.trunk = Trunk([_IgnoresScale() for _ in range(3)])  # per_sample_extras not given
    trainer = L.Trainer(strategy=MegatrainStrategy(chunk_tokens=8), accelerator="cpu", devices=1, max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level("WARNING"):
        trainer.fit(module, train_dataloaders=loader([torch.randn(6, 4, 8)]))
    assert "Trunk extra 0 has the batch's size (6) as its first dimension but is not in the Trunk's " \
           "per_sample_extras" in caplog.text
    assert "Trunk extra 1" not in caplog.text


@pytest.mark.parametrize("checkpoint_interval", [1, 2])
def test_dropout_masks_of_each_chunk_are_recomputed(checkpoint_interval):
    """Chunked, the recompute of each chunk draws the masks its forward drew: y != 0 where every layer's mask
    passed, and dy/dx != 0 where the recompute's did (with K=2 the recompute runs a chunk through both layers, the
    forward ran each layer over every chunk: each layer's chunk replays its own RNG state)."""
    from tests.test_trunk import Masked, MaskProbe

    probe = MaskProbe()
    probe.trunk = Trunk([Masked(64), Masked(64)])
    strategy = MegatrainStrategy(chunk_tokens=3, checkpoint_interval=checkpoint_interval)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=3,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(probe, train_dataloaders=loader([torch.ones(8, 3, 64) for _ in range(3)]))
    assert trainer.strategy.engine.sweep.chunk_of[(8, 3, torch.float32)] == 1
    assert len(probe.seen) == 3
    for forward_mask, backward_mask in probe.seen:
        assert 0.1 < forward_mask.float().mean() < 0.4  # dropout did drop (both layers: 1/4 pass)
        assert torch.equal(forward_mask, backward_mask)


def test_auto_chunk_rule():
    # half the free memory over 40x a sequence's input (4096 tokens x 10240 x 2 bytes x 40 = 3.36 GB): 40 GiB -> 6
    assert S.chunk_sequences(32, 4096, None, 10240 * 2, 2**30 * 1.0) == 1
    assert S.chunk_sequences(32, 4096, None, 10240 * 2, 2**30 * 40.0) == 6
    assert S.chunk_sequences(4, 4096, None, 10240 * 2, 2**30 * 100.0) == 4  # the batch bounds it
    assert S.chunk_sequences(32, 4096, None, 10240 * 2, 0.0) == 1  # at least one sequence
    assert S.chunk_sequences(32, 1024, 8192, 3072 * 2, 0.0) == 8  # set: tokens / seq_len
    assert S.chunk_sequences(32, 1024, 100, 3072 * 2, 0.0) == 1
    assert S.chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]


@pytest.mark.parametrize("kwargs,message", [
    (dict(chunk_tokens=0), "chunk_tokens must be an integer >= 1 (or None: from free device memory), got 0"),
    (dict(chunk_tokens="8k"), "chunk_tokens must be an integer >= 1 (or None: from free device memory), got '8k'"),
    (dict(step_cache_GiB=-1), "step_cache_GiB must be >= 0 (or None: auto), got -1"),
])
def test_bad_sweep_options_are_named(kwargs, message):
    with pytest.raises(UserError) as e:
        MegatrainStrategy(**kwargs)
    assert str(e.value) == message


@CUDA
def test_cuda_sweep_bounds_peak_memory_and_matches():
    """On the GPU: chunks of 1 of 8 sequences lower the step's peak allocation and train like the whole batch."""
    model = make_model("tiny", n_layer=4, hidden_size=256, intermediate_size=1024, max_seq_len=512)
    batches = make_batches(model.config, 4, batch=8, seq_len=512)
    peaks, runs = {}, {}
    for ct in (None, 512):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        runs[ct] = megatrain_run(model, batches, 2, 2, 1.0, device="cuda", chunk_tokens=ct, compile=False,
                                 device_state_GiB=0)  # kept state would outweigh the activations
        peaks[ct] = torch.cuda.max_memory_allocated()
    assert peaks[512] < 0.8 * peaks[None], peaks
    # losses and first gradients as tight as on the CPU; the weights after two AdamW steps part further than there
    # (cuBLAS picks other kernels for other shapes, and Adam turns rounding on near-zero gradients into whole steps)
    errors = {n: rel_err(runs[512][2][n], w) for n, w in runs[None][2].items()}
    print(peaks, max(errors.values()))
    _assert_matches(runs[512], runs[None][:3], weights_tol=CUDA_WEIGHTS_TOL)


def test_long_context_pieces_of_a_sequence_match_plain_pytorch():
    """One sequence longer than chunk_tokens: each layer's token-wise half (norm, MLP) runs 16 of 48 tokens at a time
    under activation checkpointing; losses and gradients equal plain PyTorch's, weights to the rounding of another
    summation order."""
    for preset in ("tiny", "tiny-qwen2"):
        model = make_model(preset)
        batches = make_batches(model.config, 3 * 2, batch=1, seq_len=48)
        want = reference_run(model, batches, 3, 2, 1.0)
        got = megatrain_run(model, batches, 3, 2, 1.0, chunk_tokens=16)
        assert got[3].engine.sweep.token_chunk_of == {(1, 48, torch.float32): 16}
        assert all(t.token_chunk == 16 for t in got[3].engine.templates)
        _assert_matches(got, want, weights_tol=ROUNDING_TOL)


def test_long_context_pieces_hold_one_pieces_mlp_activations():
    """What autograd holds at once with the MLP half in pieces of 32 of 128 tokens: every layer's attention half,
    the pieces' inputs and one piece's MLP activations, instead of every layer's whole MLP activations."""
    from megatrain_lightning.models.llama import Llama

    torch.manual_seed(0)
    model = Llama(make_model("tiny", intermediate_size=1024).config)  # the MLP's activations the larger part
    idx = torch.randint(0, 256, (1, 128))
    peaks, grads = {}, {}
    for piece in (None, 32):
        for block in model.model.layers:
            block.token_chunk = piece
        model.zero_grad()
        meter = _Meter()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            model(idx).square().mean().backward()
        peaks[piece] = meter.peak
        grads[piece] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert peaks[32] < 0.7 * peaks[None], peaks
    for name, g in grads[None].items():
        assert rel_err(grads[32][name], g) < TOL, name


def test_token_chunk_rule():
    assert S.token_chunk(4096, None, 6144, float("inf")) is None  # the CPU
    assert S.token_chunk(4096, None, 6144, 2**40) is None  # a sequence fits
    # half of 1 GiB over 40 x 6144 bytes per token: 2184 tokens
    assert S.token_chunk(262144, None, 6144, 2**30) == 2184
    assert S.token_chunk(262144, 65536, 6144, 0.0) == 65536
    assert S.token_chunk(4096, 8192, 6144, 0.0) is None
