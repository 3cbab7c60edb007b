"""Units whose optimizer state is also kept in device memory: their AdamW runs on the device.

With gradient clipping, no update can start before backward has produced the last gradient (the global norm
needs them all), and the host's AdamW (memory-bound, ~28 bytes per parameter) then outlasts the next forward it
could hide behind (H200 box, llama-3.2-3b at 32 x 1024 tokens: ~1.0 s of host AdamW against a 0.31 s forward,
docs/performance.md). Device memory the engine does not use can hold the [master | m | v | grad]
tiles of the first units in forward order, which the next forward needs first: their gradients accumulate there
(no D2H), their update is one fused kernel on the device, and their weights are cast from the device master (no
H2D). The host keeps every other unit, whose updates still hide behind the next forward.

The host store stays the authority: after each update the device state is written through to the host tile on
its own D2H stream, so a flush (checkpoint, validation, end of fit) finds the store complete; after the store is
changed from outside (checkpoint load) `load()` copies it back in.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import torch
from torch import Tensor

from megatrain_lightning import schedule as S
from megatrain_lightning.storage.store import HostStore

WRITE_CHUNK = 64 * 2**20  # fp32 elements (256 MiB, ~5 ms at 55 GB/s) per write-through copy


class DeviceStates:
    def __init__(self, store: HostStore, units: list[int], device: torch.device) -> None:
        self.store, self.device, self.units = store, device, set(units)
        self.cuda = device.type == "cuda"
        self.tiles = {i: torch.empty(store.units[i].layout.tile_numel, dtype=torch.float32, device=device)
                      for i in sorted(self.units)}  # [master | m | v | grad], like the host tile
        self._parts = {i: store.units[i].layout.split_state(t) for i, t in self.tiles.items()}
        self._grad_views = {i: store.units[i].layout.views(self._parts[i][3]) for i in self.tiles}
        # frozen parameters kept in the compute dtype alone (no master): their device copy, made once
        self._copy_only = {i: torch.empty(u.layout.numel - u.layout.master_numel, dtype=store.compute_dtype,
                                          device=device) for i, u in ((i, store.units[i]) for i in sorted(self.units))
                           if u.layout.numel > u.layout.master_numel}
        if self.cuda:
            self.d2h = torch.cuda.Stream(device)
            self.updated = torch.cuda.Event()  # the last device update finished (the compute stream)
            self.saved = {i: torch.cuda.Event() for i in self.units}  # its write-through finished
            for i in self.units:  # the write-through DMA needs the host state page-locked
                store.units[i].lock_tile()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="megatrain-write-through",
                                          initializer=torch.cuda.set_device, initargs=(device,)) if self.cuda else None
        self._writer: Future | None = None  # the running write-through
        self.trace_of = lambda: None  # where write-through spans are recorded (the engine's current trace)
        self.load()

    def __contains__(self, unit: int) -> bool:
        return unit in self.units

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.tiles.values(), *self._copy_only.values()))

    def parts(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Unit i's flat fp32 master, Adam m, Adam v and gradient on the device."""
        return self._parts[i]

    def master(self, i: int) -> Tensor:
        return self._parts[i][0]

    def copy_only(self, i: int) -> Tensor:
        """Unit i's frozen parameters without a master, compute dtype, on the device."""
        return self._copy_only[i]

    def load(self) -> None:
        """Copies [master | m | v] of every kept unit from the host store (at setup, and after the store changed)."""
        self.sync()
        for i, tile in self.tiles.items():
            n = self.store.units[i].layout.state_numel
            tile[:n].copy_(self.store.units[i].tile[:n])  # synchronous: the host tile may change next
            if i in self._copy_only:
                unit = self.store.units[i]
                self._copy_only[i].copy_(unit.frozen)

    def land(self, i: int, grads, fresh: bool) -> None:
        """Adds (or, for a step's first micro-batch, writes) one unit's gradients (device, compute dtype, its
        trainable parameters in layout order; None: the loss did not reach it) into its fp32 gradient, on the current stream."""
        layout = self.store.units[i].layout
        views = self._grad_views[i]
        for entry, g in zip(layout.trainable_entries, grads):
            if g is None:
                if fresh:
                    views[entry.name].zero_()
            elif fresh:
                views[entry.name].copy_(g)
            else:
                views[entry.name].add_(g)

    def before_update(self) -> None:
        """The compute stream waits for the last write-through of every kept unit (an update overwrites its state)."""
        self._wait_writer()
        if self.cuda:
            for event in self.saved.values():
                torch.cuda.current_stream().wait_event(event)

    def after_update(self) -> None:
        """Marks the update done and starts writing every kept unit's new state through to the host store."""
        if not self.cuda:
            for i, tile in self.tiles.items():
                n = self.store.units[i].layout.state_numel
                self.store.units[i].tile[:n].copy_(tile[:n])
                self.store.units[i].refresh_stream()
            return
        self.updated.record()
        self._writer = self._thread.submit(self._write_through, self.trace_of())

    def _write_through(self, trace) -> None:
        """On its own thread: copies the kept state out in WRITE_CHUNK pieces, one in flight at a time. Copies to the
        host share one copy engine in submission order: submitted all at once, the ~12 bytes per kept parameter
        would queue ahead of every later D2H copy (checkpoint offloads, gradients, even a loss's .item()) until
        done; one piece at a time, those wait for at most one piece."""
        self.d2h.wait_event(self.updated)
        done = torch.cuda.Event(blocking=True)  # the thread sleeps in synchronize instead of spinning a core
        for i, tile in self.tiles.items():
            unit = self.store.units[i]
            n, state = unit.layout.master_numel, unit.layout.state_numel
            span = trace.device_span(i, S.D2H, S.STATE, 4 * state, self.d2h) if trace else nullcontext()
            pieces = [(unit.tile[:state], tile[:state], lo) for lo in range(0, state, WRITE_CHUNK)]  # not the grad
            if unit.stream is not unit.master:  # the streamed copy too (read by a flush or a checkpoint)
                pieces += [(unit.stream, tile[:n], lo) for lo in range(0, n, WRITE_CHUNK)]
            with torch.cuda.stream(self.d2h), span:
                for host, dev, lo in pieces:
                    hi = min(lo + WRITE_CHUNK, dev.numel())
                    host[lo:hi].copy_(dev[lo:hi], non_blocking=True)
                    done.record(self.d2h)
                    done.synchronize()
            self.saved[i].record(self.d2h)

    def _wait_writer(self) -> None:
        if self._writer is not None:
            self._writer.result()
            self._writer = None

    def sync(self) -> None:
        """Blocks until every write-through reached the host."""
        self._wait_writer()
        if self.cuda:
            self.d2h.synchronize()


