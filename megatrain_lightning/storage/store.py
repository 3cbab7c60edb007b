"""Host-side authoritative training state, one contiguous unit per layer.

Each unit (one trunk block, or the resident rest of the model: embedding, final norm, head) holds:

- one fp32 tile [master | adam m | adam v | grad], each a flat buffer of the unit's parameters in a fixed layout;
  a file-backed unit (`storage=nvme`) has nothing in RAM: its tile and streamed copy are a file (`nvme.py`);
- `stream`: what is copied to the device in one DMA (pinned when CUDA is used). With `stream="copy"` it is a
  compute-dtype copy of the weights (2 more bytes per parameter in bf16, half the PCIe bytes); with
  `stream="master"` it is the fp32 master itself, registered with CUDA in place, and the device casts it.

A file-backed unit streams a compute-dtype copy kept in its file, read into the tier's pinned window.

Gradients of a step's first micro-batch land in `grad` by DMA (it is page-locked); those of later micro-batches go
through the engine's small pinned staging ring, and the host adds them into `grad`.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from megatrain_lightning.errors import UserError
from megatrain_lightning.options import DEFAULT_NVME_DIR
from megatrain_lightning.storage.host_memory import pinned_empty, register as _register
from megatrain_lightning.storage.nvme import NvmeTier, pieces as nvme_pieces
from megatrain_lightning.parallel.ranks import Ranks


STREAMS = ("copy", "master")


@dataclass(frozen=True)
class Entry:
    name: str
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()


class Layout:
    """Where each named parameter sits inside a unit's flat buffers: packed in module order, trainable parameters
    first. Frozen ones (`frozen`: requires_grad=False) follow them, so the Adam moments and the gradient, which only
    trainable parameters have, are the first `trainable` elements of the same layout (a frozen base model under
    LoRA adapters then costs 4 bytes per parameter of host state instead of 16)."""

    def __init__(self, named_shapes: list[tuple[str, torch.Size]], frozen: set[str] | frozenset = frozenset()) -> None:
        ordered = [x for x in named_shapes if x[0] not in frozen] + [x for x in named_shapes if x[0] in frozen]
        self.entries: list[Entry] = []
        offset = 0
        for name, shape in ordered:
            self.entries.append(Entry(name, offset, torch.Size(shape)))
            offset += torch.Size(shape).numel()
        self.numel = offset
        self.n_trainable = sum(name not in frozen for name, _ in named_shapes)
        self.trainable = sum(e.numel for e in self.entries[:self.n_trainable])  # elements of moments and gradient
        self.signature = tuple((e.name, tuple(e.shape)) for e in self.entries)

    @property
    def trainable_entries(self) -> list[Entry]:
        return self.entries[:self.n_trainable]

    @property
    def state_numel(self) -> int:
        """fp32 elements of [master | m | v]: the master of every parameter, the moments of the trainable ones."""
        return self.numel + 2 * self.trainable

    @property
    def tile_numel(self) -> int:
        """fp32 elements of [master | m | v | grad]."""
        return self.numel + 3 * self.trainable

    def split_state(self, flat: Tensor) -> tuple[Tensor, ...]:
        """[master | m | v | grad] as its four parts, or [master | m | v] as its three (four, the last empty, when
        nothing is trainable: the two are then the same size)."""
        n, t = self.numel, self.trainable
        if flat.numel() not in (self.state_numel, self.tile_numel):
            raise ValueError(f"a buffer of {flat.numel()} elements is not a state or tile of this layout")
        return tuple(flat.split([n, t, t, t] if flat.numel() == self.tile_numel else [n, t, t]))

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Named views of a flat buffer of every parameter (`numel`: masters, weights) or of the trainable ones
        (`trainable`: moments, gradients)."""
        if flat.numel() == self.numel:
            entries = self.entries
        elif flat.numel() == self.trainable:
            entries = self.trainable_entries
        else:
            raise ValueError(f"a buffer of {flat.numel()} elements is not one of this layout ({self.numel} "
                             f"parameters, {self.trainable} trainable)")
        return {e.name: flat[e.offset:e.offset + e.numel].view(e.shape) for e in entries}


