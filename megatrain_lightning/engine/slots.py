"""The device's weight slots and the prefetcher that fills them: a layer's weights are loaded into a free slot as
many layers ahead of the pass as there are free slots (streaming.py runs the passes)."""

from __future__ import annotations

import torch
from torch import Tensor

from megatrain_lightning import schedule as S

class Slot:
    """A device buffer that holds one layer's weights (and their compute-dtype cast when the fp32 master streams)."""

    def __init__(self, numel: int, dtype: torch.dtype, compute_dtype: torch.dtype, device: torch.device,
                 cuda: bool) -> None:
        self.buf = torch.empty(numel, dtype=dtype, device=device)  # what the H2D copy fills
        self.compute = self.buf if dtype == compute_dtype else torch.empty(numel, dtype=compute_dtype, device=device)
        self.ready = torch.cuda.Event() if cuda else None  # H2D into buf finished
        self.free = torch.cuda.Event() if cuda else None  # compute finished reading buf


class Prefetcher:
    """Loads layers in a pass's order into free slots, as many ahead as there are free slots; file-backed layers'
    copies are read from their files further ahead, into the tier's pinned copy tiles."""

    def __init__(self, engine, order: list[int]) -> None:  # the StreamingEngine whose slots these are
        self.engine, self.order, self.next = engine, order, 0
        self.loaded: dict[int, Slot] = {}
        self.read_to = 0  # order positions below this have had their file read issued (where they need one)
        engine.drop_copy_reads()  # a pass that ended early (an error) left reads: their tiles go back

    def start(self) -> None:
        """Issues the first loads now (backward: while the kept blocks run, which hold their own slots)."""
        self._fill()

    def _read_ahead(self) -> None:
        eng, tier = self.engine, self.engine.store.nvme
        if tier is None:
            return
        # fewer unconsumed reads than copy tiles: a read can always get a tile (one is free or its DMA ends)
        while self.read_to < len(self.order) and len(eng._copy_reads) < S.NVME_COPY_BUFFERS - 1:
            i = self.order[self.read_to]
            self.read_to += 1
            if eng.reads_file(i):
                after = eng.updater.pending.get((i, 0)) if eng.updater is not None else None
                eng._copy_reads[i] = tier.read_copy(i, after)

    def _fill(self) -> None:
        eng = self.engine
        self._read_ahead()
        while self.next < len(self.order) and eng._free:
            slot = eng._free.pop()
            eng._load(self.order[self.next], slot)
            self.loaded[self.next] = slot
            self.next += 1
            self._read_ahead()
        eng.peak_resident_layers = max(eng.peak_resident_layers, len(eng._slots) - len(eng._free))

    def acquire(self, pos: int) -> Slot:
        self._fill()
        slot = self.loaded.pop(pos)  # KeyError here would mean the schedule needs more slots than exist
        if slot.ready is not None:
            torch.cuda.current_stream().wait_event(slot.ready)
        return slot

    def release(self, slot: Slot) -> None:
        if slot.free is not None:
            slot.free.record(torch.cuda.current_stream())
        self.engine._free.append(slot)
        self._fill()


def alias(view: Tensor) -> Tensor:
    return torch.empty(0, dtype=view.dtype, device=view.device).set_(view.untyped_storage(), view.storage_offset(),
                                                                    view.shape, view.stride())
