"""Hugging Face checkpoints in and out: config.json + sharded safetensors + index (Llama, Mistral, Qwen2, Qwen3 as
megatrain's Llama; the families of config.TRANSFORMERS_HF_TYPES as the transformers model itself).

    python -m megatrain_lightning.hf export runs/<date_time>/checkpoints exported/ [--dtype bfloat16]
"""

from megatrain_lightning.hf.cli import main
from megatrain_lightning.hf.export import export
from megatrain_lightning.hf.load import INDEX, load_into_store, shards

__all__ = ["INDEX", "export", "load_into_store", "main", "shards"]
