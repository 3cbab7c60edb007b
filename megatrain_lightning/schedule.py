"""What happens per layer in one training step, and in which order.

Pure Python: the engine executes this schedule and the planner simulates it, so the two share one
definition of the order of loads, computes and gradient shipments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# Lanes: the resources a step's events occupy (the trace and the planner use the same names).
COMPUTE = "compute"  # the compute device's main stream
H2D = "h2d"  # host -> device copies (weights in)
D2H = "d2h"  # device -> host copies (gradients out)
CPU = "cpu"  # host CPU: gradient accumulation, AdamW, casts of master weights to the streamed copy
NVME_READ = "nvme_read"  # file-backed tier: state read ahead of the optimizer
NVME_WRITE = "nvme_write"  # file-backed tier: state written behind the optimizer
COLLECTIVE = "collective"  # several ranks: broadcasts of weights and reductions of gradients between the GPUs
NETWORK = "network"  # several nodes with replicate_nodes: each unit's gradient summed across the nodes
LANES = (COMPUTE, H2D, D2H, CPU, NVME_READ, NVME_WRITE, COLLECTIVE, NETWORK)

# Pinned host buffers that shipped gradients land in before the host adds them into fp32: a ring shared by
# the trunk's layers. Shipping layer i waits until the host has consumed layer i - STAGING_RING.
STAGING_RING = 4


def staging_numel(max_layer_numel: int, resident_numel: int) -> int:
    """Elements of gradient staging on the host: the ring of trunk-layer buffers plus one for the resident part."""
    return STAGING_RING * max_layer_numel + resident_numel

# Host bytes per trained parameter of the per-layer fp32 state in RAM: master, Adam m and v, gradient. A file-backed
# layer (storage=nvme) keeps all of it, and its streamed copy, in its file (nvme.py): DISK_STATE_BYTES plus the copy.
RAM_STATE_BYTES = 16
DISK_STATE_BYTES = 16
# The file-backed tier's RAM window (nvme.NvmeTier), in tiles of the largest file-backed layer: fp32 optimizer tiles
# [master | m | v | grad] (one being updated, one read ahead, one written behind), pinned compute-dtype copies for the
# weight loads (the slots' loads in flight and reads ahead), pinned fp32 gradients shipped from the device (one
# landing, one being written).
NVME_BUFFERS = 3
NVME_PIECE = 64 * 2**20  # elements: the optimizer's tiles hold whole tensors, grouped up to this many (nvme.pieces)
NVME_COPY_BUFFERS = 4
NVME_GRAD_BUFFERS = 2
# Bytes each file-backed layer moves per optimizer step, per trained parameter (compute-dtype copy of `cb` bytes):
# the forward and the backward read the copy (2 cb), the step's gradient is written once (4; an accumulation's later
# micro-batches read and write it again unless the device sums them), the update reads [master | m | v | grad] (16)
# and writes [master | m | v] and the new copy (12 + cb).
def nvme_read_bytes(cb: int) -> int:
    return 2 * cb + 16


def nvme_write_bytes(cb: int) -> int:
    return 4 + 12 + cb


def nvme_window(max_tile_bytes: float, max_copy_bytes: float, max_grad_bytes: float) -> float:
    """RAM of the file-backed tier's window (nvme.NvmeTier.nbytes, its cast scratch apart), whatever the depth:
    `max_tile_bytes` of the largest optimizer piece's [master | m | v | grad] (16 bytes per element), the largest
    layer's compute-dtype copy and fp32 gradient."""
    return NVME_BUFFERS * max_tile_bytes + NVME_COPY_BUFFERS * max_copy_bytes + NVME_GRAD_BUFFERS * max_grad_bytes


# Block inputs spilled to the drives (block_input_files.py) move in pieces of this many bytes through this many pinned
# host tiles: the RAM they take whatever the batch. The device keeps an input until it is written, at most
# BLOCK_INPUTS_IN_FLIGHT of them (forward then waits for the oldest).
BLOCK_INPUT_PIECE = 64 * 2**20
BLOCK_INPUT_TILES = 8
BLOCK_INPUTS_IN_FLIGHT = 1


def nvme_layers(layer_ram: list[float], fixed_ram: float, budget_bytes: float) -> int:
    """How many trunk layers, counted from the first, keep their state in files so that the state left in RAM fits
    `budget_bytes` (len(layer_ram) when even that does not fit). `layer_ram`: each layer's RAM bytes (fp32 tile and
    streamed copy), all of which its file takes over; `fixed_ram`: what stays in RAM whatever the placement (the
    embedding/head). The tier's window (nvme_window) comes on top of the budget: it does not grow with depth."""
    ram = sum(layer_ram) + fixed_ram
    for n, moved in enumerate(layer_ram):
        if ram <= budget_bytes:
            return n
        ram -= moved
    return len(layer_ram)


