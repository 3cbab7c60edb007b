"""Several ranks (torch.distributed, data parallel): which rank holds each unit's training state, and the collectives
the engine runs per unit.

The host state is held once across the ranks, sharded by unit: each unit (a trunk layer, or the resident
embedding/head) belongs to one rank, which keeps its fp32 master, Adam moments and gradient in host memory, runs its
AdamW and writes its checkpoint file. The units are dealt out so that RAM and optimizer work split evenly (the
resident unit, often the largest, counts as one unit among the rest) and consecutive layers alternate between ranks
(`schedule.assign_units`). Per layer of a pass:

- load: the owner copies the layer's weights over its own PCIe link (H2D) and broadcasts them from its GPU to the
  others (NVLink within a node); the other ranks' links carry the neighbouring layers, whose loads the prefetch issues
  ahead, so each link carries 1/N of a pass's bytes;
- gradients: each rank's gradient of the layer (fp32, flat) is summed into the owner's (`reduce`), divided by N (the
  mean over ranks, as DistributedDataParallel takes it), and only the owner ships it to its host.

Every rank issues the same collectives in the same order (the schedule is the same on all of them), so no
coordination is needed beyond the collectives themselves. Units rather than slices of every unit: the store, the
optimizer, the file tier and the checkpoint format stay per unit (a checkpoint saved with N ranks resumes with M:
each rank reads the unit files it owns).

Across nodes the units are dealt over every rank, so a layer's broadcast and reduction cross the network. With
`replicate_nodes` (a slow network) each node holds the whole state instead, dealt among its own ranks: broadcasts and
reductions stay within the node (its group), and each unit's gradient is then summed across the nodes among the
ranks that own it there (their peer group, one all-reduce a layer); every node updates its replica alike, and the
first node's ranks write the checkpoint.

One rank (`Ranks.single`) is the plain single-process path: every unit owned, every collective skipped.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megatrain_lightning import schedule as S
from megatrain_lightning.errors import UserError


assign = S.assign_units  # shared with the planner (schedule.py is torch-free)


class Ranks:
    def __init__(self, world: int, rank: int, owners: list[int], device: torch.device | None = None,
                 per_replica: int | None = None, group=None, peers=None) -> None:
        """`owners`: each unit's owner (a global rank; replicated nodes: on this rank's node). `per_replica`: the
        ranks that hold one copy of the state between them (the world, or a node's), `group` their process group
        (None: the world's) and `peers` this rank's counterparts on the other replicas (None: no replicas)."""
        self.world, self.rank, self.owners = world, rank, owners
        self.device = device  # where collectives' tensors live (NCCL needs CUDA tensors; gloo takes CPU ones)
        self.per_replica = world if per_replica is None else per_replica
        self.group, self.peers = group, peers
        self.replicas = world // self.per_replica
        self.primary = rank < self.per_replica  # the first replica's ranks write checkpoint files

    @classmethod
    def single(cls, n_units: int) -> Ranks:
        return cls(1, 0, [0] * n_units)

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], world: int, rank: int, device: torch.device | None = None,
                   ranks_per_node: int = 1, replicate_nodes: bool = False) -> Ranks:
        n_trunk = len(sizes) - 1
        replicated = replicate_nodes and world > ranks_per_node
        share = ranks_per_node if replicated else world
        if share > 1 and n_trunk < share:
            raise UserError(f"the model streams {n_trunk} layers, fewer than the {share} ranks that would share "
                            f"them ({'devices' if replicated else 'devices x num_nodes'}): use at most {n_trunk} "
                            "ranks")
        if not replicated:
            return cls(world, rank, assign(sizes, world), device)
        node, local = divmod(rank, share)
        # every rank creates every group, in the same order (torch.distributed's rule)
        nodes = [dist.new_group(list(range(n * share, (n + 1) * share))) for n in range(world // share)]
        peers = [dist.new_group(list(range(k, world, share))) for k in range(share)]
        owners = [node * share + r for r in assign(sizes, share)]
        return cls(world, rank, owners, device, per_replica=share, group=nodes[node], peers=peers[local])

    @property
    def multi(self) -> bool:
        return self.world > 1

    def owns(self, unit: int) -> bool:
        return self.owners[unit] == self.rank

    def owned(self) -> set[int]:
        return {i for i, r in enumerate(self.owners) if r == self.rank}

    # ---- collectives (no-ops on one rank) ----
    def broadcast_(self, t: Tensor, unit: int) -> None:
        """`t` becomes the owner's `t` on every rank (of its node, when replicated; in place; on CUDA ordered on the
        current stream)."""
        if self.per_replica > 1:
            dist.broadcast(t, src=self.owners[unit], group=self.group)

    def reduce_mean_(self, t: Tensor, unit: int) -> None:
        """The owner's `t` (every replica's owner) becomes the mean of every rank's `t` (the others' are left
        undefined)."""
        if not self.multi:
            return
        if self.per_replica > 1:
            dist.reduce(t, dst=self.owners[unit], op=dist.ReduceOp.SUM, group=self.group)
        if self.owns(unit):
            if self.replicas > 1:  # the other nodes' sums, among the unit's owners there
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.peers)
            t.div_(self.world)

    def sum(self, value: Tensor) -> Tensor:
        """A host scalar summed over the ranks (through the collective device)."""
        return self._all_sum(value, None) if self.multi else value

    def sum_units(self, value: Tensor) -> Tensor:
        """A host scalar of each rank's own units summed over one copy of the state (the ranks that share it)."""
        return self._all_sum(value, self.group) if self.per_replica > 1 else value

    def _all_sum(self, value: Tensor, group) -> Tensor:
        t = value.detach().to(self.device, torch.float32).reshape(1).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t.cpu().reshape(())

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on some rank."""
        return bool(self.sum(torch.tensor(float(flag))) > 0) if self.multi else flag

    def share(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj`, on every rank."""
        if not self.multi:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.multi:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def together(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` on this rank; if it raised on any rank, raises on every rank (the failing rank's error, the rank
        named), so that no rank goes on into a collective the failed one will never join."""
        try:
            result, error = fn(), None
        except Exception as e:  # re-raised below, on this rank and the others
            result, error = None, e
        errors = self.gather(None if error is None else (type(error).__name__, str(error)))
        if error is not None:
            raise error
        failed = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
        if failed is not None:
            r, (kind, message) = failed
            raise RuntimeError(f"rank {r} failed ({kind}): {message}")
        return result
