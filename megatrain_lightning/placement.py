"""Where the training state goes, decided once at build time: how weights stream to the device, which trunk
layers keep their fp32 state in files (`storage=nvme`), which units the device keeps whole (`device_state_GiB`) and
which it caches for a step (`step_cache_GiB`). The planner applies the same rules (planner/plan.py)."""

from __future__ import annotations

import logging

import torch

from megatrain_lightning import schedule as S
from megatrain_lightning.engine.device_state import DeviceStates, StepCache
from megatrain_lightning.errors import UserError
from megatrain_lightning.storage.nvme import pieces as nvme_pieces
from megatrain_lightning.storage.store import HostStore, Layout, available_ram_bytes

log = logging.getLogger(__name__)


def nvme_terms(layouts: list[Layout], dtype: torch.dtype) -> tuple[list[int], int, int]:
    """The placement rule's inputs (schedule.nvme_layers): each trunk layer's RAM bytes in RAM (fp32 tile, and the
    streamed copy when there is one: in fp32 the master itself streams), the resident unit's, and the file-backed
    tier's window."""
    cb = torch.finfo(dtype).bits // 8
    copy = 0 if dtype == torch.float32 else cb
    trunk = layouts[:-1]
    layer_ram = [4 * lay.tile_numel + copy * lay.numel for lay in trunk]
    fixed = 4 * layouts[-1].tile_numel + copy * layouts[-1].numel
    piece = max([hi - lo for lay in trunk for lo, hi in nvme_pieces([e.numel for e in lay.trainable_entries])],
                default=0)  # the optimizer's tiles hold a piece of a layer
    window = S.nvme_window(16 * piece, cb * max(lay.numel for lay in trunk), 4 * max(lay.trainable for lay in trunk))
    return layer_ram, fixed, window


def nvme_units(layouts: list[Layout], dtype: torch.dtype, ram_budget_GiB: float | None,
               owners: list[int] | None = None, rank: int = 0, ranks_per_node: int = 1) -> list[int]:
    """storage=nvme: the first trunk layers whose state (fp32 tile and streamed copy) does not fit the RAM budget
    keep all of it in files (nvme.py); the tier's window of a few layer-sized tiles comes on top. None: all the RAM
    the rest of the run (the window and the gradient staging included) leaves. With several ranks (`owners`, each
    unit's rank), the budget is the node's: each of its `ranks_per_node` ranks gets an equal share for the units it
    owns, and puts the first of them in files (schedule.nvme_layers_of_ranks); this `rank`'s are returned."""
    layer_ram, fixed, window = nvme_terms(layouts, dtype)
    owners = owners or [0] * len(layouts)
    if ram_budget_GiB is not None:
        budget = ram_budget_GiB * 2**30 / ranks_per_node
    else:
        cb = torch.finfo(dtype).bits // 8
        staging = S.staging_numel(max(lay.numel for lay in layouts[:-1]), layouts[-1].numel) * cb
        budget = (available_ram_bytes() - 2 * 2**30) / ranks_per_node - staging - window
    problem = S.nvme_floor_problem(S.nvme_floor(fixed if owners[-1] == rank else 0), budget, ram_budget_GiB,
                                   ranks_per_node)
    if problem:
        raise UserError(f"storage.ram_budget_GiB: {problem}")
    frozen = [lay.trainable == 0 for lay in layouts[:-1]]  # wholly frozen layers go to the drives first
    mine = [i for i in S.nvme_layers_of_ranks(layer_ram, fixed, budget, owners, frozen) if owners[i] == rank]
    if mine:
        own = [i for i in range(len(layer_ram)) if owners[i] == rank]
        ram = (fixed if owners[-1] == rank else 0) + sum(layer_ram[i] for i in own if i not in mine)
        log.info(f"storage=nvme: {len(mine)} of {len(own)} layers{' of this rank' if len(own) < len(layer_ram) else ''} "
                 f"keep all their state in files; RAM holds {ram / 2**30:.3g} GiB of state and a window of "
                 f"{window / 2**30:.3g} GiB")
    return mine


def _free_GiB(device: torch.device, share: float) -> float:
    """`share` of the device memory free now (none on the CPU: the device is the host)."""
    return share * torch.cuda.mem_get_info(device)[0] / 2**30 if device.type == "cuda" else 0.0


def device_states(store: HostStore, device: torch.device, budget_GiB: float | None, hooks: bool) -> DeviceStates | None:
    """The units whose [master | m | v | grad] the device keeps within `budget_GiB` (None: 40% of what is free),
    by schedule.device_units; none when a hook can read gradients (`hooks`)."""
    budget = _free_GiB(device, S.AUTO_DEVICE_SHARE) if budget_GiB is None else budget_GiB
    if budget > 0 and hooks:
        log.info("device_state_GiB: a hook reads gradients (on_before_optimizer_step, configure_gradient_clipping "
                 "or optimizer_step): every update runs on the host")
        budget = 0.0
    # file-backed units' state is in files (nothing to write through); other ranks keep their own units
    skip = {i for i, u in enumerate(store.units) if u.on_disk or u.remote}
    cb = store.compute_dtype.itemsize  # and the device copy of frozen parameters kept in the compute dtype alone
    units = S.device_units([4 * u.layout.tile_numel + cb * (u.layout.numel - u.layout.master_numel)
                            for u in store.units], budget * 2**30, skip=skip)
    if not units:
        return None
    states = DeviceStates(store, units, device)
    resident = len(store.units) - 1
    log.info(f"device_state_GiB={budget:.3g}: the device keeps and updates the state of "
             f"{len(units) - (resident in units)} of {resident} layers{' (of this rank)' if store.ranks.multi else ''}"
             f"{' and the embedding/head' if resident in units else ''} ({states.nbytes / 2**30:.3g} GiB)")
    return states


def step_cache(store: HostStore, device: torch.device, budget_GiB: float | None, accumulate: int,
               kept: set[int]) -> StepCache | None:
    """With accumulation, the units (not `kept` whole) whose weights and fp32 gradient sums stay on the device for a
    step within `budget_GiB` (None: schedule.AUTO_DEVICE_SHARE of what is free): their later loads cost no H2D, their
    later micro-batches no D2H and no host add. With several ranks every rank caches the same units, its own and
    the others' (a cached load is then no broadcast on any rank, and a sum is reduced once a step): within the
    smallest rank's budget, none that a rank keeps whole."""
    if accumulate < 2:
        return None
    budget = _free_GiB(device, S.AUTO_DEVICE_SHARE) if budget_GiB is None else budget_GiB
    if store.ranks.multi:
        shared = store.ranks.gather((budget, sorted(kept)))
        budget, kept = min(b for b, _ in shared), set().union(*(set(k) for _, k in shared))
    n_trunk, cb = len(store.units) - 1, torch.finfo(store.compute_dtype).bits // 8
    need = [StepCache.unit_bytes(u.layout.trainable, u.layout.numel, cb, i < n_trunk) for i, u in enumerate(store.units)]
    units = S.device_units(need, budget * 2**30, skip=kept)
    if not units:
        return None
    cache = StepCache(store, units, device, n_trunk)
    if store.ranks.rank == 0:  # the same on every rank
        log.info(f"accumulate_grad_batches={accumulate}: {len(units)} of {len(store.units)} units keep their weights "
                 f"and gradient sums on the device for a step ({cache.nbytes / 2**30:.3g} GiB)")
    return cache
