"""Each layer's gradients on their way from the device to the host store (the engine's `grads`).

The first micro-batch of a step lands a unit's gradients in its fp32 gradient buffer directly (cast to fp32 on the
device, one DMA per tensor); later ones go through compute-dtype staging buffers (a small ring shared by the trunk's
layers, one buffer for the resident unit) that the engine's host thread adds into fp32. Units whose state the device
keeps, or whose gradient the step cache sums, stay on the device (device_state.py); a file-backed unit's gradient
goes on to its file (nvme.py). With several ranks each rank's gradient is first reduced to the unit's owner, which
alone ships it (ranks.py).
"""

from __future__ import annotations

from concurrent.futures import Future

import torch
from torch import Tensor

from megatrain_lightning import schedule as S
from megatrain_lightning.engine.lanes import Lanes
from megatrain_lightning.storage.store import HostStore, Unit, pinned_empty

ADD_PIECE = 1 << 20  # elements of staged gradients cast to fp32 at a time by the host's add (4 MiB: cache-sized)


class GradShipper:
    def __init__(self, lanes: Lanes, store: HostStore, max_numel: int) -> None:
        """`max_numel`: the largest trunk layer's parameters (a ring slot's size)."""
        self.lanes, self.store, self.cuda = lanes, store, lanes.cuda
        self.updater = None  # optim.HostAdam when the optimizer runs overlapped with the device
        self.device_states = None  # device_state.DeviceStates: units whose state the device keeps
        self.step_cache = None  # device_state.StepCache: units whose weights and gradient sum stay for a step
        staging = pinned_empty(S.staging_numel(max_numel, self.store.units[-1].layout.numel),
                               self.store.compute_dtype, self.cuda)
        self._ring = list(staging[:S.STAGING_RING * max_numel].split(max_numel))
        self._ring_busy: list[Future | None] = [None] * S.STAGING_RING  # the host job still reading each slot
        self._ring_pos = 0
        self._resident_staging = staging[S.STAGING_RING * max_numel:]
        self._pending: list[Future] = []
        self._add_scratch: Tensor | None = None  # the host thread's fp32 piece for adding staged gradients
        self.fresh = True  # the next shipped gradients overwrite the fp32 buffers instead of adding
        self.final = False  # set by the strategy around the closure of the step's last micro-batch

    def ship(self, unit_index: int, grads: tuple[Tensor | None, ...] | list[Tensor | None]) -> None:
        """Sends one unit's gradients (device, compute dtype, its trainable parameters in layout order; None where
        the loss did not reach one) to the host. The first micro-batch
        of a step lands them in the fp32 gradient buffer directly (cast to fp32 on the device, one DMA per
        tensor); later ones go through a compute-dtype staging buffer that the host thread adds into fp32. With
        several ranks, only the unit's owner ships: the mean over the ranks (ranks.py); a step-cached unit's sum
        is reduced once, at the step's last micro-batch."""
        ranks = self.store.ranks
        sums = self.step_cache if self.step_cache is not None and unit_index in self.step_cache else None
        if sums is not None:  # summed on the device over the step's micro-batches; the last one ships the sum
            sums.land(unit_index, grads, fresh=self.fresh)
            if not self.final:
                return
            grads = sums.grads(unit_index)
            if ranks.multi:  # every rank's sum into its owner's, once a step (in place: the sum is flat fp32)
                ranks.reduce_mean_(sums.flat(unit_index), unit_index)
                if self.store.units[unit_index].remote:
                    return
        elif ranks.multi:
            grads = self._reduce(unit_index, grads)
            if grads is None:
                return
        if self.device_states is not None and unit_index in self.device_states:  # never step-cached
            self.device_states.land(unit_index, grads, fresh=self.fresh)  # on the compute stream
            return
        if self.updater is not None:
            self.updater.wait(unit_index)  # never overwrite gradients an update still reads
        self._prune()
        if self.fresh or sums is not None:
            future = self._land(unit_index, grads, sums)
        else:
            future = self._stage(unit_index, grads)
        self._pending.append(future)
        if self.final and self.updater is not None:
            self._pending.append(self.updater.after_landing(unit_index))

    def _reduce(self, unit_index: int, grads) -> list[Tensor] | None:
        """One unit's gradients of this rank summed into its owner's, in fp32 (flat, one collective), as the mean over
        the ranks; None on the other ranks."""
        layout = self.store.units[unit_index].layout
        flat = torch.empty(layout.trainable, dtype=torch.float32, device=self.lanes.device)
        views = layout.views(flat)
        for entry, g in zip(layout.trainable_entries, grads):
            views[entry.name].copy_(g) if g is not None else views[entry.name].zero_()
        self.store.ranks.reduce_mean_(flat, unit_index)
        if self.store.units[unit_index].remote:
            return None
        return [views[e.name] for e in layout.trainable_entries]

    def _land(self, unit_index: int, grads, sums=None) -> Future:
        unit = self.store.units[unit_index]
        # a file-backed unit's gradient lands in a pinned tile of the tier's window, then goes to its file
        tile = self.store.nvme.grad_tile() if unit.on_disk else unit.grad
        flat = tile[:unit.layout.trainable]
        views = unit.layout.views(flat)
        missing = [e.name for e, g in zip(unit.layout.trainable_entries, grads) if g is None]
        done = None
        if self.cuda:
            self.lanes.d2h.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.lanes.d2h), self.lanes.span(unit_index, S.D2H, S.GRAD, flat.nbytes, self.lanes.d2h):
                for entry, g in zip(unit.layout.trainable_entries, grads):
                    if g is not None:
                        views[entry.name].copy_(g.float(), non_blocking=True)  # the cast runs on this stream
                        g.record_stream(self.lanes.d2h)  # keep the allocator from reusing g before the copy ran
            done = torch.cuda.Event()
            done.record(self.lanes.d2h)
        else:
            with self.lanes.span(unit_index, S.D2H, S.GRAD, flat.nbytes):
                for entry, g in zip(unit.layout.trainable_entries, grads):
                    if g is not None:
                        views[entry.name].copy_(g)
        if sums is not None:
            sums.shipped(unit_index, done)
        return self.lanes.worker.submit(self._landed, unit_index, tile, views, missing, done, self._norms_due())

    def _landed(self, unit_index: int, tile: Tensor, views: dict[str, Tensor], missing: list[str],
                done: torch.cuda.Event | None, norms: bool) -> None:
        if done is not None:
            done.synchronize()
        for name in missing:  # a parameter the loss did not reach has a zero gradient
            views[name].zero_()
        if self.store.units[unit_index].on_disk:
            self._to_file(unit_index, tile, norms)

    def _norms_due(self) -> bool:
        """Whether the gradients now shipping are the step's last and clipping by norm needs their norms (a
        file-backed unit's are taken before they go to its file)."""
        return self.final and self.updater is not None and self.updater.need_norms

    def _to_file(self, unit_index: int, grad: Tensor, norms: bool) -> None:
        """A file-backed unit's complete gradient (a whole tile of the window, the gradient at its start): norms taken
        if due, then written."""
        if norms:
            self.updater.note_norms(unit_index, grad)
        self.store.nvme.write_grad(unit_index, grad)

    def _stage(self, unit_index: int, grads) -> Future:
        unit = self.store.units[unit_index]
        if unit_index == len(self.store.units) - 1:
            buf, ring_pos = self._resident_staging[:unit.layout.trainable], None
        else:
            ring_pos = self._ring_pos
            self._ring_pos = (ring_pos + 1) % S.STAGING_RING
            if self._ring_busy[ring_pos] is not None:
                self._ring_busy[ring_pos].result()  # the worker still reads this slot: wait for it
            buf = self._ring[ring_pos][:unit.layout.trainable]
        staging = unit.layout.views(buf)
        nbytes = buf.nbytes
        done = None
        if self.cuda:
            self.lanes.d2h.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.lanes.d2h), self.lanes.span(unit_index, S.D2H, S.GRAD, nbytes, self.lanes.d2h):
                for entry, g in zip(unit.layout.trainable_entries, grads):
                    if g is None:
                        staging[entry.name].zero_()
                    else:
                        staging[entry.name].copy_(g, non_blocking=True)
                        g.record_stream(self.lanes.d2h)
            done = torch.cuda.Event()
            done.record(self.lanes.d2h)
        else:
            with self.lanes.span(unit_index, S.D2H, S.GRAD, nbytes):
                for entry, g in zip(unit.layout.trainable_entries, grads):
                    staging[entry.name].copy_(g) if g is not None else staging[entry.name].zero_()
        future = self.lanes.worker.submit(self._accumulate, unit_index, unit, buf, done, self._norms_due())
        if ring_pos is not None:
            self._ring_busy[ring_pos] = future
        return future

    def _accumulate(self, unit_index: int, unit: Unit, buf: Tensor, done: torch.cuda.Event | None,
                    norms: bool) -> None:
        if done is not None:
            done.synchronize()
        with self.lanes.host_span(unit_index, S.ACCUMULATE, 4 * unit.layout.trainable):
            if unit.on_disk:  # read from its file, added, written back
                def add(grad: Tensor) -> None:
                    self._add_into(grad, buf)
                    if norms:
                        self.updater.note_norms(unit_index, grad)
                self.store.nvme.add_grad(unit_index, add)
            else:
                self._add_into(unit.grad, buf)

    def _add_into(self, grad: Tensor, buf: Tensor) -> None:
        if buf.dtype == torch.float32:
            grad.add_(buf)
            return
        # fp32 += bf16 in one op takes PyTorch's mixed-dtype path, 2.5x slower on the CPU than casting a
        # cache-sized piece into fp32 first and adding that (2-core VM, 1 Mi-element pieces: 0.51 vs 1.5 Gparam/s)
        if self._add_scratch is None:
            self._add_scratch = torch.empty(ADD_PIECE, dtype=torch.float32)
        for lo in range(0, buf.numel(), ADD_PIECE):
            piece = self._add_scratch[:min(ADD_PIECE, buf.numel() - lo)]
            piece.copy_(buf[lo:lo + piece.numel()])
            grad[lo:lo + piece.numel()].add_(piece)

    def _prune(self) -> None:
        """Drops finished host jobs (raising a failed one's error): with eager updates nothing waits for them
        until a flush, so the list would grow for the whole run."""
        done = [f for f in self._pending if f.done()]
        for f in done:
            f.result()
        if done:
            self._pending = [f for f in self._pending if not f.done()]

    def wait(self) -> None:
        """Blocks until every shipped gradient sits in the fp32 buffers (and, on the last micro-batch, its norms and
        any eager update are done)."""
        for f in self._pending:
            f.result()
        self._pending.clear()
        self._ring_busy = [None] * S.STAGING_RING
