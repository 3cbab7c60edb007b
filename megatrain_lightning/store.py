"""Host-side authoritative training state, one contiguous unit per layer.

Each unit (one trunk block, or the resident rest of the model: embedding, final norm, head) holds:

- one fp32 tile [master | adam m | adam v | grad], each a flat buffer of the unit's parameters in a fixed layout;
- `stream`: the compute-dtype copy of the weights that is copied to the device in one DMA (pinned when CUDA is used);
- `staging`: where the device's compute-dtype gradients land (pinned), before the host adds them into `grad`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
    def __init__(self, layout: Layout, compute_dtype: torch.dtype, pin: bool) -> None:
        n = layout.numel
        self.layout = layout
        self.tile = torch.zeros(4 * n, dtype=torch.float32)  # [master | m | v | grad]
        self.master, self.exp_avg, self.exp_avg_sq, self.grad = self.tile.split(n)
        self.stream = torch.empty(n, dtype=compute_dtype, pin_memory=pin)
        self.staging = torch.empty(n, dtype=compute_dtype, pin_memory=pin)

    @property
    def nbytes(self) -> int:
        return self.tile.nbytes + self.stream.nbytes + self.staging.nbytes

    def refresh_stream(self) -> None:
        self.stream.copy_(self.master)  # cast fp32 -> compute dtype (a plain copy in fp32)


class HostStore:
    """All units of a model: `units[i]` is trunk block i, `units[-1]` the resident part."""

    def __init__(self, compute_dtype: torch.dtype, pin: bool) -> None:
        self.compute_dtype = compute_dtype
        self.pin = pin
        self.units: list[Unit] = []
        self.names: list[str] = []  # each unit's name prefix in the LightningModule ("model.model.layers.3.")

    def add(self, prefix: str, named_tensors: list[tuple[str, Tensor]]) -> Unit:
        """Adds a unit and copies the given (materialized) tensors into its fp32 master."""
        unit = Unit(Layout([(n, t.shape) for n, t in named_tensors]), self.compute_dtype, self.pin)
        views = unit.layout.views(unit.master)
        with torch.no_grad():
            for name, tensor in named_tensors:
                views[name].copy_(tensor)
        unit.refresh_stream()
        self.units.append(unit)
        self.names.append(prefix)
        return unit

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)

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
