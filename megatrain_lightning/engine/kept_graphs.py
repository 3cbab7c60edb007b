"""Keeping activations: the last blocks of a training step keep their forward's autograd graph, and their weights'
slots, until backward reaches them, instead of dropping both and loading and recomputing the block there. The last
blocks because their activations live shortest (from their forward to the first steps of backward).

How many: `keep_activations` blocks, or (None, on CUDA with one rank) as many as fit beside the first step's peak:
that step keeps none, measures one recomputed block's activations, and the next step's first forward decides
(schedule.blocks_to_keep, the planner's rule too). A step the batch sweep cuts into chunks keeps none: its memory is
the sweep's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from megatrain_lightning import schedule as S

log = logging.getLogger(__name__)


@dataclass
class KeptLayer:
    """One layer's forward graph: its input (a leaf), its output, its trainable parameters (leaves) and the slot
    holding its weights."""

    h_in: Tensor
    out: Tensor
    trainable: list[Tensor]
    slot: object

    def backward(self, grad: Tensor) -> tuple[Tensor | None, ...]:
        """The gradients of the layer's input and trainable parameters."""
        return torch.autograd.grad(self.out, [self.h_in, *self.trainable], grad, allow_unused=True)


class KeptGraphs:
    def __init__(self, device: torch.device, n_blocks: int, requested: int | None, ranks: int = 1) -> None:
        self.device, self.n_blocks = device, n_blocks
        # decided: an explicit count, or nothing to measure (the CPU's memory is the host's; several ranks would have
        # to agree on a count measured on each)
        auto = requested is None and device.type == "cuda" and ranks == 1
        self.blocks = min(requested or 0, n_blocks)
        self.decided = not auto
        self.block_bytes: int | None = None  # measured: one recomputed block's activations
        self.layers: dict[int, KeptLayer] = {}
        self._before: int | None = None

    def for_step(self, whole: bool) -> int:
        """Blocks kept in a training step (none when the batch sweep cuts it)."""
        return self.blocks if whole else 0

    def drop(self) -> list:
        """Forgets graphs a backward never consumed (a step that stopped between forward and backward); returns their
        slots."""
        slots = [k.slot for k in self.layers.values()]
        self.layers.clear()
        return slots

    # ---- auto: measure one block, then decide ----
    @property
    def measuring(self) -> bool:
        return not self.decided and self.block_bytes is None

    def measure_start(self) -> None:
        if self.measuring:
            self._before = torch.cuda.memory_allocated(self.device)

    def measure_end(self) -> None:
        if self.measuring and self._before is not None:
            self.block_bytes = torch.cuda.memory_allocated(self.device) - self._before
            self._before = None

    def decide(self, slot_bytes_per_block: int) -> None:
        """Before a training forward: once a block was measured, how many the device has room for beside the peak
        so far (the first step's)."""
        if self.decided or self.block_bytes is None:
            return
        free, _ = torch.cuda.mem_get_info(self.device)
        capacity = free + torch.cuda.memory_reserved(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.blocks = S.blocks_to_keep(self.n_blocks, capacity, peak, self.block_bytes + slot_bytes_per_block)
        self.decided = True
        log.info(f"keep_activations: the last {self.blocks} of {self.n_blocks} blocks keep their activations "
                 f"({self.block_bytes / 2**30:.2f} GiB each, measured, and {slot_bytes_per_block / 2**30:.2f} GiB of "
                 f"weight slots; peak so far {peak / 2**30:.1f} of {capacity / 2**30:.1f} GiB)")