def nvme_layers_of_ranks(layer_ram: list[float], fixed_ram: float, budget_bytes: float,
                         owners: Sequence[int], frozen: Sequence[bool] = ()) -> list[int]:
    """The file-backed trunk layers with the units dealt to ranks (`owners`: assign_units'; one rank: all 0): each
    rank, within its share `budget_bytes` of its node's budget, puts the first of its own layers in files
    (nvme_layers over them; the resident unit's state counts for its owner). Wholly frozen layers (`frozen`, per
    layer) go first: on the drives they are only read, where a trained layer's state is also read and written by
    every update. Sorted layer indices."""
    out: list[int] = []
    for r in sorted(set(owners)):
        mine = [i for i in range(len(layer_ram)) if owners[i] == r]
        if frozen:
            mine.sort(key=lambda i: not frozen[i])  # stable: layer order within each kind
        n = nvme_layers([layer_ram[i] for i in mine], fixed_ram if owners[-1] == r else 0, budget_bytes)
        out += mine[:n]
    return sorted(out)


def nvme_floor(fixed_ram: float) -> float:
    """The state that stays in RAM with every layer's in a file (the embedding/head's): a RAM budget below it cannot
    work, whatever the depth."""
    return fixed_ram


def nvme_floor_problem(floor: float, share: float, given_GiB: float | None, ranks_per_node: int) -> str | None:
    """What is wrong when a rank's RAM `share` (bytes) is below the `floor` (nvme_floor), for the field
    storage.ram_budget_GiB (`given_GiB`; None: the automatic budget, all the RAM the rest of the run leaves); None
    when it holds it. The engine (placement.nvme_units) and the planner say the same."""
    if floor <= share:
        return None
    each = f" (a rank's share: {share / 2**30:.3g} GiB)" if ranks_per_node > 1 else ""
    budget = f"{given_GiB:g} GiB{each}" if given_GiB is not None else \
        f"the RAM the run leaves ({share / 2**30:.3g} GiB{' a rank' if ranks_per_node > 1 else ''})"
    return (f"{budget} cannot hold even the state that stays in RAM with every layer on disk "
            f"({floor / 2**30:.3g} GiB: the embedding/head state)")


# Device bytes per parameter of a unit whose state is kept on the device (device_state.py): fp32 master, Adam m and
# v, gradient. Its write-through to the host after each update moves master, m and v.
DEVICE_STATE_BYTES = 16
WRITE_THROUGH_BYTES = 12
# Device bytes per trained parameter of a gradient sum kept on the device for a step (device_state.StepCache; its
# weights add the compute dtype's bytes)
DEVICE_GRAD_BYTES = 4
# device_state_GiB and step_cache_GiB left to None (auto) take this share of the device memory then free: the kept
# state of what the engine leaves, the step cache of what the kept state leaves (placement.py; the planner alike)
AUTO_DEVICE_SHARE = 0.4


def device_units(unit_bytes: list[float], budget_bytes: float, skip: tuple[int, ...] | set[int] = ()) -> list[int]:
    """Units (indices into `unit_bytes`, each unit's fp32 tile: trunk layers, then the resident unit last) whose
    state the device keeps within `budget_bytes`: the resident unit first (its embedding is the forward's first
    need), then trunk layers in forward order (the host's updates of the later ones hide behind the forward of
    these), each taken if it still fits. The same rule picks the units whose gradient sums stay on the device over
    an accumulation (`unit_bytes` then their fp32 gradients, `skip` the units kept whole)."""
    resident = len(unit_bytes) - 1
    chosen, left = [], budget_bytes
    for i in [resident, *range(resident)]:
        if i in skip:
            continue
        need = unit_bytes[i]
        if need <= left:
            chosen.append(i)
            left -= need
    return sorted(chosen)


# The batch sweep: while a layer's weights are on the device it runs the whole batch, a chunk of whole sequences at a
# time, so activation memory is one chunk's while weights cross PCIe twice and gradients once per micro-batch,
# whatever its size. A layer's activations and working set for one chunk, in units of the chunk's input: the planner
# measures ~33x for Llama shapes (autograd's saved tensors plus a layer pass's transients, workload.py); the margin
# covers other blocks. Half of the device memory free at the batch's first forward may go to one chunk.
ACTIVATION_PER_INPUT = 40
CHUNK_MEMORY_SHARE = 0.5