class StepCache:
    """What the device keeps for the length of one optimizer step, for units whose state stays on the host, so that
    Lightning's `accumulate_grad_batches` amortizes: weights do not change within a step, and gradients only need
    their sum.

    - weights: a trunk layer's compute-dtype weights, as its first load of the step brought them; every later load
      of the step (the recompute, later micro-batches) copies them on the device instead of crossing PCIe again;
    - gradient sums (fp32): a later micro-batch adds on the device instead of shipping its gradients for the host to
      add (a full host pass per micro-batch: 2.4 Gparam/s on the H200 box's 16 cores), and the step's last ships
      the sum once, straight into the host fp32 gradient buffer.

    Per step a cached unit's weights cross PCIe once and its gradients once, whatever the number of micro-batches;
    with several ranks every rank caches the same units (the others' too), so that a cached unit is broadcast once
    and its sum reduced once per step.
    `invalidate()` after each update (and after the store changes) drops the weights."""

    def __init__(self, store: HostStore, units: list[int], device: torch.device, n_trunk: int) -> None:
        self.store, self.units = store, set(units)
        self.sums = {i: torch.empty(store.units[i].layout.trainable, dtype=torch.float32, device=device)
                     for i in sorted(self.units)}
        self.weights = {i: torch.empty(store.units[i].layout.numel, dtype=store.compute_dtype, device=device)
                        for i in sorted(self.units) if i < n_trunk}  # the resident unit's copy is always there
        self._views = {i: store.units[i].layout.views(t) for i, t in self.sums.items()}
        self.valid: set[int] = set()  # units whose weights this step has already loaded
        self._shipped: dict[int, torch.cuda.Event] = {}  # the last step's D2H of the sum (it is overwritten next)

    def __contains__(self, unit: int) -> bool:
        return unit in self.units

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.sums.values(), *self.weights.values()))

    @staticmethod
    def unit_bytes(trainable: int, numel: int, compute_bytes: int, trunk: bool) -> int:
        """Device bytes of one cached unit (schedule.device_units' input)."""
        return S.DEVICE_GRAD_BYTES * trainable + (compute_bytes * numel if trunk else 0)

    def invalidate(self) -> None:
        self.valid.clear()

    def land(self, i: int, grads, fresh: bool) -> None:
        """Writes (a step's first micro-batch) or adds one unit's gradients into its sum, on the current stream."""
        if fresh and i in self._shipped:
            torch.cuda.current_stream().wait_event(self._shipped.pop(i))
        layout = self.store.units[i].layout
        for entry, g in zip(layout.trainable_entries, grads):
            view = self._views[i][entry.name]
            if g is None:
                if fresh:
                    view.zero_()
            elif fresh:
                view.copy_(g)
            else:
                view.add_(g)

    def flat(self, i: int) -> Tensor:
        """Unit i's whole gradient sum ([trainable] fp32)."""
        return self.sums[i]

    def grads(self, i: int) -> list[Tensor]:
        """Unit i's summed gradients, its trainable parameters in layout order."""
        return [self._views[i][e.name] for e in self.store.units[i].layout.trainable_entries]

    def shipped(self, i: int, event: torch.cuda.Event | None) -> None:
        """The sum's copy to the host was issued: the next step's first landing waits for `event`."""
        if event is not None:
            self._shipped[i] = event
