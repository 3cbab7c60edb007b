"""Data modules, one per format (`data=` in conf/): byte-level text (text.py), token files (tokens.py), JSON lines
(jsonl.py), conversations with the model's chat template (chat.py); the token formats share packing
(packed.py), all share resumable loading (loading.py)."""

from megatrain_lightning.data.chat import ChatDataModule
from megatrain_lightning.data.jsonl import JsonlDataModule
from megatrain_lightning.data.loading import IGNORE, EpochSampler, ResumableLoader
from megatrain_lightning.data.packed import PackedWindows
from megatrain_lightning.data.text import ByteTextDataModule
from megatrain_lightning.data.tokens import TokensDataModule

__all__ = ["IGNORE", "ByteTextDataModule", "ChatDataModule", "EpochSampler", "JsonlDataModule", "PackedWindows",
           "ResumableLoader", "TokensDataModule"]
