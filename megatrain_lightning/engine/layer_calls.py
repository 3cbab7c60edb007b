"""Streaming for models whose own forward loops over their layers (a transformers decoder): each layer call from
that loop enters the engine on its own.

A transformers model calls layer i as `layer(hidden, attention_mask=..., position_embeddings=..., ...)`, with
arguments that may differ per layer (a mask per attention type). Each call is one autograd Function: its forward
loads the layer's weights (the forward pass's prefetcher, started by layer 0, loads ahead), runs the batch sweep over
it without autograd and keeps only its input; its backward (autograd runs them last to first, the backward pass's
prefetcher started by the last layer) loads the weights again, recomputes each chunk with autograd, backpropagates
it and ships the layer's gradients once. This is the engine's schedule at checkpoint_interval 1, driven by the
model's loop instead of the Trunk's.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask
from torch.utils import _pytree as pytree

from megatrain_lightning import schedule as S
from megatrain_lightning.engine.slots import Prefetcher
from megatrain_lightning.engine.streaming import StreamingEngine
from megatrain_lightning.errors import UserError
from megatrain_lightning.engine.sweep import add_fp32

CACHE_ARGS = ("cache", "past_key_value", "past_key_values")  # transformers 5 and 4.x names
# Flex attention's options for every layer call (transformers passes a layer's `kernel_options` on to it). Inductor
# lowers flex attention in a graph without autograd (the forward pass) with queries shorter than 128 tokens to its
# decoding kernel, which inside a compiled gpt-oss layer gave outputs up to 23% off (H200, torch 2.11, 17 tokens,
# its sliding and full masks; the same call eager, or with this option, equal to 1e-7); the recompute, a graph with
# autograd, runs the main kernel, so forward and backward would differ too. Training needs the main kernel anyway.
FLEX_KERNEL_OPTIONS = {"FORCE_USE_FLEX_ATTENTION": True}


class LayerCalls:
    def __init__(self, engine: StreamingEngine) -> None:
        if engine.plan.k != 1:
            raise UserError("checkpoint_interval: a model that calls its layers itself (a transformers model) streams "
                            f"them one at a time: it must be 1, got {engine.plan.k}")
        self.engine, self.n = engine, engine.plan.n_layers
        self._forward: Prefetcher | None = None
        self._backward: Prefetcher | None = None
        self._next = 0  # the layer the running pass expects next
        self._tuple = False  # the layers return a tuple (transformers 4.x) rather than the hidden state
        # the layers' inputs kept for backward outside device memory (the engine's offload_checkpoints; None: on
        # the device), and the one being fetched back one layer ahead of backward
        self._host = None
        self._fetched = None
        # traced: (trace, mark) at the end of the last layer's training forward; what the compute stream runs from
        # there to its backward (the head and the loss) is the resident unit's span, as on the Trunk path
        self._resident = None
        self._plan = engine.plan  # the running pass's (a training step's: its kept layers, kept_graphs.py)
        # flex attention masks cut for the batch sweep's chunks, made once a pass (every layer gets the same masks):
        # (id(mask), lo, hi) -> (mask, its rows)
        self._masks: dict[tuple[int, int, int], tuple[BlockMask, BlockMask]] = {}

    def __call__(self, i: int, x: Tensor, args: tuple, kwargs: dict):
        # no KV cache: a layer that appended its keys and values to one in forward would attend to them again in
        # the recompute (and its k and v projections would get no gradient)
        kwargs = {k: (None if k in CACHE_ARGS else False if k == "use_cache" else v) for k, v in kwargs.items()}
        if any(isinstance(v, BlockMask) for v in kwargs.values()):
            kwargs["kernel_options"] = {**(kwargs.get("kernel_options") or {}), **FLEX_KERNEL_OPTIONS}
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [k for k, v in enumerate(leaves) if isinstance(v, Tensor)]
        if torch.is_grad_enabled():
            out = _StreamedLayer.apply(self, i, x, self.engine.anchor, (leaves, spec, tensors),
                                       *[leaves[k] for k in tensors])
        else:
            with torch.no_grad():
                out = _first(self.forward(i, x, leaves, spec, keep=False)[0])
        return (out,) if self._tuple else out

    def _mask_rows(self, mask: BlockMask, lo: int, hi: int) -> BlockMask:
        """`mask`'s rows for sequences [lo, hi), made once a pass (a mask of the pass is alive: its id is its own)."""
        made = self._masks.get((id(mask), lo, hi))
        if made is None or made[0] is not mask:
            made = self._masks[id(mask), lo, hi] = (mask, _block_mask_rows(mask, lo, hi))
        return made[1]

    # ---- the passes, layer by layer ----
    def _acquire(self, pf: Prefetcher, pos: int, i: int, what: str):
        if pos != self._next:
            raise RuntimeError(f"the model called its layers out of order ({what} layer {i}, expected "
                               f"{self._next}): only models that run each layer once, in order, can be streamed")
        return pf.acquire(pos)

    def forward(self, i: int, x: Tensor, leaves: list, spec, keep: bool):
        eng = self.engine
        chunks = eng.sweep.chunks(x)
        whole = len(chunks) == 1
        if i == 0:
            self._masks.clear()
            self._plan = eng.step_plan(whole) if keep else eng.plan
            self._forward, self._next = Prefetcher(eng, self._plan.forward_loads()), 0
            if keep:
                host = eng.host_checkpoints if self._plan.n_checkpoints else None
                self._host = host if host is not None and host.begin(x) else None
        kept = keep and i >= self._plan.first_kept_layer  # its graph and its slot stay for backward
        slot = self._acquire(self._forward, i, i, "forward of")
        if keep and self._host is not None and not kept:
            self._host.put(x)  # the input goes out as the layer runs; backward fetches it back
        params = eng.views(i, slot)
        rng, outs = [], []
        with eng.lanes.span(i, S.COMPUTE, S.FORWARD):
            for lo, hi in chunks:
                if keep:
                    rng.append(eng.rng_state())
                args, kwargs = _sliced(leaves, spec, x.shape[0], lo, hi, whole, self._mask_rows)
                if kept:  # the whole batch (kept layers only in steps the sweep does not cut)
                    eng.kept.layers[i], out = eng.run_kept(i, params, x, args, kwargs, slot=slot)
                    outs.append(pytree.tree_map_only(Tensor, Tensor.detach, out))
                else:
                    outs.append(eng.run(i, params, x if whole else x[lo:hi], args, kwargs))
        if not kept:
            self._forward.release(slot)
        self._next = i + 1
        self._tuple = isinstance(outs[0], tuple)
        if i == self.n - 1:
            self._forward = None
            if keep and eng.after_forward is not None:
                eng.after_forward()
            if keep and eng.trace is not None:
                self._resident = (eng.trace, eng.trace.mark())
        return _joined(outs), (chunks, rng, self._plan)

    def backward(self, i: int, x: Tensor | None, replay, leaves: list, spec, grad: Tensor, autocast) -> Tensor:
        """`x`: the layer's input, or None when it went out of device memory (fetched back here)."""
        eng = self.engine
        chunks, rng, plan = replay  # the plan of this layer's training forward (a no-grad pass since changes none)
        first_kept = plan.first_kept_layer
        if i == self.n - 1:
            if self._resident is not None and self._resident[0] is eng.trace:
                eng.trace.since(self._resident[1], -1, S.COMPUTE, S.RESIDENT)
            self._resident = None
            self._backward, self._next = Prefetcher(eng, plan.backward_loads()), 0
            self._backward.start()
        if i >= first_kept:  # kept: its forward's graph, its weights still in their slot
            grad_in = eng.backward_kept(i, grad, self._backward)
            if i == 0:
                self._backward = None
            return grad_in
        if x is None and i == first_kept - 1:
            self._fetched = self._host.fetch(i)
        slot = self._acquire(self._backward, first_kept - 1 - i, i, "backward of")
        if x is None:
            x = self._host.take(self._fetched)
            self._fetched = self._host.fetch(i - 1) if i > 0 else None  # the next one comes in meanwhile
        self._next += 1
        params = eng.views(i, slot)
        trainable = eng.trainable_leaves(i, params)
        whole = len(chunks) == 1
        amp = torch.autocast(eng.device.type, dtype=autocast[1]) if autocast[0] else nullcontext()
        grad_in = None if whole else torch.empty_like(x)
        sums = None
        if whole:
            eng.kept.measure_start()
        for c, (lo, hi) in enumerate(chunks):
            args, kwargs = _sliced(leaves, spec, x.shape[0], lo, hi, whole, self._mask_rows)
            with torch.random.fork_rng(eng._rng_devices, device_type=eng.device.type):
                eng.set_rng_state(rng[c])  # dropout masks as in forward
                x_in = (x if whole else x[lo:hi]).detach().requires_grad_()
                with torch.enable_grad(), amp, eng.lanes.span(i, S.COMPUTE, S.RECOMPUTE):
                    out = _first(eng.run(i, params, x_in, args, kwargs))
            if whole:
                eng.kept.measure_end()  # (auto) one layer's activations: what keeping it would hold
            g = grad if whole else grad[lo:hi]
            with eng.lanes.span(i, S.COMPUTE, S.BACKWARD):
                grads = torch.autograd.grad(out, [x_in, *trainable], g, allow_unused=True)
            sums = list(grads[1:]) if whole else add_fp32(sums, grads[1:])
            if whole:
                grad_in = grads[0]
            else:
                grad_in[lo:hi].copy_(grads[0])
        eng.grads.ship(i, sums)
        self._backward.release(slot)
        if i == 0:
            self._backward = None
        return grad_in


