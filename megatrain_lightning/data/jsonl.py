"""JSON lines tokenized with a Hugging Face `tokenizer.json` (`data=jsonl`)."""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np

from megatrain_lightning.data.loading import require_file
from megatrain_lightning.data.packed import PackedDataModule, records, token_array
from megatrain_lightning.errors import UserError


class JsonlDataModule(PackedDataModule):
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
        path = require_file(self.path, "data file")
        eos = []
        if self.eos_token is not None:
            eos_id = tok.token_to_id(self.eos_token)
            if eos_id is None:
                raise UserError(f"data.eos_token {self.eos_token!r} is not in {self.tokenizer_path}")
            eos = [eos_id]
        pairs = self.prompt_field is not None
        tokens, mask = array("I"), array("B")  # 4 and 1 bytes per token (a list would take ~36)
        for lineno, record in records(path):
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
        return token_array(tokens, tok), (np.frombuffer(mask, dtype=np.uint8) if pairs else None)
