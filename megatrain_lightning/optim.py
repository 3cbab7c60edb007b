"""Host AdamW: the user's own Adam/AdamW, re-pointed at the store's flat fp32 buffers.

The optimizer object the user returned from `configure_optimizers` stays the one Lightning and the LR
schedulers see (so schedules, `gradient_clip_val` and checkpoints of hyperparameters work unchanged);
only its parameters become views of the host fp32 masters, its state becomes views of the store's Adam
moments, and it runs PyTorch's fused CPU kernel.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from megatrain_lightning.store import HostStore

SUPPORTED = (torch.optim.AdamW, torch.optim.Adam)


def bind_optimizer(optimizer: torch.optim.Optimizer, store: HostStore,
                   param_names: dict[int, str]) -> list[tuple[Tensor, Tensor]]:
    """Re-points `optimizer` at the store. `param_names` maps id(parameter) of the module as the user's
    `configure_optimizers` saw it to the parameter's full name in the store. Returns (host parameter,
    gradient view) pairs for `bind_grads`.

    Parameters of file-backed units are placeholders (shape only, every element one NaN) outside the
    optimizer step; `PagedStep` points them at their state while it updates their unit."""
    if type(optimizer) not in SUPPORTED:
        raise TypeError(
            f"the megatrain strategy runs the optimizer on the host and supports "
            f"{', '.join(c.__name__ for c in SUPPORTED)} (from torch.optim); got {type(optimizer).__name__}")
    pairs = []
    paged: dict[int, list[_Paged]] = {}
    for group in optimizer.param_groups:
        if group.get("amsgrad"):
            raise ValueError("the megatrain strategy does not support amsgrad=True")
        if group.get("differentiable") or group.get("capturable"):
            raise ValueError("the megatrain strategy does not support differentiable or capturable Adam")
        host_params = []
        for p in group["params"]:
            name = param_names.get(id(p))
            if name is None:
                raise ValueError("the optimizer holds a tensor that is not a parameter of the LightningModule")
            i, entry = store.index[name]
            unit = store.units[i]
            grad = unit.grad[entry.offset:entry.offset + entry.numel].view(entry.shape)
            if unit.on_disk:
                host, m, v = (_placeholder(entry.shape) for _ in range(3))
                paged.setdefault(i, []).append(_Paged(entry.offset, host, m, v, grad))
            else:
                host, m, v = (buf[entry.offset:entry.offset + entry.numel].view(entry.shape)
                              for buf in (unit.master, unit.exp_avg, unit.exp_avg_sq))
            host_params.append(host)
            pairs.append((host, grad))
            optimizer.state[host] = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": m, "exp_avg_sq": v}
        group["params"] = host_params
        group["fused"], group["foreach"] = True, False  # PyTorch's fused CPU Adam(W) kernel
    optimizer.defaults["fused"], optimizer.defaults["foreach"] = True, False
    for p in list(optimizer.state):  # drop any state of the device parameters
        if not any(p is q for g in optimizer.param_groups for q in g["params"]):
            del optimizer.state[p]
    if paged:
        optimizer.step = PagedStep(optimizer, store, paged)
    return pairs


def bind_grads(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """Points each host parameter's .grad at its slice of the fp32 gradient buffers (Lightning's zero_grad
    sets .grad to None; the buffers themselves are reset by the engine's `fresh_grads`)."""
    for p, g in pairs:
        p.grad = g


@dataclass
class _Paged:
    offset: int  # in the unit's flat layout
    param: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    grad: Tensor  # its view of the unit's RAM gradient


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


class PagedStep:
    """Replaces `optimizer.step` when some units are file-backed. It runs the closure (forward, backward,
    clipping), then the optimizer's own step over the RAM units' parameters, then, unit by unit, the same step
    over each file-backed unit's parameters pointed at its state read from disk, writing it back behind.
    AdamW is element-wise, so stepping in parts gives exactly the numbers of one step over everything."""

    def __init__(self, optimizer: torch.optim.Optimizer, store: HostStore, paged: dict[int, list[_Paged]]) -> None:
        functools.update_wrapper(self, optimizer.step)  # keeps the LR scheduler's marker on the wrapped step
        self.optimizer, self.step, self.store, self.paged = optimizer, optimizer.step, store, paged
        self.order = sorted(paged)  # the planner's order too: file-backed layers first to last
        self.on_disk = {id(b.param) for bindings in paged.values() for b in bindings}

    def __call__(self, closure: Callable | None = None) -> Any:
        tier = self.store.nvme
        ahead: deque = deque()
        todo = deque(self.order)

        def read_ahead() -> None:
            while todo and len(ahead) < tier.n_buffers - 1:
                i = todo.popleft()
                ahead.append((i, tier.read(i)))

        read_ahead()  # the first reads run while the closure computes
        try:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            # each step below updates exactly the parameters that have a gradient at the time
            grads = [(p, p.grad) for g in self.optimizer.param_groups for p in g["params"]]
            for p, _ in grads:
                if id(p) in self.on_disk:
                    p.grad = None
            self.step()  # every RAM unit at once
            for p, _ in grads:
                p.grad = None
            while ahead:
                i, future = ahead.popleft()
                tile = tier.take(future)
                unit = self.store.units[i]
                n = unit.layout.numel
                try:
                    for b in self.paged[i]:
                        _point(b.param, tile, b.offset)
                        _point(b.exp_avg, tile, n + b.offset)
                        _point(b.exp_avg_sq, tile, 2 * n + b.offset)
                        b.param.grad = b.grad
                    self.step()
                except BaseException:
                    tier.release(tile)  # not updated: nothing to write back
                    raise
                finally:
                    for b in self.paged[i]:
                        b.param.grad = None
                        for t in (b.param, b.exp_avg, b.exp_avg_sq):
                            _placeholder(t.shape, t)
                unit.refresh_stream(tile[:n])
                tier.write(i, tile)
                read_ahead()
            for p, g in grads:
                p.grad = g
            return loss
        finally:
            for _, future in ahead:  # an exception left reads in flight: give their tiles back
                try:
                    tier.release(future.result())
                except Exception:
                    pass
