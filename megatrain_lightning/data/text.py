"""Byte-level text (`data=bytes`): the quick start's data, no tokenizer, no download; random windows of
seq_len + 1 bytes as tokens 0..255."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from megatrain_lightning.data.loading import ResumableLoader, check_batching, require_file
from megatrain_lightning.errors import UserError

DEFAULT_CORPUS = Path(__file__).parents[1] / "corpus" / "licenses.txt"


class ByteWindows(Dataset):
    """Random windows of seq_len+1 bytes (tokens 0..255); a fixed seed per index makes epochs reproducible."""

    def __init__(self, data: torch.Tensor, seq_len: int, n_samples: int, seed: int) -> None:
        if len(data) <= seq_len + 1:
            raise UserError(f"text of {len(data)} bytes is too short for seq_len {seq_len}")
        self.data, self.seq_len, self.n_samples, self.seed = data, seq_len, n_samples, seed

    def __len__(self) -> int:
        return self.n_samples

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = int(torch.randint(0, len(self.data) - self.seq_len - 1, (1,), generator=g))
        return self.data[start:start + self.seq_len + 1].long()  # [seq_len + 1]


class ByteTextDataModule(L.LightningDataModule):
    def __init__(self, path: str | Path | None = None, seq_len: int = 128, micro_batch: int = 8,
                 train_samples: int = 100_000, val_samples: int = 64, val_fraction: float = 0.05,
                 seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        check_batching(seq_len, micro_batch)
        self.path = Path(path) if path else DEFAULT_CORPUS
        self.seq_len, self.micro_batch, self.seed, self.num_workers = seq_len, micro_batch, seed, num_workers
        self.train_samples, self.val_samples, self.val_fraction = train_samples, val_samples, val_fraction

    def setup(self, stage: str | None = None) -> None:
        raw = bytearray(require_file(self.path, "data file").read_bytes())
        if not raw:
            raise UserError(f"data.path: {self.path} is empty")
        data = torch.frombuffer(raw, dtype=torch.uint8)
        split = int(len(data) * (1 - self.val_fraction))
        self.train = ByteWindows(data[:split], self.seq_len, self.train_samples, self.seed)
        self.val = ByteWindows(data[split:], self.seq_len, self.val_samples, self.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.train, self.micro_batch, self.seed, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.micro_batch, shuffle=False, num_workers=self.num_workers)
