"""Pre-tokenized data (`data=tokens`): a 1-D .npy array of token ids, or a raw .bin of uint16/uint32,
memory-mapped."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatrain_lightning.data.loading import require_file
from megatrain_lightning.data.packed import PackedDataModule
from megatrain_lightning.errors import UserError

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class TokensDataModule(PackedDataModule):
    """Pre-tokenized data: a `.npy` array, or a raw `.bin` of `dtype` (uint16 or uint32), memory-mapped."""

    def __init__(self, path: str | Path, dtype: str | None = None, seq_len: int = 2048, micro_batch: int = 1,
                 val_fraction: float = 0.01, seed: int = 0, vocab_size: int | None = None,
                 num_workers: int = 0) -> None:
        super().__init__(seq_len, micro_batch, val_fraction, seed, vocab_size, num_workers)
        self.path, self.dtype = Path(path), dtype

    def _tokens(self) -> tuple[np.ndarray, None]:
        path = require_file(self.path, "token file")
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
            if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32, np.int32, np.int64):
                raise UserError(f"{path}: expected a 1-D array of token ids (uint16/uint32/int32/int64), got "
                                f"{tokens.ndim}-D {tokens.dtype}")
            return tokens, None
        if self.dtype not in TOKEN_DTYPES:
            raise UserError(f"data.dtype must be one of {sorted(TOKEN_DTYPES)} for a raw token file, got "
                            f"{self.dtype!r}")
        width = np.dtype(TOKEN_DTYPES[self.dtype]).itemsize
        if path.stat().st_size == 0:  # numpy cannot map an empty file
            raise UserError(f"{path}: 0 tokens are too few for one window of seq_len {self.seq_len} + 1")
        if path.stat().st_size % width:
            raise UserError(f"{path} has {path.stat().st_size} bytes, not a whole number of {self.dtype} tokens")
        return np.memmap(path, dtype=TOKEN_DTYPES[self.dtype], mode="r"), None