# A compiled block (torch.compile fuses the fp32 norm/RoPE intermediates and the SwiGLU product) holds less than the
# eager count above (autograd's saved tensors plus a pass's transients: 33.3x the input for llama-3.2-3b): its
# recompute + backward peak measured 17.4x at 1 x 262144 tokens and 17.6x at 32 x 1024 on the H200 (bench/kernels.py
# --attention, 2026-12-02; eager 27.7x and 27.9x), 0.52 of the count. The planner scales a compiled block's
# activations and transients by it; eager blocks keep the count (17% over what the GPU showed, on the safe side).
COMPILED_BLOCK_MEMORY_SHARE = 0.52
# A compiled block that keeps its forward's graph for backward (engine/kept_graphs.py) holds its saved tensors and its
# output from its forward to its backward: 0.69 of the eager count, measured on the H200 (llama-3.2-3b untied, 32 x
# 1024: 20 kept blocks raised the step's peak from 61.37 to 127.68 GiB, 3.32 GiB a block of which 0.56 its weight
# slot; 2026-12-03, docs/performance.md). Eager blocks keep the count.
KEPT_BLOCK_MEMORY_SHARE = 0.69


# Attention that materializes its scores (transformers' eager attention: gpt-oss, whose attention sinks have no SDPA
# path) holds per token [heads, T + 1] probabilities for backward (one copy, measured with saved_tensors_hooks in
# tests/test_planner.py) and, while a layer runs, about three more of that size (scores, the logits with the sink
# column, their gradients; counted, not measured on the GPU).
EAGER_SCORES_COPIES = 4
# ... and moves about this many bytes per score element in a forward pass, in units of the element (transformers'
# gpt-oss eager_attention_forward, counted: the scores written, scaled, masked, concatenated with the sink column,
# max-reduced, shifted, softmaxed, sliced and read by the second matmul, each elementwise step a read and a write);
# its backward about as many. Memory-bound: timed at Hardware.hbm_GBps.
EAGER_SCORES_TRAFFIC = 15
# A mixture layer's routed copies (tokens x top-k rows) under transformers' grouped_mm experts: beside the
# intermediate activations a dense MLP of the same active width keeps, each copy keeps the gathered input and the
# down projection's output (2 x hidden in the compute dtype) and this many bytes of sort index, expert id and
# routing weight; the router keeps its fp32 probabilities over every expert. Measured with saved_tensors_hooks on
# transformers' Qwen3-MoE and Mixtral layers (tests/test_planner.py).
ROUTED_COPY_INDEX_BYTES = 34


