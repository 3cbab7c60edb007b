"""Where the training state goes, decided once at build time: how weights stream to the device, and which trunk
layers keep their fp32 state in files (`storage=nvme`). The planner applies the same rules (planner/plan.py)."""

from __future__ import annotations

import torch

from megatrain_lightning import schedule as S
from megatrain_lightning.errors import UserError
from megatrain_lightning.store import Layout, available_ram_bytes


def resolve_stream(storage: str, stream: str, dtype: torch.dtype) -> str:
    """stream="auto": with every layer in RAM the fp32 master streams and the device casts it (the host's per-layer
    update is then only AdamW, which is what bounds an overlapped step; PCIe has room for the doubled bytes, and RAM
    saves the copy). storage=nvme streams the compute-dtype copy (the masters of file-backed layers are on disk)."""
    if storage == "nvme":
        if stream == "master" and dtype != torch.float32:
            raise UserError("storage='nvme' streams the compute-dtype copy kept in RAM; use stream='copy' or 'auto'")
        return "copy"
    return "master" if stream == "auto" else stream


def nvme_units(layouts: list[Layout], dtype: torch.dtype, ram_budget_GiB: float | None) -> list[int]:
    """storage=nvme: the first trunk layers whose state does not fit the RAM budget (None: all the RAM the rest of
    the run leaves)."""
    trunk = [lay.numel for lay in layouts[:-1]]
    if ram_budget_GiB is not None:
        budget = ram_budget_GiB * 2**30
    else:
        cb = torch.finfo(dtype).bits // 8
        staging = S.staging_numel(max(trunk), layouts[-1].numel) * cb
        others = cb * sum(trunk) + staging + S.NVME_BUFFERS * S.DISK_STATE_BYTES * max(trunk)
        budget = available_ram_bytes() - others - 2 * 2**30
    # fp32 bytes: a layer in RAM holds its tile, a file takes over [master | m | v] (frozen parameters: the master
    # alone)
    state = ([4 * lay.tile_numel for lay in layouts[:-1]], [4 * lay.state_numel for lay in layouts[:-1]],
             4 * layouts[-1].tile_numel)
    floor = S.nvme_floor(*state)
    if floor > budget:
        raise UserError(f"storage=nvme: the RAM budget ({budget / 2**30:.3g} GiB) cannot hold even the state that "
                        f"stays in RAM with every layer on disk ({floor / 2**30:.3g} GiB: gradients and the "
                        "embedding/head state)")
    return list(range(S.nvme_layers(*state, budget)))
