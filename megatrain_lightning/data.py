"""Data modules: byte-level text (the quick start: no tokenizer, no download), pre-tokenized token files
(`data=tokens`), JSON lines tokenized with a `tokenizer.json` (`data=jsonl`) and conversations rendered with the
model's chat template (`data=chat`, chat.py).

Token data is packed: documents are concatenated (with the end-of-text token between them) and cut into
windows of seq_len + 1 tokens that overlap by one, so every token is predicted once per epoch. With
prompt/response records the prompt's tokens are masked out of the loss (label -100).

Every training loader is resumable: Lightning saves its position in checkpoints (`state_dict`) and a resumed
run continues with exactly the batches that come next.
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from megatrain_lightning.errors import UserError

DEFAULT_CORPUS = Path(__file__).parent / "corpus" / "licenses.txt"
IGNORE = -100  # label of tokens that are not trained on (cross_entropy's ignore_index)
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


# ---- resumable loading ----
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


def _check_batching(seq_len: int, micro_batch: int) -> None:
    if seq_len < 1:
        raise UserError(f"data.seq_len must be >= 1, got {seq_len}")
    if micro_batch < 1:
        raise UserError(f"data.micro_batch must be >= 1, got {micro_batch}")


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


# ---- byte-level text ----
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
        _check_batching(seq_len, micro_batch)
        self.path = Path(path) if path else DEFAULT_CORPUS
        self.seq_len, self.micro_batch, self.seed, self.num_workers = seq_len, micro_batch, seed, num_workers
        self.train_samples, self.val_samples, self.val_fraction = train_samples, val_samples, val_fraction

    def setup(self, stage: str | None = None) -> None:
        raw = bytearray(_require_file(self.path, "data file").read_bytes())
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


# ---- packed token streams ----
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


class _PackedDataModule(L.LightningDataModule):
    """Train/validation windows over a packed token stream; subclasses provide `_tokens()`."""

    def __init__(self, seq_len: int, micro_batch: int, val_fraction: float, seed: int, vocab_size: int | None,
                 num_workers: int = 0) -> None:
        super().__init__()
        _check_batching(seq_len, micro_batch)
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

        tok = Tokenizer.from_file(str(_require_file(self.tokenizer_path, "tokenizer file")))
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


class TokensDataModule(_PackedDataModule):
    """Pre-tokenized data: a `.npy` array, or a raw `.bin` of `dtype` (uint16 or uint32), memory-mapped."""

    def __init__(self, path: str | Path, dtype: str | None = None, seq_len: int = 2048, micro_batch: int = 1,
                 val_fraction: float = 0.01, seed: int = 0, vocab_size: int | None = None,
                 num_workers: int = 0) -> None:
        super().__init__(seq_len, micro_batch, val_fraction, seed, vocab_size, num_workers)
        self.path, self.dtype = Path(path), dtype

    def _tokens(self) -> tuple[np.ndarray, None]:
        path = _require_file(self.path, "token file")
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


def _decoded(lines, path: Path):
    """The (line number, line) pairs of a text file, a decoding error named with the file and line."""
    lineno = 0
    try:
        for lineno, line in lines:
            yield lineno, line
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason} at byte {e.start} of a read block)") from None


class JsonlDataModule(_PackedDataModule):
    """JSON lines: each record's `text_field`, or its `prompt_field` + `response_field` with the prompt masked out
    of the loss; tokenized with a Hugging Face `tokenizer.json` through the `tokenizers` library."""

    def __init__(self, path: str | Path, tokenizer: str | Path, text_field: str = "text",
                 prompt_field: str | None = None, response_field: str | None = None,
                 eos_token: str | None = None, seq_len: int = 2048, micro_batch: int = 1,
                 val_fraction: float = 0.01, seed: int = 0, vocab_size: int | None = None,
                 num_workers: int = 0) -> None:
        super().__init__(seq_len, micro_batch, val_fraction, seed, vocab_size, num_workers)
        if (prompt_field is None) != (response_field is None):
            raise UserError("data.prompt_field and data.response_field go together")
        self.path, self.tokenizer_path = Path(path), Path(tokenizer)
        self.text_field, self.prompt_field, self.response_field = text_field, prompt_field, response_field
        self.eos_token = eos_token

    def _tokens(self) -> tuple[np.ndarray, np.ndarray | None]:
        tok = self._tokenizer()
        path = _require_file(self.path, "data file")
        eos = []
        if self.eos_token is not None:
            eos_id = tok.token_to_id(self.eos_token)
            if eos_id is None:
                raise UserError(f"data.eos_token {self.eos_token!r} is not in {self.tokenizer_path}")
            eos = [eos_id]
        pairs = self.prompt_field is not None
        tokens, mask = array("I"), array("B")  # 4 and 1 bytes per token (a list would take ~36)
        for lineno, record in _records(path):
            fields = (self.prompt_field, self.response_field) if pairs else (self.text_field,)
            missing = [k for k in fields if not isinstance(record.get(k), str)]
            if missing:
                raise UserError(f"{path}:{lineno}: no text field {missing[0]!r}")
            if pairs:
                prompt = tok.encode(record[self.prompt_field], add_special_tokens=False).ids
                response = tok.encode(record[self.response_field], add_special_tokens=False).ids + eos
                tokens.extend(prompt + response)
                mask.extend([0] * len(prompt) + [1] * len(response))
            else:
                tokens.extend(tok.encode(record[self.text_field], add_special_tokens=False).ids + eos)
        return _token_array(tokens, tok), (np.frombuffer(mask, dtype=np.uint8) if pairs else None)


class ChatDataModule(_PackedDataModule):
    """JSON lines of conversations (`messages`, ShareGPT `conversations` or Alpaca `instruction`/`output`, chat.py),
    rendered with the model's chat template and trained on the assistant's turns only. Conversations are packed back
    to back like the other token data: attention is causal over the window, so a conversation's tokens may attend to
    the end of the one before it; labels exist only inside assistant turns."""

    def __init__(self, path: str | Path, tokenizer: str | Path, chat_template: str | Path | None = None,
                 seq_len: int = 2048, micro_batch: int = 1, val_fraction: float = 0.01, seed: int = 0,
                 vocab_size: int | None = None, num_workers: int = 0) -> None:
        super().__init__(seq_len, micro_batch, val_fraction, seed, vocab_size, num_workers)
        self.path, self.tokenizer_path = Path(path), Path(tokenizer)
        # default: the tokenizer_config.json beside the tokenizer.json (a Hugging Face model directory)
        self.template_path = Path(chat_template) if chat_template else self.tokenizer_path.parent / "tokenizer_config.json"

    def _tokens(self) -> tuple[np.ndarray, np.ndarray]:
        from megatrain_lightning.chat import ChatTemplate, encode, to_messages

        tok = self._tokenizer()
        template = ChatTemplate.from_config(self.template_path)
        path = _require_file(self.path, "data file")
        tokens, mask = array("I"), array("B")
        for lineno, record in _records(path):
            where = f"{path}:{lineno}"
            ids, trained = encode(tok, template, to_messages(record, where), where)
            tokens.extend(ids)
            mask.extend(trained)
        return _token_array(tokens, tok), np.frombuffer(mask, dtype=np.uint8)


def _records(path: Path):
    """(line number, JSON object) of each non-empty line, with a progress bar; bad lines named with file and line.
    The bar closes (ends its line) before an error about the data is printed."""
    from tqdm.auto import tqdm

    with open(path, encoding="utf-8") as f, tqdm(f, desc=f"tokenizing {path.name}", unit=" records") as bar:
        for lineno, line in _decoded(enumerate(bar, 1), path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: a record must be a JSON object, got {type(record).__name__}")
            yield lineno, record


def _token_array(tokens: array, tok) -> np.ndarray:
    ids = np.frombuffer(tokens, dtype=np.uint32)
    return ids.astype(np.uint16) if tok.get_vocab_size() <= 1 << 16 else ids
