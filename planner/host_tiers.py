"""What a step holds off the GPU, for rank 0's node: host RAM by purpose, its page-locked part, the file-backed
tier's RAM window and the SSD's bytes (storage=nvme). Every figure follows the engine's buffers (storage/store.py,
storage/nvme.py, engine/block_inputs.py, engine/grad_shipping.py) and reads the Workload's placement."""

from __future__ import annotations

from megatrain_lightning import schedule as S
from planner.workload import STATE_BYTES, Workload


def host_bytes(wl: Workload) -> dict[str, int]:
    """Host RAM by purpose (the pinned parts are also listed under 'pinned')."""
    c, cb = wl.model, wl.cb
    in_ram = ram_params(wl)
    out = {"state": in_ram * STATE_BYTES}  # a file-backed layer keeps nothing in RAM
    if ram_frozen(wl):
        out["frozen"] = ram_frozen(wl) * cb  # the frozen base, its only copy (page-locked in place)
    if wl.resolved_stream == "copy":
        out["stream_copy"] = in_ram * cb  # page-locked in place: exact sizes
    per_rank = wl.ranks_per_node  # each rank of the node has its own staging and block inputs
    out["grad_staging"] = S.staging_numel(c.max_layer_params, c.embedding_params) * cb * per_rank
    if wl.offload_checkpoints == "disk":
        out["block_input_tiles"] = S.BLOCK_INPUT_TILES * S.BLOCK_INPUT_PIECE * per_rank
    elif wl.offload_checkpoints:
        out["checkpoints"] = wl.plan.n_checkpoints * wl.checkpoint_bytes * per_rank
    if wl.node_nvme_layers:  # each rank with file-backed layers has its window
        out["nvme_window"] = nvme_window_bytes(wl) * node_tier_ranks(wl)
    return out


def _ram_units(wl: Workload) -> list[int]:
    """The units whose state is in this node's RAM (those its ranks own; none of the file-backed ones)."""
    disk = set(wl.node_nvme_layers)
    return [i for i in range(wl.n_layers + 1) if wl.on_this_node(i) and i not in disk]


def ram_params(wl: Workload) -> int:
    """Trainable parameters whose state sits in this node's RAM."""
    return sum(wl.trainable(i) for i in _ram_units(wl))


def ram_frozen(wl: Workload) -> int:
    """Frozen parameters (compute dtype) in this node's RAM."""
    return sum(wl.frozen(i) for i in _ram_units(wl))


def node_tier_ranks(wl: Workload) -> int:
    """Ranks of rank 0's node with file-backed layers (each has its tier's window of RAM)."""
    return len({wl.owner(i) for i in wl.node_nvme_layers})


def nvme_window_bytes(wl: Workload) -> int:
    """The file-backed tier's RAM window (schedule.nvme_window), whatever the depth."""
    c = wl.model
    lp = wl.layer_trainable
    # the optimizer's piece (nvme.pieces): whole tensors grouped up to NVME_PIECE elements; the largest tensor of
    # this project's blocks is an MLP matrix
    piece = min(lp, max(S.NVME_PIECE, c.hidden_size * (c.moe_intermediate_size or c.intermediate_size)))
    return int(S.nvme_window(STATE_BYTES * piece, wl.copy_bytes, 4 * lp))


def nvme_pinned_bytes(wl: Workload) -> int:
    """The window's page-locked part: the copy tiles (H2D) and the gradient tiles (D2H)."""
    return (S.NVME_COPY_BUFFERS * wl.copy_bytes + S.NVME_GRAD_BUFFERS * 4 * wl.layer_trainable) \
        * node_tier_ranks(wl)


def pinned_bytes(wl: Workload, hw_unified: bool = False) -> int:
    """The page-locked part of host RAM (none where the device is the host)."""
    if hw_unified:
        return 0
    h = host_bytes(wl)
    n = ram_params(wl)  # the units in RAM
    # page-locked in place: the gradient buffers (they land by DMA), and whole tiles when the master streams
    tiles = 16 * n if wl.resolved_stream == "master" else 4 * n
    return h.get("stream_copy", 0) + h.get("frozen", 0) + h["grad_staging"] + h.get("checkpoints", 0) \
        + h.get("block_input_tiles", 0) + tiles + nvme_pinned_bytes(wl)


def nvme_bytes(wl: Workload) -> int:
    """SSD space of rank 0's node: each of its file-backed layers' [master | m | v | grad] and streamed copy
    (nvme.py), and the block inputs its ranks spill there (whole pieces each)."""
    state = len(wl.node_nvme_layers) * (wl.layer_trainable * S.DISK_STATE_BYTES + wl.copy_bytes)
    return state + (wl.plan.n_checkpoints * block_input_file_bytes(wl) * wl.ranks_per_node
                    if wl.offload_checkpoints == "disk" else 0)


def block_input_file_bytes(wl: Workload) -> int:
    """One block input in its files: whole pieces (block_input_files.py)."""
    return -(-wl.checkpoint_bytes // S.BLOCK_INPUT_PIECE) * S.BLOCK_INPUT_PIECE