def chunk_sequences(batch: int, seq_len: int, chunk_tokens: int | None, input_bytes_per_token: int,
                    free_bytes: float, layers: int = 1, scores_bytes_per_token: int = 0) -> int:
    """Sequences per chunk of the sweep. `chunk_tokens` set: that many tokens (at least one sequence); None (auto):
    as many sequences as CHUNK_MEMORY_SHARE of `free_bytes` holds at ACTIVATION_PER_INPUT times their input for each
    of the `layers` (the checkpoint interval) that backward recomputes together, plus EAGER_SCORES_COPIES of
    `scores_bytes_per_token` (one token's saved attention probabilities, 0 unless attention is eager)."""
    if chunk_tokens is not None:
        return max(1, min(batch, chunk_tokens // seq_len))
    if free_bytes == float("inf"):
        return batch
    per_seq = (ACTIVATION_PER_INPUT * input_bytes_per_token + EAGER_SCORES_COPIES * scores_bytes_per_token) \
        * layers * seq_len
    return max(1, min(batch, int(CHUNK_MEMORY_SHARE * free_bytes // per_seq)))


def token_chunk(seq_len: int, chunk_tokens: int | None, input_bytes_per_token: int, free_bytes: float,
                layers: int = 1) -> int | None:
    """Long context: the tokens of one sequence that a block's token-wise part runs at a time (model.Block's
    token_chunk), when even one sequence is more than a chunk of the sweep may hold; None: whole sequences."""
    if chunk_tokens is not None:
        return chunk_tokens if chunk_tokens < seq_len else None
    if free_bytes == float("inf"):
        return None
    fit = int(CHUNK_MEMORY_SHARE * free_bytes // (ACTIVATION_PER_INPUT * layers * input_bytes_per_token))
    return None if fit >= seq_len else max(1, fit)


def chunks(batch: int, per_chunk: int) -> list[tuple[int, int]]:
    """[start, end) sequence ranges of the sweep's chunks."""
    return [(s, min(s + per_chunk, batch)) for s in range(0, batch, per_chunk)]


# Event kinds
FORWARD = "forward"  # a block's forward without autograd (checkpoints kept every K layers)
RECOMPUTE = "recompute"  # a block's forward again, with autograd, in backward
BACKWARD = "backward"  # a block's backward
RESIDENT = "resident"  # embedding / head / loss work outside the trunk
LOAD = "load"  # a layer's weights H2D
GRAD = "grad"  # a layer's gradients D2H
BROADCAST = "broadcast"  # several ranks: a layer's weights from its owner's GPU to the others
REDUCE = "reduce"  # several ranks: a layer's gradients summed into its owner's GPU
ACCUMULATE = "accumulate"  # host adds shipped gradients into fp32 gradient buffers
OPTIMIZER = "optimizer"  # host AdamW
CAST = "cast"  # host casts fp32 masters into the streamed compute-dtype copy
CHECKPOINT = "checkpoint"  # a block input moved to host memory in forward, and back in backward
STATE = "state"  # a device-kept unit's updated state written through to the host (device_state.py)


@dataclass(frozen=True)
class Plan:
    """The order of one step over `n_layers` blocks with checkpoint interval `k`."""

    n_layers: int
    k: int
    kept: int = 0
    """The last `kept` blocks keep their forward's autograd graph for backward: no recompute, no second load."""

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"a trunk needs at least one block, got {self.n_layers}")
        if self.k < 1:
            raise ValueError(f"checkpoint_interval must be >= 1, got {self.k}")
        if not 0 <= self.kept <= len(self.blocks):
            raise ValueError(f"kept blocks must be in [0, {len(self.blocks)}], got {self.kept}")

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """[start, end) layer ranges recomputed together in backward; forward keeps the input of each."""
        return [(s, min(s + self.k, self.n_layers)) for s in range(0, self.n_layers, self.k)]

    def forward_loads(self) -> list[int]:
        return list(range(self.n_layers))

    def backward_loads(self) -> list[int]:
        """Backward walks the recomputed blocks last to first; inside a block the weights load in forward order
        (recompute). Kept blocks' weights stay in their slots from forward."""
        return [j for s, e in reversed(self.blocks[:self.n_checkpoints]) for j in range(s, e)]

    @property
    def n_checkpoints(self) -> int:
        """Blocks whose input waits for backward (the recomputed ones)."""
        return len(self.blocks) - self.kept

    @property
    def first_kept_layer(self) -> int:
        return self.blocks[self.n_checkpoints][0] if self.kept else self.n_layers

    @property
    def kept_layers(self) -> int:
        return self.n_layers - self.first_kept_layer


# Keeping activations (engine.kept_graphs): what the GPU keeps free beside the step's peak, for the allocator's
# fragmentation and what a measurement misses
KEEP_MARGIN_BYTES = 2 * 2**30
KEEP_MARGIN_SHARE = 0.04


def blocks_to_keep(n_blocks: int, capacity_bytes: float, peak_bytes: float, per_block_bytes: float) -> int:
    """How many of the last blocks can keep their forward's graph: each adds its saved activations and its held
    weight slots (`per_block_bytes`) to a step whose peak without keeping was `peak_bytes`, within the device's
    `capacity_bytes` less a margin. The same rule for the engine (measured) and the planner (modelled)."""
    room = capacity_bytes - peak_bytes - max(KEEP_MARGIN_BYTES, KEEP_MARGIN_SHARE * capacity_bytes)
    if room <= 0 or per_block_bytes <= 0:
        return 0
    return min(n_blocks, int(room // per_block_bytes))


def slots_needed(k: int, prefetch_depth: int) -> int:
    """Weight buffers on the compute device: a whole block in backward plus `prefetch_depth - 1` loads ahead."""
    if prefetch_depth < 1:
        raise ValueError(f"prefetch_depth must be >= 1, got {prefetch_depth}")
    return k + prefetch_depth - 1


def assign_units(sizes: list[int], world: int) -> list[int]:
    """Each unit's owning rank (`sizes`: the trunk layers', then the resident unit's; ranks.py). Balanced by bytes:
    units by size, largest first, each to the rank holding the fewest so far (ties: the lower rank). Then the trunk
    layers each rank got that many of are dealt again in layer order, each to the rank furthest behind its share, so
    that consecutive layers (loaded one after the other, over their owners' links) alternate between ranks. The same
    on every rank: it depends only on the sizes."""
    loads = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = r
        loads[r] += sizes[i]
    n_trunk = len(sizes) - 1
    counts = [owners[:n_trunk].count(r) for r in range(world)]
    given = [0] * world
    for i in range(n_trunk):  # equal layers keep the same bytes per rank; unequal ones (dense-first) about so
        r = max(range(world), key=lambda r: (counts[r] * (i + 1) / n_trunk - given[r], -r))
        owners[i] = r
        given[r] += 1
    return owners