class Unit:
    def __init__(self, layout: Layout, stream: Tensor | None, pin: bool, on_disk: bool = False,
                 remote: bool = False) -> None:
        n, t = layout.numel, layout.trainable
        self.layout, self.on_disk, self.remote = layout, on_disk, remote
        self._lock: weakref.finalize | None = None  # the page-lock of the gradient or of the whole tile
        self._tile_locked = False
        # on_disk: everything lives in its file (nvme.py); the tier's window holds it while it is used. remote:
        # another rank holds it (ranks.py)
        if on_disk or remote:
            self.tile = self.grad = self.master = self.exp_avg = self.exp_avg_sq = self.stream = None
            return
        self.tile = torch.zeros(layout.tile_numel, dtype=torch.float32)  # [master | m | v | grad]
        self.master, self.exp_avg, self.exp_avg_sq, self.grad = layout.split_state(self.tile)
        # page-locked where it is (the pinned allocator would round up to 2^k): the gradient, which lands by DMA,
        # and the master too when it is what streams (then the whole tile: one registration, no shared pages)
        if stream is None:
            self.stream = self.master
            if pin and n:
                self._lock, self._tile_locked = _register(self.tile), True
        else:
            self.stream = stream  # compute-dtype weights, a slice of the store's one pinned block
            if pin and t:
                self._lock = _register(self.grad)

    def lock_tile(self) -> None:
        """Page-locks the whole tile, for DMA of master, m and v too (device_state.py's write-through). The gradient
        alone may share a page with v: it is unlocked first, since a page can be registered only once."""
        if self._lock is not None and not self._tile_locked:
            self._lock()  # unregister the gradient now
            self._lock, self._tile_locked = _register(self.tile), True

    def refresh_stream(self, master: Tensor | None = None) -> None:
        """Casts the fp32 master (or, for a file-backed unit, the given loaded one) into the streamed copy."""
        master = self.master if master is None else master
        if master is not None and self.stream is not None and self.stream is not master:
            self.stream.copy_(master)  # cast fp32 -> compute dtype


