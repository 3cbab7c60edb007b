"""Host-side authoritative training state, one contiguous unit per layer.

Each unit (one trunk block, or the resident rest of the model: embedding, final norm, head) holds:

- one fp32 tile [master | adam m | adam v | grad], each a flat buffer of the unit's parameters in a fixed layout;
  a file-backed unit (`storage=nvme`) has nothing in RAM: its tile and streamed copy are a file (`nvme.py`);
  frozen parameters held in the compute dtype (a bf16 base model under LoRA) have no master: the streamed copy is
  their only home (2 bytes a parameter, not 4 + 2);
- `stream`: what is copied to the device in one DMA (pinned when CUDA is used). With `stream="copy"` it is a
  compute-dtype copy of the weights (2 more bytes per parameter in bf16, half the PCIe bytes); with
  `stream="master"` it is the fp32 master itself, registered with CUDA in place, and the device casts it;
- `frozen`: the frozen parameters without a master, in the compute dtype (a second DMA); in `stream="copy"` it
  follows `stream` in the same pinned block.

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
    LoRA adapters then costs 4 bytes per parameter of host state instead of 16). Last come the frozen ones kept in
    the compute dtype only (`in_copy`, a subset of `frozen`): they have no fp32 master, so the master is the first
    `master_numel` elements of the layout and the streamed copy all `numel`."""

    def __init__(self, named_shapes: list[tuple[str, torch.Size]], frozen: set[str] | frozenset = frozenset(),
                 in_copy: set[str] | frozenset = frozenset()) -> None:
        if not set(in_copy) <= set(frozen):
            raise ValueError(f"only frozen parameters can be kept in the copy alone: {sorted(set(in_copy) - set(frozen))}")
        rank = {name: 2 if name in in_copy else 1 if name in frozen else 0 for name, _ in named_shapes}
        ordered = sorted(named_shapes, key=lambda x: rank[x[0]])  # stable: module order within each group
        self.entries: list[Entry] = []
        offset = 0
        for name, shape in ordered:
            self.entries.append(Entry(name, offset, torch.Size(shape)))
            offset += torch.Size(shape).numel()
        self.numel = offset
        self.n_trainable = sum(r == 0 for r in rank.values())
        self.n_master = sum(r < 2 for r in rank.values())
        self.trainable = sum(e.numel for e in self.entries[:self.n_trainable])  # elements of moments and gradient
        self.master_numel = sum(e.numel for e in self.entries[:self.n_master])  # elements with an fp32 master
        self.signature = tuple((e.name, tuple(e.shape)) for e in self.entries)

    @property
    def trainable_entries(self) -> list[Entry]:
        return self.entries[:self.n_trainable]

    @property
    def master_entries(self) -> list[Entry]:
        return self.entries[:self.n_master]

    @property
    def copy_only_entries(self) -> list[Entry]:
        """Frozen parameters whose one home is the streamed copy (compute dtype)."""
        return self.entries[self.n_master:]

    @property
    def state_numel(self) -> int:
        """fp32 elements of [master | m | v]: the master of every parameter that has one, the moments of the
        trainable ones."""
        return self.master_numel + 2 * self.trainable

    @property
    def tile_numel(self) -> int:
        """fp32 elements of [master | m | v | grad]."""
        return self.master_numel + 3 * self.trainable

    def split_state(self, flat: Tensor) -> tuple[Tensor, ...]:
        """[master | m | v | grad] as its four parts, or [master | m | v] as its three (four, the last empty, when
        nothing is trainable: the two are then the same size)."""
        n, t = self.master_numel, self.trainable
        if flat.numel() not in (self.state_numel, self.tile_numel):
            raise ValueError(f"a buffer of {flat.numel()} elements is not a state or tile of this layout")
        return tuple(flat.split([n, t, t, t] if flat.numel() == self.tile_numel else [n, t, t]))

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Named views of a flat buffer of every parameter (`numel`: weights, the streamed copy), of those with a
        master (`master_numel`) or of the trainable ones (`trainable`: moments, gradients)."""
        if flat.numel() == self.numel:
            entries = self.entries
        elif flat.numel() == self.master_numel:
            entries = self.master_entries
        elif flat.numel() == self.trainable:
            entries = self.trainable_entries
        else:
            raise ValueError(f"a buffer of {flat.numel()} elements is not one of this layout ({self.numel} "
                             f"parameters, {self.master_numel} with a master, {self.trainable} trainable)")
        return {e.name: flat[e.offset:e.offset + e.numel].view(e.shape) for e in entries}


class Unit:
    def __init__(self, layout: Layout, copy: Tensor | None, pin: bool, on_disk: bool = False,
                 remote: bool = False, master_streams: bool = False) -> None:
        """`copy`: this unit's compute-dtype slice of the store's pinned block: the streamed copy of every parameter
        (`numel`), or with `master_streams` the frozen parameters without a master alone."""
        n, t = layout.master_numel, layout.trainable
        self.layout, self.on_disk, self.remote = layout, on_disk, remote
        self._lock: weakref.finalize | None = None  # the page-lock of the gradient or of the whole tile
        self._tile_locked = False
        # on_disk: everything lives in its file (nvme.py); the tier's window holds it while it is used. remote:
        # another rank holds it (ranks.py)
        if on_disk or remote:
            self.tile = self.grad = self.master = self.exp_avg = self.exp_avg_sq = self.stream = self.frozen = None
            return
        self.tile = torch.zeros(layout.tile_numel, dtype=torch.float32)  # [master | m | v | grad]
        self.master, self.exp_avg, self.exp_avg_sq, self.grad = layout.split_state(self.tile)
        # page-locked where it is (the pinned allocator would round up to 2^k): the gradient, which lands by DMA,
        # and the master too when it is what streams (then the whole tile: one registration, no shared pages)
        if master_streams:
            self.stream, self.frozen = self.master, copy
            if pin and n:
                self._lock, self._tile_locked = _register(self.tile), True
        else:
            self.stream, self.frozen = copy[:n], copy[n:]  # compute-dtype weights, slices of the store's pinned block
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
        master_streams = self.stream == "master"
        # one pinned block of every unit's compute-dtype copy (streamed), or only of its frozen parameters that have
        # no master when the master itself streams
        sizes = [0 if i in on_disk | remote else lay.numel - lay.master_numel if master_streams else lay.numel
                 for i, lay in enumerate(layouts)]
        self._streams = pinned_empty(sum(sizes), compute_dtype, pin)
        self.units: list[Unit] = []
        offset = 0
        for i, layout in enumerate(layouts):
            self.units.append(Unit(layout, self._streams[offset:offset + sizes[i]], pin, on_disk=i in on_disk,
                                   remote=i in remote, master_streams=master_streams))
            offset += sizes[i]
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
        state = torch.zeros(unit.layout.state_numel, dtype=torch.float32) if unit.on_disk \
            else unit.tile[:unit.layout.state_numel]
        views = unit.layout.views(state[:unit.layout.master_numel])
        copy_only = {}
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name in views:
                    views[name].copy_(tensor)
                else:
                    copy_only[name] = tensor
        self.write_state(index, state)
        self.write_copy_only(index, copy_only)

    def copy_only(self, index: int) -> dict[str, Tensor]:
        """A unit's frozen parameters that live in its streamed copy alone, by name (compute dtype): views for a
        RAM unit, copies read from its file for a file-backed one."""
        unit = self.units[index]
        entries = unit.layout.copy_only_entries
        if not entries or unit.remote:
            return {}
        m, n = unit.layout.master_numel, unit.layout.numel
        flat = self.nvme.load_copy(index, m, n - m) if unit.on_disk else unit.frozen
        return {e.name: flat[e.offset - m:e.offset - m + e.numel].view(e.shape) for e in entries}

    def write_copy_only(self, index: int, named_tensors: dict[str, Tensor]) -> None:
        """Sets frozen parameters that live in the streamed copy alone (cast to the compute dtype)."""
        unit = self.units[index]
        if not named_tensors or unit.remote:
            return
        if unit.on_disk:
            offsets = {e.name: e.offset for e in unit.layout.copy_only_entries}
            for name, tensor in named_tensors.items():
                self.nvme.store_copy(index, offsets[name], tensor.reshape(-1))
            return
        views = self.copy_only(index)
        with torch.no_grad():
            for name, tensor in named_tensors.items():
                views[name].copy_(tensor.reshape(views[name].shape))

    def set_weight(self, name: str, value: Tensor) -> None:
        """Sets one parameter by its full name (an import): its fp32 master and streamed copy, or its copy alone."""
        i, entry = self.index[name]
        unit = self.units[i]
        if unit.remote:
            return
        if entry.offset >= unit.layout.master_numel:
            self.write_copy_only(i, {entry.name: value})
            return
        value = value.to(torch.float32).reshape(-1)
        if unit.on_disk:  # into the file's master and streamed copy
            self.nvme.store_master(i, entry.offset, value)
            return
        lo, hi = entry.offset, entry.offset + entry.numel
        unit.master[lo:hi].copy_(value)
        if unit.stream is not unit.master:
            unit.stream[lo:hi].copy_(value)

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
        unit.refresh_stream(state[:unit.layout.master_numel])

    @property
    def nbytes(self) -> int:
        window = self.nvme.nbytes if self.nvme else 0
        return sum(u.tile.nbytes for u in self.units if u.tile is not None) + self._streams.nbytes + window

    @property
    def n_params(self) -> int:
        return sum(u.layout.numel for u in self.units)

    def master_of(self, name: str) -> Tensor:
        """One parameter's fp32 master (a frozen one without: its compute-dtype copy): a view for a RAM unit, a copy
        read from its file for a file-backed one."""
        i, entry = self.index[name]
        unit = self.units[i]
        if unit.remote:
            raise UserError(f"{name} is held by rank {self.ranks.owners[i]} of {self.ranks.world}: with several ranks "
                            "the trained weights are read from a checkpoint (trainer.save_checkpoint), which "
                            "every rank writes its part of")
        if entry.offset >= unit.layout.master_numel:
            return self.copy_only(i)[entry.name]
        if unit.on_disk:
            return self.nvme.load_master(i, entry.offset, entry.numel).view(entry.shape)
        return unit.master[entry.offset:entry.offset + entry.numel].view(entry.shape)

    def named(self, which: str = "master") -> dict[str, Tensor]:
        """Full-name tensors of one of 'master', 'exp_avg', 'exp_avg_sq', 'grad' (the last three: trainable parameters
        only; 'master' includes the frozen parameters without one, in the compute dtype): views into RAM units, and
        copies read from disk for file-backed units (writing to those changes nothing); this rank's units only."""
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
            named = {**unit.layout.views(flat), **(self.copy_only(i) if which == "master" else {})}
            for name, view in named.items():
                out[prefix + name] = view
        return out
