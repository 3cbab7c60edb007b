"""Resumable loading, shared by every format: Lightning saves a training loader's position in checkpoints
(`state_dict`) and a resumed run continues with exactly the batches that come next."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from megatrain_lightning.errors import UserError

IGNORE = -100  # label of tokens that are not trained on (cross_entropy's ignore_index)


class EpochSampler(DistributedSampler):
    """Indices 0..n-1, in a fresh permutation each epoch when `shuffle` (seeded by seed and epoch); with several ranks
    rank r of N takes every N-th index of that order from the r-th, each rank as many (the same global batches as one
    rank at N times the micro-batch). A DistributedSampler, so that Lightning keeps it instead of wrapping it in one;
    it splits itself at iteration, when the process group exists."""

    def __init__(self, n: int, seed: int, shuffle: bool) -> None:  # no process group yet: not the parent's __init__
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.skip = 0, 0  # skip: samples of the epoch's order already consumed, over all ranks

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    @staticmethod
    def ranks() -> tuple[int, int]:
        """(world size, rank)."""
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def __len__(self) -> int:
        return self.n // self.ranks()[0]

    def __iter__(self):
        world, rank = self.ranks()
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        else:
            order = torch.arange(self.n)
        skip, self.skip = self.skip, 0  # a resumed epoch starts where the checkpoint was taken
        left = order[skip:]
        return iter(left[:len(left) // world * world][rank::world].tolist())


class ResumableLoader(DataLoader):
    """A DataLoader that counts the samples it handed out (over all ranks); Lightning stores that in checkpoints and
    restores it, also into a run with another number of ranks."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, shuffle: bool, num_workers: int = 0) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed, shuffle),
                         num_workers=num_workers, drop_last=True)
        self.consumed = 0

    def __iter__(self):
        self.consumed = self.sampler.skip
        world = EpochSampler.ranks()[0]
        for batch in super().__iter__():
            self.consumed += self.batch_size * world
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.epoch, self.sampler.skip = state["epoch"], state["consumed"]


def check_batching(seq_len: int, micro_batch: int) -> None:
    if seq_len < 1:
        raise UserError(f"data.seq_len must be >= 1, got {seq_len}")
    if micro_batch < 1:
        raise UserError(f"data.micro_batch must be >= 1, got {micro_batch}")


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path