def _first(out):
    """A layer's hidden state: transformers 5 layers return it, 4.x ones a tuple starting with it."""
    return out[0] if isinstance(out, tuple) else out


def _joined(outs: list):
    """The chunks' outputs as one batch, in the form the layer returned them."""
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], tuple):
        return (torch.cat([_first(o) for o in outs]),)
    return torch.cat(outs)


def _sliced(leaves: list, spec, batch: int, lo: int, hi: int, whole: bool, mask_rows):
    """The call's arguments for sequences [lo, hi): a tensor whose first dimension is the batch's is sliced (masks,
    per-sequence position tables), and flex attention's BlockMask by `mask_rows`; others (a [1, T, d] table
    broadcast over the batch) are passed whole."""
    if whole:
        return pytree.tree_unflatten(leaves, spec)
    part = [v[lo:hi] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch and batch > 1
            else mask_rows(v, lo, hi) if isinstance(v, BlockMask) and v.kv_num_blocks.shape[0] == batch > 1
            else v for v in leaves]
    return pytree.tree_unflatten(part, spec)


def _block_mask_rows(mask: BlockMask, lo: int, hi: int) -> BlockMask:
    """Flex attention's mask for sequences [lo, hi) of its batch: its block tables' rows, and its mask_mod reading
    batch index b + lo (transformers' mask_mod indexes the padding mask by it). Passed whole, a chunk's attention
    would take the first sequences' rows (the CPU's compiled kernel crashes on the mismatch); BlockMask's own
    slicing drops the mask_mod. The offset is a tensor, a buffer of the mask_mod rather than a constant of it."""
    # a fill on the device, not a copy from the host (which would wait for the stream)
    mod, offset = mask.mask_mod, torch.full((), lo, dtype=torch.int32, device=mask.kv_num_blocks.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return mod(b + offset, h, q_idx, kv_idx)

    full = mask.full_kv_num_blocks is not None
    return BlockMask.from_kv_blocks(mask.kv_num_blocks[lo:hi], mask.kv_indices[lo:hi],
                                    mask.full_kv_num_blocks[lo:hi] if full else None,
                                    mask.full_kv_indices[lo:hi] if full else None,
                                    BLOCK_SIZE=mask.BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=mask.seq_lengths)


class _StreamedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, calls: LayerCalls, i: int, x: Tensor, anchor: Tensor, packed, *tensors: Tensor):
        leaves, spec, where = packed
        leaves = list(leaves)
        for k, t in zip(where, tensors):
            leaves[k] = t
        dev = calls.engine.device.type
        ctx.calls, ctx.i, ctx.leaves, ctx.spec, ctx.n_tensors = calls, i, leaves, spec, len(tensors)
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        out, ctx.replay = calls.forward(i, x, leaves, spec, keep=True)
        ctx.x = x.detach() if calls._host is None else None  # None: in host memory or files (LayerCalls._host)
        return _first(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_x = ctx.calls.backward(ctx.i, ctx.x, ctx.replay, ctx.leaves, ctx.spec, grad, ctx.autocast)
        ctx.x = ctx.leaves = None
        return (None, None, grad_x, None, None, *([None] * ctx.n_tensors))
