"""Packed token streams, shared by the token formats: documents are concatenated (with the end-of-text token
between them) and cut into windows of seq_len + 1 tokens that overlap by one, so every token is predicted
once per epoch; with a loss mask (prompt/response records, chat) masked tokens get label IGNORE."""

from __future__ import annotations

import json
from array import array
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from megatrain_lightning.data.loading import IGNORE, ResumableLoader, check_batching, require_file
from megatrain_lightning.errors import UserError


class PackedWindows(Dataset):
    """Window i of a token stream: tokens [i*T, i*T + T] as a [T+1] tensor, or, when a loss mask exists, a dict
    of `input_ids` [T] and `labels` [T] (IGNORE where the mask is 0)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, mask: np.ndarray | None = None, what: str = "") -> None:
        if len(tokens) < seq_len + 1:
            raise UserError(f"{len(tokens)} tokens{what} are too few for one window of seq_len {seq_len} + 1")
        self.tokens, self.mask, self.seq_len = tokens, mask, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int):
        s = i * self.seq_len
        window = torch.from_numpy(self.tokens[s:s + self.seq_len + 1].astype(np.int64))  # [T+1]
        if self.mask is None:
            return window
        labels = window[1:].clone()
        labels[torch.from_numpy(self.mask[s + 1:s + self.seq_len + 1] == 0)] = IGNORE
        return {"input_ids": window[:-1], "labels": labels}


class PackedDataModule(L.LightningDataModule):
    """Train/validation windows over a packed token stream; subclasses provide `_tokens()`."""

    def __init__(self, seq_len: int, micro_batch: int, val_fraction: float, seed: int, vocab_size: int | None,
                 num_workers: int = 0) -> None:
        super().__init__()
        check_batching(seq_len, micro_batch)
        if not 0 <= val_fraction < 1:
            raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.seq_len, self.micro_batch, self.val_fraction = seq_len, micro_batch, val_fraction
        self.seed, self.vocab_size, self.num_workers = seed, vocab_size, num_workers

    def _tokens(self) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def _tokenizer(self):
        """The `tokenizer_path` tokenizer; one that can produce ids past the model's embedding is refused here,
        before any text is read (one smaller than the embedding, as padded vocabularies are, is fine)."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(require_file(self.tokenizer_path, "tokenizer file")))
        n = tok.get_vocab_size(with_added_tokens=True)
        if self.vocab_size is not None and n > self.vocab_size:
            raise UserError(f"data.tokenizer: {self.tokenizer_path} has {n} tokens, more than the model's vocabulary "
                            f"of {self.vocab_size}: is it the model's own tokenizer?")
        return tok

    def setup(self, stage: str | None = None) -> None:
        tokens, mask = self._tokens()
        if self.vocab_size is not None and len(tokens):
            chunks = range(0, len(tokens), 1 << 24)
            top = max(int(tokens[i:i + (1 << 24)].max()) for i in chunks)
            low = min(int(tokens[i:i + (1 << 24)].min()) for i in chunks)
            if top >= self.vocab_size or low < 0:
                raise UserError(f"token id {top if top >= self.vocab_size else low} in the data is outside the "
                                f"model's vocabulary ({self.vocab_size})")
        split = int(len(tokens) * (1 - self.val_fraction))
        share = f"of {len(tokens)}: data.val_fraction={self.val_fraction}"
        self.train = PackedWindows(tokens[:split], self.seq_len, None if mask is None else mask[:split],
                                   f" (the training split {share})" if self.val_fraction else "")
        self.val = None
        if self.val_fraction > 0:
            self.val = PackedWindows(tokens[split:], self.seq_len, None if mask is None else mask[split:],
                                     f" (the validation split {share}; raise it, or 0: no validation)")

    def train_dataloader(self) -> DataLoader:
        if len(self.train) < self.micro_batch:
            raise UserError(f"{len(self.train)} training windows are fewer than one micro-batch of {self.micro_batch}")
        return ResumableLoader(self.train, self.micro_batch, self.seed, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val or [], batch_size=self.micro_batch, shuffle=False, num_workers=self.num_workers)


def decoded(lines, path: Path):
    """The (line number, line) pairs of a text file, a decoding error named with the file and line."""
    lineno = 0
    try:
        for lineno, line in lines:
            yield lineno, line
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason} at byte {e.start} of a read block)") from None


def records(path: Path):
    """(line number, JSON object) of each non-empty line, with a progress bar; bad lines named with file and line.
    The bar closes (ends its line) before an error about the data is printed."""
    from tqdm.auto import tqdm

    with open(path, encoding="utf-8") as f, tqdm(f, desc=f"tokenizing {path.name}", unit=" records") as bar:
        for lineno, line in decoded(enumerate(bar, 1), path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: a record must be a JSON object, got {type(record).__name__}")
            yield lineno, record


def token_array(tokens: array, tok) -> np.ndarray:
    ids = np.frombuffer(tokens, dtype=np.uint32)
    return ids.astype(np.uint16) if tok.get_vocab_size() <= 1 << 16 else ids
