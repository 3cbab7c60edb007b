"""Host AdamW: the user's own Adam/AdamW, re-pointed at the store's flat fp32 buffers.

The optimizer object the user returned from `configure_optimizers` stays the one Lightning and the LR
schedulers see (so schedules, `gradient_clip_val` and checkpoints of hyperparameters work unchanged);
only its parameters become views of the host fp32 masters, its state becomes views of the store's Adam
moments, and it runs PyTorch's fused CPU kernel.
"""

from __future__ import annotations

import contextlib
import functools
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim.adam import adam

from megatrain_lightning import schedule as S
from megatrain_lightning.errors import UserError
from megatrain_lightning.storage.nvme import pieces as nvme_pieces
from megatrain_lightning.storage.store import HostStore

SUPPORTED = (torch.optim.AdamW, torch.optim.Adam)


def bind_optimizer(optimizer: torch.optim.Optimizer, store: HostStore,
                   param_names: dict[int, str]) -> list[tuple[Tensor, Tensor]]:
    """Re-points `optimizer` at the store. `param_names` maps id(parameter) of the module as the user's
    `configure_optimizers` saw it to the parameter's full name in the store. Returns (host parameter,
    gradient view) pairs for `bind_grads`.

    `optimizer.step` becomes a `HostAdam` (the update runs unit by unit on a host thread, overlapped with the device;
    `attach` it to the engine). Parameters, moments and gradients of file-backed units are placeholders (shape only,
    every element one NaN) outside their update, which points them at the unit's tile read from its file."""
    if type(optimizer) not in SUPPORTED:
        raise TypeError(
            f"the megatrain strategy runs the optimizer on the host and supports "
            f"{', '.join(c.__name__ for c in SUPPORTED)} (from torch.optim); got {type(optimizer).__name__}")
    pairs = []
    bound: list[_Bound] = []
    for g_index, group in enumerate(optimizer.param_groups):
        if group.get("amsgrad"):
            raise UserError("the megatrain strategy does not support amsgrad=True")
        if group.get("differentiable") or group.get("capturable"):
            raise UserError("the megatrain strategy does not support differentiable or capturable Adam")
        host_params = []
        for p in group["params"]:
            name = param_names.get(id(p))
            if name is None:
                raise UserError("the optimizer holds a tensor that is not a parameter of the LightningModule")
            if not p.requires_grad:
                # frozen: PyTorch's optimizers skip a parameter without a gradient (no step, no weight decay, no
                # state); the store gives it neither moments nor a gradient buffer
                continue
            i, entry = store.index[name]
            unit = store.units[i]
            if unit.on_disk or unit.remote:  # remote: another rank updates it (ranks.py)
                host, m, v, grad = (_placeholder(entry.shape) for _ in range(4))
            else:
                grad = unit.grad[entry.offset:entry.offset + entry.numel].view(entry.shape)
                host, m, v = (buf[entry.offset:entry.offset + entry.numel].view(entry.shape)
                              for buf in (unit.master, unit.exp_avg, unit.exp_avg_sq))
            step = torch.zeros((), dtype=torch.float32)
            host_params.append(host)
            pairs.append((host, grad))
            bound.append(_Bound(i, unit.layout.entries.index(entry), g_index, host, grad, m, v, step))
            optimizer.state[host] = {"step": step, "exp_avg": m, "exp_avg_sq": v}
        group["params"] = host_params
        group["fused"], group["foreach"] = True, False  # PyTorch's fused CPU Adam(W) kernel
    optimizer.defaults["fused"], optimizer.defaults["foreach"] = True, False
    for p in list(optimizer.state):  # drop any state of the device parameters
        if not any(p is q for g in optimizer.param_groups for q in g["params"]):
            del optimizer.state[p]
    optimizer.step = HostAdam(optimizer, store, bound)
    return pairs


