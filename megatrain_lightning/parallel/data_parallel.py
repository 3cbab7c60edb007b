"""Lightning's launch and process-group machinery for the megatrain strategy, as its DDPStrategy sets them up: one
process per device, started by Lightning (or torchrun, SLURM: the cluster environment), NCCL on GPUs and gloo on the
CPU. One device is the plain single-process path: no process group, no launcher, no distributed sampler. What the
ranks share and exchange is ranks.py's."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lightning.fabric.utilities.distributed import (_distributed_is_initialized,
                                                     _get_default_process_group_backend_for_device,
                                                     _init_dist_connection, _suggested_max_num_threads,
                                                     _sync_ddp_if_available)
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from typing_extensions import override

from megatrain_lightning.errors import UserError
from megatrain_lightning.parallel.ranks import Ranks


log = logging.getLogger(__name__)


def thread_advice(threads: int, cores_per_rank: int, omp_num_threads: str | None) -> str | None:
    """A warning when each rank's PyTorch runs on one CPU thread though the node has more cores per rank (torchrun
    sets OMP_NUM_THREADS=1 for several processes; Lightning's own launcher gives each its share): the host's AdamW
    and gradient adds, most of a step with the state on the host, would then use one core per rank."""
    if threads > 1 or cores_per_rank <= 1:
        return None
    return (f"each rank runs PyTorch on 1 CPU thread (OMP_NUM_THREADS={omp_num_threads}; torchrun sets it to 1): "
            f"the host's optimizer and gradient adds then use one core per rank; set OMP_NUM_THREADS="
            f"{cores_per_rank} (this node's cores per rank)")


class DataParallelBase(ParallelStrategy):
    """`_root_device` and `_device_given` are the subclass's (its `device` argument)."""

    _root_device: torch.device
    _device_given: bool

    @property
    @override
    def root_device(self) -> torch.device:
        if self.parallel_devices and (self.world_size > 1 or not self._device_given):
            return self.parallel_devices[self.local_rank]
        return self._root_device

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices else 1

    @property
    def is_distributed(self) -> bool:
        """Several ranks: Lightning then gives each its part of the data (a DistributedSampler)."""
        return self.num_processes * self.num_nodes > 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    @override
    def _configure_launcher(self) -> None:
        # the connector has just filled in devices and nodes
        if self.is_distributed:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.is_distributed:
            reset_seed()
            self.set_world_ranks()
            backend = _get_default_process_group_backend_for_device(self.root_device)
            _init_dist_connection(self.cluster_environment, backend,
                                  device_id=self.root_device if self.root_device.type == "cuda" else None)
            advice = thread_advice(torch.get_num_threads(), _suggested_max_num_threads(self.num_processes),
                                   os.environ.get("OMP_NUM_THREADS"))
            if advice and self.global_rank == 0:
                log.warning(advice)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if _distributed_is_initialized():
            torch.distributed.barrier(device_ids=[self.root_device.index] if self.root_device.type == "cuda" else None)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src)
        return box[0]

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any | None = "mean") -> Any:
        return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op) if isinstance(tensor, Tensor) else tensor

    def agree(self, ranks: Ranks, what: dict[str, Any]) -> None:
        """Every rank must run with the same settings and model shape (their collectives follow the same schedule);
        a difference is named instead of hanging."""
        if not ranks.multi:
            return
        seen = ranks.gather(what)
        differ = sorted(k for k in what if any(other[k] != seen[0][k] for other in seen))
        if differ:
            raise UserError("the ranks differ in " + ", ".join(
                f"{k} ({', '.join(f'rank {r}: {other[k]!r}' for r, other in enumerate(seen))})" for k in differ)
                + ": every rank must run the same strategy settings on the same model")
