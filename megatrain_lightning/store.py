"""Host-side authoritative training state, one contiguous unit per layer.

Each unit (one trunk block, or the resident rest of the model: embedding, final norm, head) holds:

- one fp32 tile [master | adam m | adam v | grad], each a flat buffer of the unit's parameters in a fixed layout;
- `stream`: what is copied to the device in one DMA (pinned when CUDA is used). With `stream="copy"` it is a
  compute-dtype copy of the weights (2 more bytes per parameter in bf16, half the PCIe bytes); with
  `stream="master"` it is the fp32 master itself, registered with CUDA in place, and the device casts it.

Gradients coming back land in the engine's small pinned staging ring before the host adds them into `grad`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor


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
    """Where each named parameter sits inside a unit's flat buffers (packed, in module order)."""

    def __init__(self, named_shapes: list[tuple[str, torch.Size]]) -> None:
        self.entries: list[Entry] = []
        offset = 0
        for name, shape in named_shapes:
            self.entries.append(Entry(name, offset, torch.Size(shape)))
            offset += torch.Size(shape).numel()
        self.numel = offset
        self.signature = tuple((e.name, tuple(e.shape)) for e in self.entries)

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        return {e.name: flat[e.offset:e.offset + e.numel].view(e.shape) for e in self.entries}


class Unit:
    def __init__(self, layout: Layout, stream: Tensor | None, pin: bool) -> None:
        n = layout.numel
        self.layout = layout
        self.tile = torch.zeros(4 * n, dtype=torch.float32)  # [master | m | v | grad]
        self.master, self.exp_avg, self.exp_avg_sq, self.grad = self.tile.split(n)
        if stream is None:  # the master streams: pin it where it is (the pinned allocator would round up to 2^k)
            self.stream = self.master
            if pin and n:
                _register(self.master)
        else:
            self.stream = stream  # compute-dtype weights, a slice of the store's one pinned block

    def refresh_stream(self) -> None:
        if self.stream is not self.master:
            self.stream.copy_(self.master)  # cast fp32 -> compute dtype


def pinned_empty(numel: int, dtype: torch.dtype, pin: bool) -> Tensor:
    """A host buffer of exactly `numel` elements, page-locked when `pin` (PyTorch's pinned allocator would round
    the request up to a power of two: up to 2x the RAM)."""
    t = torch.empty(numel, dtype=dtype)
    if pin and numel:
        _register(t)
    return t


def _register(t: Tensor) -> None:
    """Page-locks `t`'s memory for asynchronous DMA until `t`'s storage is freed."""
    cudart = torch.cuda.cudart()
    ptr, nbytes = t.data_ptr(), t.nbytes
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.1f} GiB failed ({err}): the OS refused to page-lock "
                           "host memory for transfers (check `ulimit -l` and free RAM)")
    weakref.finalize(t.untyped_storage(), cudart.cudaHostUnregister, ptr)


class HostStore:
    """All units of a model: `units[i]` is trunk block i, `units[-1]` the resident part. The streamed copies of
    all units share one page-locked allocation."""

    def __init__(self, layouts: list[Layout], names: list[str], compute_dtype: torch.dtype, pin: bool,
                 stream: str = "copy") -> None:
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
        self.compute_dtype = compute_dtype
        self.stream = "master" if compute_dtype == torch.float32 else stream  # in fp32 a copy would be a duplicate
        self.stream_dtype = torch.float32 if self.stream == "master" else compute_dtype
        self.names = names  # each unit's name prefix in the LightningModule ("model.model.layers.3.")
        total = sum(lay.numel for lay in layouts) if self.stream == "copy" else 0
        self._streams = pinned_empty(total, compute_dtype, pin)
        self.units: list[Unit] = []
        offset = 0
        for layout in layouts:
            copy = self._streams[offset:offset + layout.numel] if self.stream == "copy" else None
            self.units.append(Unit(layout, copy, pin))
            offset += layout.numel if copy is not None else 0

    def fill(self, index: int, named_tensors: list[tuple[str, Tensor]]) -> None:
        """Copies a unit's (materialized) tensors into its fp32 master and its streamed copy."""
        unit = self.units[index]
        views = unit.layout.views(unit.master)
        with torch.no_grad():
            for name, tensor in named_tensors:
                views[name].copy_(tensor)
        unit.refresh_stream()

    @property
    def nbytes(self) -> int:
        return sum(u.tile.nbytes for u in self.units) + self._streams.nbytes

    @property
    def n_params(self) -> int:
        return sum(u.layout.numel for u in self.units)

    def named(self, which: str = "master") -> dict[str, Tensor]:
        """Full-name views of one of the flat buffers ('master', 'exp_avg', 'exp_avg_sq', 'grad')."""
        out: dict[str, Tensor] = {}
        for prefix, unit in zip(self.names, self.units):
            for name, view in unit.layout.views(getattr(unit, which)).items():
                out[prefix + name] = view
        return out
