"""The streaming engine: runs a Trunk's blocks with their weights streamed from the host store.

Three streams on CUDA: weights copy in on `h2d`, blocks run on the caller's (compute) stream, gradients
copy out on `d2h`. CUDA events order them; the host never synchronizes inside the layer loop. On CPU the
same code runs with plain copies (the "device" is the CPU), which is how CI checks it.

Forward keeps the hidden state entering every block of K layers; backward walks blocks last to first,
streams a block's weights once, recomputes it with autograd, backpropagates it layer by layer, and ships
each layer's gradients to the host as soon as they exist. A worker thread adds them into the fp32
gradient buffers while the device goes on.
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from megatrain_lightning import schedule as S
from megatrain_lightning.models import surgery
from megatrain_lightning.engine.grad_shipping import GradShipper
from megatrain_lightning.engine.block_inputs import HostCheckpoints
from megatrain_lightning.engine.kept_graphs import KeptGraphs, KeptLayer
from megatrain_lightning.engine.slots import Prefetcher, Slot, alias
from megatrain_lightning.engine.lanes import Lanes
from megatrain_lightning.storage.store import HostStore
from megatrain_lightning.engine.sweep import Sweep, add_fp32

def _functional(template: nn.Module, params: dict[str, Tensor], x: Tensor, *extras: Tensor, **kwargs) -> Tensor:
    return functional_call(template, params, (x, *extras), kwargs, strict=True)


class StreamingEngine:
    def __init__(self, store: HostStore, blocks: list[nn.Module], device: torch.device,
                 checkpoint_interval: int, prefetch_depth: int, compile: bool = False,
                 offload_checkpoints: bool | str | None = False, chunk_tokens: int | None = None,
                 per_sample_extras: tuple[int, ...] = (),
                 block_input_dirs: Sequence[str | Path] = (), same_computation: tuple[str, ...] = (),
                 keep_activations: int | None = None) -> None:
        """`compile`: run blocks through torch.compile (one graph per layer signature). `offload_checkpoints`: keep
        the block inputs in host memory (CUDA only; on the CPU the device is the host); None: when RAM has room, else
        in files under `block_input_dirs` if given (storage=nvme); "disk": in those files (on the CPU too).
        `chunk_tokens`, `per_sample_extras`: the batch sweep's (sweep.Sweep). `keep_activations`: kept_graphs.py."""
        self.store, self.device = store, device
        self.lanes = Lanes(device)  # streams, the host thread, the trace: what the helpers get
        self.cuda = self.lanes.cuda
        self._call = torch.compile(_functional, dynamic=False) if compile else _functional
        spill = tuple(block_input_dirs) if block_input_dirs and (
            offload_checkpoints == "disk" or (offload_checkpoints is None and self.cuda)) else ()
        self.plan = S.Plan(len(blocks), checkpoint_interval)
        self.host_checkpoints = (HostCheckpoints(self.lanes, self.plan, auto=offload_checkpoints is None,
                                                 spill_dirs=spill)
                                 if offload_checkpoints is not False and (self.cuda or spill) else None)
        self.n_slots = S.slots_needed(checkpoint_interval, prefetch_depth)
        # one stateless template per distinct layer signature and configuration (a per-layer sliding window or
        # layer index changes what a block computes); the blocks themselves hold meta tensors
        templates: dict[tuple, nn.Module] = {}
        # (`same_computation`: attributes that do not change it, e.g. a transformers layer's index, which only its KV
        # cache reads: layers alike but for it share a template, and under torch.compile one graph)
        self.templates = [templates.setdefault((store.units[i].layout.signature,
                                                surgery.configuration(b, same_computation)), b)
                          for i, b in enumerate(blocks)]
        self.blocks = blocks
        self.sweep = Sweep(device, chunk_tokens, per_sample_extras, self.templates, layers=checkpoint_interval)
        self.load_buffers()
        max_numel = max(u.layout.numel for u in store.units[:len(blocks)])
        self._slots = [Slot(max_numel, store.stream_dtype, store.compute_dtype, device, self.cuda)
                       for _ in range(self.n_slots)]
        self._free = list(self._slots)
        self._slot_nbytes = self.slot_bytes // max(1, len(self._slots))
        self.kept = KeptGraphs(device, len(self.plan.blocks), keep_activations, store.ranks.world)
        self.peak_resident_layers = 0
        self.h2d, self.d2h = self.lanes.h2d, self.lanes.d2h
        self._copy_reads: dict[int, Future] = {}  # file-backed units: copies read ahead of their load
        # each layer's gradients on their way to the host; it also holds where units live on the device: the
        # optimizer overlapped (optim.HostAdam, `attach_updater`), the units whose state the device keeps
        # (device_state.DeviceStates) and those whose weights and gradient sums stay for a step (StepCache)
        self.grads = GradShipper(self.lanes, store, max_numel)
        self.after_forward = None  # called when the trunk's forward has been issued (the strategy's hook)
        # what the trunk's autograd node hangs on, so that backward reaches the engine
        self.anchor = torch.zeros((), device=device, requires_grad=True)

    def load_buffers(self) -> None:
        """The device's copy of each block's buffers (on the CPU, the blocks' own tensors)."""
        self.buffers = [{n: t.to(self.device) for n, t in b.named_buffers()} for b in self.blocks]

    @property
    def trace(self):
        return self.lanes.trace

    @trace.setter
    def trace(self, trace) -> None:
        self.lanes.trace = trace

    @property
    def updater(self):
        return self.grads.updater

    @property
    def device_states(self):
        return self.grads.device_states

    @property
    def step_cache(self):
        return self.grads.step_cache

    @step_cache.setter
    def step_cache(self, cache) -> None:
        self.grads.step_cache = cache

    def attach_updater(self, updater, trace_of=None) -> None:
        """`trace_of`: where the updater records its host spans (default: the engine's current trace)."""
        self.grads.updater = updater
        updater.attach(self.lanes.worker, trace_of or (lambda: self.lanes.trace))

    def attach_device_states(self, states) -> None:
        """Units in `states` take their weights from the device master and keep their gradients on the device."""
        self.grads.device_states = states
        states.trace_of = lambda: self.lanes.trace

    @property
    def slot_bytes(self) -> int:
        return sum(s.buf.nbytes + (s.compute.nbytes if s.compute is not s.buf else 0) for s in self._slots)

    # ---- public entry: what Trunk.forward calls ----
    def __call__(self, x: Tensor, *extras: Tensor) -> Tensor:
        if any(e.requires_grad for e in extras):
            raise ValueError("Trunk extras (e.g. rotary tables) must not require grad: they get no gradient")
        if torch.is_grad_enabled():
            return _StreamedTrunk.apply(self, x, self.anchor, *extras)
        return self._forward(x, extras, keep=False)[0]

    # ---- passes ----
    def _forward(self, x: Tensor, extras: tuple[Tensor, ...], keep: bool) -> tuple[Tensor, list[Tensor], tuple]:
        """The trunk's output; with `keep`, the input of every block of K layers (None where it went to host
        memory), and the chunks with the RNG state entering each layer's chunk (its recompute draws the same random
        numbers)."""
        checkpoints: list[Tensor] = []
        chunks = self.sweep.chunks(x)
        whole = len(chunks) == 1
        plan = self.step_plan(whole) if keep else self.plan
        pf = Prefetcher(self, plan.forward_loads())
        host = self.host_checkpoints if keep and plan.n_checkpoints else None
        if host is not None and not host.begin(x):
            host = None
        if not whole:
            self.sweep.check_extras(x, extras)
        rng: list[list] = []  # [layer][chunk]
        for i in range(plan.n_layers):
            kept = i >= plan.first_kept_layer  # (training only) its graph stays for backward, and its slot
            if keep and i % plan.k == 0:
                if kept:
                    checkpoints.append(None)  # a kept block needs no input: its graph holds what backward needs
                elif host is not None:
                    host.put(x)
                    checkpoints.append(None)
                else:
                    checkpoints.append(x)  # [B, T, D] input of block i // k
            slot = pf.acquire(i)
            params = self.views(i, slot)
            if keep:
                rng.append([])
            with self.lanes.span(i, S.COMPUTE, S.FORWARD):
                out = None if whole else torch.empty_like(x)  # [B, T, D], filled chunk by chunk
                for lo, hi in chunks:
                    if keep:
                        rng[i].append(self.rng_state())
                    if kept:  # the whole batch (kept blocks only in steps the sweep does not cut)
                        self.kept.layers[i], y = self.run_kept(i, params, x, extras, slot=slot)
                        y = y.detach()
                    else:
                        y = self.run(i, params, x if whole else x[lo:hi], self.sweep.extras(extras, lo, hi, whole))
                    if whole:
                        out = y
                    else:
                        out[lo:hi].copy_(y)
                    del y
                x = out
            if not kept:
                pf.release(slot)
        return x, checkpoints, (chunks, rng, plan)

    def step_plan(self, whole: bool) -> S.Plan:
        """A training step's plan: its kept blocks (decided once measured; none when the sweep cuts the batch), with
        a weight slot for each of their layers beside the pass's own. Graphs an earlier step left are dropped."""
        for slot in self.kept.drop():
            if slot.free is not None:  # its forward may still run: the next load into it waits
                slot.free.record(torch.cuda.current_stream())
            self._free.append(slot)
        if self.grads.fresh:  # at a step's first micro-batch: the peak so far includes a whole step's, its update too
            self.kept.decide(self._slot_nbytes * self.plan.k)
        ranks = self.store.ranks
        if self.kept.blocks and ranks.world > 1:  # every rank must load the same layers (their broadcasts)
            whole = not ranks.any(not whole)
        plan = replace(self.plan, kept=self.kept.for_step(whole))
        while len(self._slots) < self.n_slots + plan.kept_layers:
            ref = self._slots[0]
            slot = Slot(ref.buf.numel(), ref.buf.dtype, ref.compute.dtype, self.device, self.cuda)
            self._slots.append(slot)
            self._free.append(slot)
        return plan

    def run_kept(self, i: int, params: dict[str, Tensor], x: Tensor, extras: tuple, kwargs: dict | None = None,
                 slot=None) -> tuple[KeptLayer, Tensor | tuple]:
        """Layer i's forward with autograd (inside the trunk's forward, where it is off), kept for backward; and its
        output as the layer returned it."""
        trainable = self.trainable_leaves(i, params)
        h_in = x.detach().requires_grad_()
        with torch.enable_grad():
            out = self.run(i, params, h_in, extras, kwargs)
        return KeptLayer(h_in, out[0] if isinstance(out, tuple) else out, trainable, slot), out

    def backward_kept(self, i: int, grad: Tensor, pf: Prefetcher) -> Tensor:
        """Layer i's backward from the graph its forward kept: its gradients ship, its slot goes back to `pf`;
        returns its input's gradient."""
        layer = self.kept.layers.pop(i)
        with self.lanes.span(i, S.COMPUTE, S.BACKWARD):
            grads = layer.backward(grad)
        self.grads.ship(i, grads[1:])
        pf.release(layer.slot)
        return grads[0]

    def _backward(self, checkpoints: list[Tensor], replay: tuple, extras: tuple[Tensor, ...], grad: Tensor,
                  autocast: tuple[bool, torch.dtype]) -> Tensor:
        """Blocks last to first. A block's weights load once; each chunk of the batch is recomputed through the block
        with autograd and backpropagated; its weight gradients add up over the chunks in fp32 on the device and
        leave once, after the last chunk."""
        chunks, rng, plan = replay  # the forward's chunks: the RNG states are per layer and chunk
        pf = Prefetcher(self, plan.backward_loads())
        pf.start()
        pos = 0
        amp = torch.autocast(self.device.type, dtype=autocast[1]) if autocast[0] else nullcontext()
        host = self.host_checkpoints if self.host_checkpoints is not None and self.host_checkpoints.active \
            and plan.n_checkpoints else None
        fetched = host.fetch(plan.n_checkpoints - 1) if host is not None else None
        whole = len(chunks) == 1
        for b, (start, end) in reversed(list(enumerate(plan.blocks))):
            if b >= plan.n_checkpoints:  # kept: its forward's graph, its weights still in their slots
                for i in reversed(range(start, end)):
                    grad = self.backward_kept(i, grad, pf)
                continue
            if whole:
                self.kept.measure_start()
            if host is not None:
                x = host.take(fetched)
                fetched = host.fetch(b - 1) if b > 0 else None  # the next block's input comes in meanwhile
            else:
                x = checkpoints[b]
            checkpoints[b] = None  # free as we go
            slots: dict[int, Slot] = {}
            params: dict[int, dict[str, Tensor]] = {}
            trainable: dict[int, list[Tensor]] = {}
            sums: dict[int, list[Tensor | None]] = {}  # fp32 weight gradients over the chunks so far
            grad_in = grad if whole else torch.empty_like(grad)  # [B, T, D] gradient of the block's input
            for c, (lo, hi) in enumerate(chunks):
                part = self.sweep.extras(extras, lo, hi, whole)
                saved = []
                h = x if whole else x[lo:hi]
                with torch.random.fork_rng(self._rng_devices, device_type=self.device.type):
                    for i in range(start, end):
                        if c == 0:  # the block's weights arrive in the first chunk and stay for the others
                            slots[i] = pf.acquire(pos)
                            pos += 1
                            params[i] = self.views(i, slots[i])
                            trainable[i] = self.trainable_leaves(i, params[i])
                        self.set_rng_state(rng[i][c])  # dropout masks as in forward (as torch.utils.checkpoint)
                        h_in = h.detach().requires_grad_()
                        with torch.enable_grad(), amp, self.lanes.span(i, S.COMPUTE, S.RECOMPUTE):
                            h = self.run(i, params[i], h_in, part)
                        saved.append((i, h_in, h))
                if whole:
                    self.kept.measure_end()  # (auto) one block's activations: what keeping it would hold
                g = grad if whole else grad[lo:hi]
                for i, h_in, out in reversed(saved):
                    with self.lanes.span(i, S.COMPUTE, S.BACKWARD):
                        grads = torch.autograd.grad(out, [h_in, *trainable[i]], g, allow_unused=True)
                    g = grads[0]
                    if whole:
                        self.grads.ship(i, grads[1:])
                        pf.release(slots.pop(i))
                    else:
                        sums[i] = add_fp32(sums.get(i), grads[1:])
                del saved
                if whole:
                    grad_in = g
                else:
                    grad_in[lo:hi].copy_(g)
                del g
            for i in reversed(slots):  # chunked: every chunk done, each layer's gradients leave once
                self.grads.ship(i, sums.pop(i))
                pf.release(slots[i])
            grad = grad_in
        return grad

    @property
    def _rng_devices(self) -> list[int]:
        return [self.device.index if self.device.index is not None else torch.cuda.current_device()] if self.cuda \
            else []

    def rng_state(self) -> tuple[Tensor, Tensor | None]:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.cuda else None

    def set_rng_state(self, state: tuple[Tensor, Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def views(self, i: int, slot: Slot) -> dict[str, Tensor]:
        """A layer's parameters in `slot`, each an alias with its own autograd version counter: views of one
        buffer share one, so a layer that writes one of its tensors in place (peft's ParamWrapper re-registers the
        weight it wraps, `set_`, on every forward) would invalidate every saved parameter of the layer."""
        layout = self.store.units[i].layout
        return {name: alias(view) for name, view in layout.views(slot.compute[:layout.numel]).items()}

    def trainable_leaves(self, i: int, params: dict[str, Tensor]) -> list[Tensor]:
        """Layer i's trainable parameters in `params` made autograd leaves (in the dict; frozen ones get no
        gradient), in the layout's order: what a layer's backward differentiates."""
        entries = self.store.units[i].layout.trainable_entries
        for e in entries:
            params[e.name] = params[e.name].detach().requires_grad_()
        return [params[e.name] for e in entries]

    def run(self, i: int, params: dict[str, Tensor], x: Tensor, extras: tuple[Tensor, ...],
             kwargs: dict | None = None) -> Tensor:
        call = _functional if self.sweep.eager else self._call
        return call(self.templates[i], {**params, **self.buffers[i]}, x, *extras, **(kwargs or {}))

    # ---- transfers ----
    def _load(self, i: int, slot: Slot) -> None:
        unit = self.store.units[i]
        n = unit.layout.numel
        # every rank caches the same units (placement.step_cache): a cached load is no collective on any rank
        cache = self.step_cache if self.step_cache is not None and i in self.step_cache else None
        cached = cache is not None and i in cache.valid
        if unit.remote:  # another rank's: its owner loads it and broadcasts it from its device (ranks.py)
            with torch.cuda.stream(self.h2d) if self.cuda else nullcontext():
                if self.cuda:
                    self.h2d.wait_event(slot.free)
                if cached:
                    slot.compute[:n].copy_(cache.weights[i])
                else:
                    self.store.ranks.broadcast_(slot.compute[:n], i)
                    if cache is not None:
                        cache.weights[i].copy_(slot.compute[:n])
                        cache.valid.add(i)
                if self.cuda:
                    slot.ready.record(self.h2d)
            return
        states = self.device_states if self.device_states is not None and i in self.device_states else None
        if self.updater is not None and states is None and not cached:
            self.updater.wait(i)  # the last step's update of this layer (and its streamed copy) is done
        with torch.cuda.stream(self.h2d) if self.cuda else nullcontext():
            if self.cuda:
                self.h2d.wait_event(slot.free)  # the compute stream is done with the slot's previous layer
            if states is not None:  # the device keeps its state: cast the device master once its update ran (no H2D)
                if self.cuda:
                    self.h2d.wait_event(states.updated)
                m = unit.layout.master_numel
                slot.compute[:m].copy_(states.master(i))
                if m < n:  # frozen parameters without a master: their device copy, made once
                    slot.compute[m:n].copy_(states.copy_only(i))
            elif cached:  # loaded earlier in this step: the weights have not changed since (no H2D)
                slot.compute[:n].copy_(cache.weights[i])
            elif unit.on_disk:  # its compute-dtype copy, read from its file into a pinned tile
                tier = self.store.nvme
                tile = tier.take(self._copy_reads.pop(i))
                with self.lanes.span(i, S.H2D, S.LOAD, n * tile.element_size(), self.h2d if self.cuda else None):
                    slot.compute[:n].copy_(tile[:n], non_blocking=self.cuda)
                done = None
                if self.cuda:
                    done = torch.cuda.Event()
                    done.record(self.h2d)
                tier.release_copy(tile, done)
                if cache is not None:
                    cache.weights[i].copy_(slot.compute[:n])
                    cache.valid.add(i)
            else:
                m = unit.layout.master_numel
                nbytes = unit.stream.nbytes + unit.frozen.nbytes
                with self.lanes.span(i, S.H2D, S.LOAD, nbytes, self.h2d if self.cuda else None):
                    slot.buf[:m].copy_(unit.stream, non_blocking=self.cuda)
                    if slot.compute is not slot.buf:  # the fp32 master streamed: cast it here, off the compute stream
                        slot.compute[:m].copy_(slot.buf[:m])
                    if m < n:  # frozen parameters without a master: their compute-dtype copy
                        slot.compute[m:n].copy_(unit.frozen, non_blocking=self.cuda)
                if cache is not None:  # the rest of the step takes them from here (same stream: in order)
                    cache.weights[i].copy_(slot.compute[:n])
                    cache.valid.add(i)
            if not cached:
                self.store.ranks.broadcast_(slot.compute[:n], i)  # to the ranks that do not own it
            if self.cuda:
                slot.ready.record(self.h2d)

    def reads_file(self, i: int) -> bool:
        """Whether loading unit i reads its copy from its file (file-backed, and not on the device already)."""
        if not self.store.units[i].on_disk:
            return False
        return not (self.step_cache is not None and i in self.step_cache and i in self.step_cache.valid)

    def drop_copy_reads(self) -> None:
        """Gives back the copy tiles of reads no pass will consume."""
        for future in self._copy_reads.values():
            try:
                self.store.nvme.release_copy(future.result())
            except Exception:  # a failed read already gave its tile back
                pass
        self._copy_reads.clear()



class _StreamedTrunk(torch.autograd.Function):
    """Autograd bridge: Lightning's ordinary loss.backward() reaches the engine's streamed backward."""

    @staticmethod
    def forward(ctx, engine: StreamingEngine, x: Tensor, anchor: Tensor, *extras: Tensor) -> Tensor:
        dev = engine.device.type
        ctx.engine, ctx.extras = engine, extras
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        out, ctx.checkpoints, ctx.replay = engine._forward(x, extras, keep=True)
        if engine.after_forward is not None:
            engine.after_forward()
        # traced: what the compute stream runs between the trunk's forward and its backward (the head and the loss,
        # whose gradient the fused loss forms in forward) is the resident unit's span
        ctx.trace = engine.trace
        ctx.mark = engine.trace.mark() if engine.trace is not None else None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.mark is not None and ctx.trace is ctx.engine.trace:
            ctx.trace.since(ctx.mark, -1, S.COMPUTE, S.RESIDENT)
        ctx.trace = ctx.mark = None
        grad_x = ctx.engine._backward(ctx.checkpoints, ctx.replay, ctx.extras, grad, ctx.autocast)
        ctx.checkpoints = None
        return (None, grad_x, None, *([None] * len(ctx.extras)))