def bind_grads(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """Points each host parameter's .grad at its slice of the fp32 gradient buffers (Lightning's zero_grad
    sets .grad to None; the buffers themselves are reset by the engine's `fresh_grads`)."""
    for p, g in pairs:
        p.grad = g


def _run_closure(closure: Callable | None) -> Any:
    """What torch.optim's step does with a closure: forward and backward with grad enabled, the loss returned."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def square_norm(g: Tensor) -> Tensor:
    return torch.dot(g.reshape(-1), g.reshape(-1))  # a dot product runs on every core (vector_norm's does not)


def clip_scale(squares: list[Tensor], max_norm: float) -> tuple[Tensor, Tensor]:
    """clip_grad_norm_'s coefficient c = min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖² the sum of `squares` (host
    scalars), returned with ‖g‖ as the fused kernel's grad_scale 1 / c: the update divides each gradient by it
    instead of a separate pass over every gradient (fp32 rounding apart, the same)."""
    total = torch.stack(squares).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total, (1.0 / coef).reshape(())


@dataclass
class _Bound:
    unit: int  # store unit index
    entry: int  # index in the unit's layout
    group: int  # optimizer param group
    param: Tensor
    grad: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: Tensor
    norm: Tensor | None = None  # this step's squared gradient 2-norm, computed on the host thread for clipping


def _fused_adam(bounds: list[_Bound], steps: list[Tensor], hp: list[dict],
                clip: tuple[str, Tensor | float] | None) -> None:
    """One Adam(W) step of `bounds` (host or device tensors alike; `steps` their step counts on the same device):
    a value clip clamps the gradients first, a norm clip's 1 / c goes in as the kernel's grad_scale."""
    scale = None
    if clip is not None and clip[0] == "norm":
        scale = clip[1].to(bounds[0].param.device)
    elif clip is not None:
        grads = [b.grad for b in bounds]
        torch._foreach_clamp_min_(grads, -clip[1])
        torch._foreach_clamp_max_(grads, clip[1])
    for g_index in sorted({b.group for b in bounds}):
        idx = [k for k, b in enumerate(bounds) if b.group == g_index]
        h = {k: (float(v) if isinstance(v, Tensor) else v) for k, v in hp[g_index].items()}  # host scalars
        adam([bounds[k].param for k in idx], [bounds[k].grad for k in idx], [bounds[k].exp_avg for k in idx],
             [bounds[k].exp_avg_sq for k in idx], [], [steps[k] for k in idx], fused=True,
             decoupled_weight_decay=h["decoupled"], amsgrad=False, beta1=float(h["betas"][0]),
             beta2=float(h["betas"][1]), lr=h["lr"], weight_decay=h["weight_decay"], eps=h["eps"],
             maximize=h["maximize"], grad_scale=scale, found_inf=None)


HP_KEYS = ("lr", "betas", "weight_decay", "eps", "maximize")


class HostAdam:
    """Replaces `optimizer.step`: the same fused Adam(W) kernel the optimizer runs,
    called unit by unit on the engine's host thread so that the update overlaps device work.

    - deferred (the default, and whenever gradients are clipped or hooks see them): `step()` runs the closure
      (forward, backward, hooks, clipping) and queues the updates in forward order; the next forward's weight
      load of unit i waits only for unit i's update.
    - eager (no clipping and no hook that could read or change gradients): a unit's update is queued as soon as
      its gradient of the step's last micro-batch has landed, behind the device's backward.

    Adam(W) is element-wise, so per-unit calls give exactly the numbers of one call over everything; clipping
    takes `clip_grad_norm_`'s coefficient and applies it inside the fused kernel (fp32 rounding apart, the same).
    The resident unit updates in two parts: its first tensor (the embedding, needed first) and the rest.

    Units whose state the device keeps (`attach_device`, device_state.py) leave the host's order: they update on the
    device in one fused call per parameter group, after the closure, with the same hyperparameters and coefficient.

    File-backed units (storage=nvme) update in the same order: the host thread takes the unit's [master | m | v |
    grad] tile read from its file (deferred updates read NVME_BUFFERS - 1 units ahead), points the unit's
    placeholders at it, updates, and hands it to the tier's writer, which writes the state and the new streamed
    copy behind; the next forward's read of the copy follows the write. Their gradients' norms are taken as the
    gradients go to their files (`note_norms`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, store: HostStore, bound: list[_Bound]) -> None:
        functools.update_wrapper(self, optimizer.step)  # keeps the LR scheduler's marker on the wrapped step
        self.optimizer, self.step, self.store, self.bound = optimizer, optimizer.step, store, bound
        resident = len(store.units) - 1
        self.parts: dict[tuple[int, int], list[_Bound]] = {}
        for b in bound:
            part = int(b.unit == resident and b.entry > 0)
            self.parts.setdefault((b.unit, part), []).append(b)
        # forward order: embedding, trunk layers, then the rest of the resident unit (final norm, head); this rank's
        # units only (`parts` keeps the others' too: their ranges are the same on every rank)
        self.order = sorted((k for k in self.parts if not store.units[k[0]].remote),
                            key=lambda k: (0 if k == (resident, 0) else 2 if k[0] == resident else 1, k))
        self._remote_steps = [b.step for b in bound if store.units[b.unit].remote]  # counted here, updated elsewhere
        self._ranges = {key: _span(store.units[key[0]], part) for key, part in self.parts.items()}
        self.pending: dict[tuple[int, int], Future] = {}
        self.executor = None  # the engine's host thread (`attach`)
        self.trace_of: Callable[[], Any] = lambda: None
        self.eager = self.need_norms = False
        self.eager_steps = 0  # steps whose updates started during backward (tests and logs read it)
        self._hp: list[dict] | None = None  # hyperparameters of the step being applied
        self._clip: tuple[str, Tensor | float] | None = None
        self.tier = store.nvme  # the file-backed tier, if any
        # file-backed units update piece by piece (nvme.pieces): [lo, hi) of their trainable elements
        self._pieces = {i: nvme_pieces([e.numel for e in u.layout.trainable_entries])
                        for i, u in enumerate(store.units) if u.on_disk}
        self._reads: dict[tuple[int, int], Future] = {}  # (unit, lo) -> its piece's tile, read ahead of the update
        self._read_next: list[tuple[int, int, int]] = []  # pieces still to be read ahead, in this step's order
        self.device = None  # device_state.DeviceStates: units updated on the device (`attach_device`)
        self._kept: list[_Bound] = []  # their parameters, as views of the device tiles
        self._kept_steps: Tensor | None = None  # the device's copy of their step counts (the fused kernel's input)

    def attach(self, executor, trace_of: Callable[[], Any]) -> None:
        self.executor, self.trace_of = executor, trace_of

    def attach_device(self, states) -> None:
        """Units in `states` update on the device, in one fused call per parameter group after the closure; their
        step counts stay in the host optimizer state (what checkpoints save) and are copied in per step."""
        self.device = states
        self._kept = []
        views = {i: [self.store.units[i].layout.views(t) for t in states.parts(i)] for i in states.units}
        for b in self.bound:
            if b.unit in states:
                name = self.store.units[b.unit].layout.entries[b.entry].name
                master, m, v, grad = (part[name] for part in views[b.unit])
                self._kept.append(_Bound(b.unit, b.entry, b.group, master, grad, m, v, b.step))
        self._kept_steps = torch.zeros(len(self._kept), dtype=torch.float32, device=states.device)
        self.order = [k for k in self.order if k[0] not in states]
        self.parts = {k: v for k, v in self.parts.items() if k[0] not in states}

    def begin_step(self, eager: bool, need_norms: bool) -> None:
        """Before the closure of an optimizer step (main thread): how this step's updates run. The hyperparameters
        are read now, as `optimizer.step` would read them (the LR scheduler steps only after it)."""
        self.eager, self.need_norms = eager, need_norms
        self.eager_steps += eager
        self._hp = self._snapshot()
        for b in self.bound:
            b.norm = None

    def after_landing(self, unit: int) -> Future:
        """Called by the engine once a unit's gradient of the step's last micro-batch is queued to land: queues the
        unit's norms (for clipping) and, when eager, its update behind it on the same host thread."""
        future = self.executor.submit(self._final, unit, self._hp, self.need_norms, self.eager, self.trace_of())
        if self.eager:
            for part in (0, 1):
                if (unit, part) in self.parts:
                    self.pending[(unit, part)] = future
        return future

    def note_norms(self, unit: int, grad: Tensor) -> None:
        """A file-backed unit's complete gradient (flat, on the host thread, before it goes to its file): the squared
        norms clipping will need."""
        entries = self.store.units[unit].layout.entries
        for b in self.parts.get((unit, 0), []):
            e = entries[b.entry]
            b.norm = square_norm(grad[e.offset:e.offset + e.numel])

    def _final(self, unit: int, hp: list[dict], need_norms: bool, eager: bool, trace) -> None:
        keys = [(unit, part) for part in (0, 1) if (unit, part) in self.parts]
        if need_norms and not self.store.units[unit].on_disk:  # a file-backed unit's were taken on the way out
            for key in keys:
                for b in self.parts[key]:
                    b.norm = square_norm(b.grad)
        if eager:
            for key in keys:
                self._update(key, hp, None, trace)

    # ---- clipping (Lightning's precision plugin calls these instead of touching .grad) ----
    def clip_by_norm(self, max_norm: float) -> Tensor:
        self.wait_all()
        kept = self.device.units if self.device is not None else ()
        for i in {b.unit for b in self.bound if b.norm is None and self.store.units[b.unit].on_disk}:
            self.note_norms(i, self.tier.load_grad(i))  # not taken on the way out (clipping called by user code)
        remote = {i for i, u in enumerate(self.store.units) if u.remote}
        squares = [b.norm if b.norm is not None else square_norm(b.grad) for b in self.bound
                   if b.unit not in kept and b.unit not in remote]
        if self._kept:  # one synchronization: backward has to have ended anyway
            squares.append(torch.stack([square_norm(b.grad) for b in self._kept]).sum().cpu())
        local = torch.stack(squares).sum() if squares else torch.zeros(())
        total, scale = clip_scale([self.store.ranks.sum_units(local)], max_norm)  # over every rank's units
        self._clip = ("norm", scale)
        return total

    def clip_by_value(self, value: float) -> None:
        self._clip = ("value", float(value))

    # ---- the step ----
    def __call__(self, closure: Callable | None = None) -> Any:
        loss = _run_closure(closure)
        grads = [(p, p.grad) for g in self.optimizer.param_groups for p in g["params"]]
        for p, _ in grads:
            p.grad = None
        self.step()  # the optimizer's own step with no gradients: only its hooks and the scheduler's marker
        for p, g in grads:
            p.grad = g
        hp, clip = (self._hp, None) if self.eager else (self._snapshot(), self._clip)  # as optimizer.step reads them
        if self._kept:
            self._update_kept(hp, clip)
        if not self.eager:
            # every gradient has gone to its file by now (post_backward waited): file reads may start ahead
            self._read_next = [(k[0], lo, hi) for k in self.order if k[0] in self._pieces
                               for lo, hi in self._pieces[k[0]]]
            for key in self.order:
                self.pending[key] = self.executor.submit(self._update, key, hp, clip, self.trace_of())
        if self._remote_steps:  # the step counts of other ranks' parameters (checkpoints save rank 0's)
            torch._foreach_add_(self._remote_steps, 1.0)
        self._hp, self._clip, self.eager = None, None, False
        return loss

    def _snapshot(self) -> list[dict]:
        return [{k: (g[k].clone() if isinstance(g[k], Tensor) else g[k]) for k in HP_KEYS} |
                {"decoupled": g.get("decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW))}
                for g in self.optimizer.param_groups]

    def _update(self, key: tuple[int, int], hp: list[dict], clip: tuple[str, Tensor | float] | None,
                trace=None) -> None:
        """Applies one step to one unit part (on the host thread); `trace` is the trace active when it was queued."""
        bound = self.parts[key]
        start = time.perf_counter()
        unit = self.store.units[key[0]]
        if unit.on_disk:
            self._update_file_backed(key[0], bound, hp, clip)
        else:
            _fused_adam(bound, [b.step for b in bound], hp, clip)
        if unit.stream is not unit.master:  # cast the updated part into the streamed copy
            lo, hi = _span(unit, bound)
            unit.stream[lo:hi].copy_(unit.master[lo:hi])
        if trace is not None:
            nbytes = 28 * sum(b.param.numel() for b in bound)  # AdamW reads p, g, m, v and writes p, m, v (fp32)
            trace.add_host(key[0], S.CPU, S.OPTIMIZER, start, time.perf_counter(), nbytes)

    def _update_file_backed(self, i: int, bound: list[_Bound], hp: list[dict],
                            clip: tuple[str, Tensor | float] | None) -> None:
        tier, entries = self.tier, self.store.units[i].layout.entries
        for lo, hi in self._pieces[i]:
            future = self._reads.pop((i, lo), None)
            if future is None:  # not read ahead (eager updates run as gradients land: nothing later is on disk yet)
                if (i, lo, hi) in self._read_next:
                    self._read_next.remove((i, lo, hi))
                future = tier.read(i, lo, hi)
            while self._read_next and len(self._reads) < tier.n_buffers - 1:
                j, jlo, jhi = self._read_next.pop(0)
                self._reads[(j, jlo)] = tier.read(j, jlo, jhi)
            tile = tier.take(future)  # [master | m | v | grad] of the piece, n long each
            n = hi - lo
            part = [b for b in bound if lo <= entries[b.entry].offset < hi]
            try:
                for b in part:
                    at = entries[b.entry].offset - lo
                    for k, x in enumerate((b.param, b.exp_avg, b.exp_avg_sq, b.grad)):
                        _point(x, tile, k * n + at)
                _fused_adam(part, [b.step for b in part], hp, clip)
            except BaseException:
                tier.release(tile)  # not updated: nothing to write back
                raise
            finally:
                for b in part:
                    for x in (b.param, b.exp_avg, b.exp_avg_sq, b.grad):
                        _placeholder(x.shape, x)
            tier.write(i, lo, hi, tile)

    def _update_kept(self, hp: list[dict], clip: tuple[str, Tensor | float] | None) -> None:
        """One step of the units the device keeps, on the device's current stream; then their write-through."""
        states, kept = self.device, self._kept
        trace = self.trace_of()
        states.before_update()
        nbytes = 28 * sum(b.param.numel() for b in kept)
        with trace.device_span(-1, S.COMPUTE, S.OPTIMIZER, nbytes) if trace is not None else contextlib.nullcontext():
            counts = torch.stack([b.step for b in kept])
            if states.cuda:  # page-locked, so the copy does not wait for the device to finish backward
                counts = counts.pin_memory()
            self._kept_steps.copy_(counts, non_blocking=states.cuda)
            _fused_adam(kept, list(self._kept_steps.unbind()), hp, clip)
            torch._foreach_add_([b.step for b in kept], 1.0)  # the host counts stay the truth
        states.after_update()

    def wait(self, unit: int, part: int | None = None) -> None:
        """Blocks until the queued update of `unit` (or one part of it) has been applied."""
        for p in ((0, 1) if part is None else (part,)):
            f = self.pending.pop((unit, p), None)
            if f is not None:
                f.result()

    def wait_all(self) -> None:
        for key in list(self.pending):
            self.pending.pop(key).result()
        if self.tier is not None:
            self.tier.flush()

    def part_range(self, unit: int, part: int) -> tuple[int, int]:
        """[lo, hi) of a unit part in its flat layout."""
        return self._ranges.get((unit, part), (0, 0))


def _span(unit, bound: list[_Bound]) -> tuple[int, int]:
    if not bound:
        return 0, 0
    entries = unit.layout.entries
    idx = sorted(b.entry for b in bound)
    lo, hi = entries[idx[0]].offset, entries[idx[-1]].offset + entries[idx[-1]].numel
    return lo, hi


_NAN = torch.full((1,), float("nan"))


def _placeholder(shape: torch.Size, t: Tensor | None = None) -> Tensor:
    """`t` (or a new tensor) made of `shape` with every element aliasing one NaN: reading it is loud, writing it
    raises."""
    t = torch.empty(0) if t is None else t
    with torch.no_grad():
        t.set_(_NAN.untyped_storage(), 0, shape, (0,) * len(shape))
    return t


def _point(t: Tensor, flat: Tensor, offset: int) -> None:
    """Makes `t` (same shape) a contiguous view of `flat` starting at element `offset`."""
    with torch.no_grad():
        t.set_(flat.untyped_storage(), flat.storage_offset() + offset, t.shape)