def available_ram_bytes() -> int:
    """What the OS can still give this process (MemAvailable), or all physical memory where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class HostStore:
    """All units of a model: `units[i]` is trunk block i, `units[-1]` the resident part. The streamed copies of
    units in RAM share one page-locked allocation. `nvme_units` (trunk indices) keep all their state in files under
    `nvme_dir` (one directory, or a list striped over). With several ranks (`ranks`), the units another rank owns are
    `remote`: their layout only."""

    def __init__(self, layouts: list[Layout], names: list[str], compute_dtype: torch.dtype, pin: bool,
                 stream: str = "copy", nvme_units: Sequence[int] = (), nvme_dir: str | Path | Sequence[str | Path] | None = None,
                 ranks: Ranks | None = None) -> None:
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
        self.compute_dtype = compute_dtype
        self.stream = "master" if compute_dtype == torch.float32 else stream  # in fp32 a copy would be a duplicate
        self.stream_dtype = torch.float32 if self.stream == "master" else compute_dtype
        self.names = names  # each unit's name prefix in the LightningModule ("model.model.layers.3.")
        on_disk = set(nvme_units)
        if len(layouts) - 1 in on_disk:
            raise ValueError("the resident unit cannot be file-backed")
        self.ranks = ranks if ranks is not None else Ranks.single(len(layouts))
        remote = {i for i in range(len(layouts)) if not self.ranks.owns(i)}
        copied = [i for i in range(len(layouts)) if self.stream == "copy" and i not in on_disk | remote]
        self._streams = pinned_empty(sum(layouts[i].numel for i in copied), self.stream_dtype, pin)
        self.units: list[Unit] = []
        offset = 0
        for i, layout in enumerate(layouts):
            copy = None
            if i in copied:
                copy = self._streams[offset:offset + layout.numel]
                offset += layout.numel
            self.units.append(Unit(layout, copy, pin, on_disk=i in on_disk, remote=i in remote))
        self.nvme = None
        if on_disk:
            piece = max([hi - lo for i in on_disk
                         for lo, hi in nvme_pieces([e.numel for e in layouts[i].trainable_entries])], default=0)
            self.nvme = NvmeTier(nvme_dir or DEFAULT_NVME_DIR,
                                 {i: (layouts[i].numel, layouts[i].state_numel, layouts[i].tile_numel) for i in on_disk},
                                 compute_dtype, pin, max_piece=piece)
        # full parameter name -> (unit index, entry)
        self.index = {prefix + e.name: (i, e) for i, (prefix, u) in enumerate(zip(names, self.units))
                      for e in u.layout.entries}

    def fill(self, index: int, named_tensors: list[tuple[str, Tensor]]) -> None:
        """Copies a unit's (materialized) tensors into its fp32 master (Adam moments zero) and its streamed copy
        (nothing for a remote unit)."""
        unit = self.units[index]
        if unit.remote:
            return
        n = unit.layout.numel
        state = torch.zeros(unit.layout.state_numel, dtype=torch.float32) if unit.on_disk \
            else unit.tile[:unit.layout.state_numel]
        views = unit.layout.views(state[:n])
        with torch.no_grad():
            for name, tensor in named_tensors:
                views[name].copy_(tensor)
        self.write_state(index, state)

    def read_state(self, index: int) -> Tensor:
        """A unit's [master | m | v] as one flat fp32 tensor: a live view for a RAM unit, a copy read from its file
        for a file-backed one."""
        unit = self.units[index]
        if unit.on_disk:
            return self.nvme.load(index)
        return unit.tile[:unit.layout.state_numel]

    def write_state(self, index: int, state: Tensor) -> None:
        """Replaces a unit's [master | m | v] and refreshes its streamed copy."""
        unit = self.units[index]
        if unit.on_disk:
            self.nvme.store(index, state)
        elif state.data_ptr() != unit.tile.data_ptr():
            unit.tile[:unit.layout.state_numel].copy_(state)
        unit.refresh_stream(state[:unit.layout.numel])

    @property
    def nbytes(self) -> int:
        window = self.nvme.nbytes if self.nvme else 0
        return sum(u.tile.nbytes for u in self.units if u.tile is not None) + self._streams.nbytes + window

    @property
    def n_params(self) -> int:
        return sum(u.layout.numel for u in self.units)

    def master_of(self, name: str) -> Tensor:
        """One parameter's fp32 master: a view for a RAM unit, a copy read from its file for a file-backed one."""
        i, entry = self.index[name]
        unit = self.units[i]
        if unit.remote:
            raise UserError(f"{name} is held by rank {self.ranks.owners[i]} of {self.ranks.world}: with several ranks "
                            "the trained weights are read from a checkpoint (trainer.save_checkpoint), which "
                            "every rank writes its part of")
        if unit.on_disk:
            return self.nvme.load_master(i, entry.offset, entry.numel).view(entry.shape)
        return unit.master[entry.offset:entry.offset + entry.numel].view(entry.shape)

    def named(self, which: str = "master") -> dict[str, Tensor]:
        """Full-name tensors of one of 'master', 'exp_avg', 'exp_avg_sq', 'grad' (the last three: trainable parameters
        only): views into RAM units, and copies read from disk for file-backed units (writing to those changes
        nothing); this rank's units only."""
        part = {"master": 0, "exp_avg": 1, "exp_avg_sq": 2}
        out: dict[str, Tensor] = {}
        for i, (prefix, unit) in enumerate(zip(self.names, self.units)):
            if unit.remote:
                continue
            if unit.on_disk:
                flat = self.nvme.load_grad(i) if which == "grad" else \
                    unit.layout.split_state(self.read_state(i))[part[which]]
            else:
                flat = getattr(unit, which)
            for name, view in unit.layout.views(flat).items():
                out[prefix + name] = view
        return out
