"""Hugging Face checkpoints in: config.json + sharded safetensors + index, read one tensor at a time, shard by shard,
straight into the host store (file-backed layers write it into their files), so the extra RAM is one tensor, never
the model; for a transformers model whose layout transformers converts (fused experts, hf_layout.py) one decoder
layer's tensors at a time, and their fused copies."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from torch import Tensor, nn

from megatrain_lightning.checkpointing import directories as ckpt
from megatrain_lightning.hf import layout as hf_layout
from megatrain_lightning.storage.store import HostStore

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; recomputed here
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # safetensors dtype names the masters can be read from


def shards(directory: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint directory (through its index when sharded)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint directory not found: {d}")
    if (d / INDEX).is_file():
        weight_map = json.loads((d / INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (d / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise FileNotFoundError(f"{d} has neither {INDEX} nor {SINGLE} (only safetensors checkpoints are read)")
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"shard(s) listed in {d / INDEX} are missing: {', '.join(missing)}")
    return [d / f for f in files]


def hf_prefix(names: Iterable[str]) -> str:
    """The LightningModule's prefix in front of Hugging Face names ("model." for CausalLM.model = Llama)."""
    for name in names:
        if name.endswith("model.embed_tokens.weight"):
            return name[:-len("model.embed_tokens.weight")]
    raise ckpt.CheckpointError("no `model.embed_tokens.weight`: Hugging Face import and export need the Llama layout")


ADAPTER_PARTS = ("lora_", "ia3_", "hada_", "lokr_", "oft_", "boft_", "vera_")  # peft adapters' own parameters


def base_name(name: str) -> str | None:
    """The name a Hugging Face checkpoint gives a parameter of a peft-adapted model (None: an adapter's own)."""
    parts = name.split(".")
    if any(p.startswith(ADAPTER_PARTS) for p in parts):
        return None
    return ".".join(p for p in parts if p != "base_layer")


def load_into_store(directory: str | Path, store: HostStore, aliases: dict[str, str] | None = None,
                    hf_model: nn.Module | None = None, buffers: dict[str, Tensor] | None = None) -> None:
    """Copies a Hugging Face checkpoint's weights into the store's fp32 masters (Adam moments stay zero). Every
    shard header is checked first: missing, unexpected and mis-shaped tensors are listed before anything is
    written. `hf_model`: the transformers model the store holds, whose layout transformers converts on load
    (hf_layout.py: one decoder layer's tensors at a time); None: names and layouts as in the checkpoint.
    `buffers`: the module's buffers by full name; a checkpoint's value for one is copied into it (a router's
    trained bias), the others keep what the model's initialization gave them."""
    # the checkpoint's name of each stored parameter: a peft adapter wraps a layer (`q_proj.base_layer.weight`
    # holds the checkpoint's `q_proj.weight`); the adapter's own parameters are not in it and keep their
    # initialization
    index = {plain: name for name in store.index if (plain := base_name(name)) is not None}
    prefix, aliases, buffers = hf_prefix(index), aliases or {}, buffers or {}
    files = shards(directory)
    where: dict[str, Path] = {}  # checkpoint name -> its shard
    problems = []
    headers = {file: ckpt.read_header(file) for file in files}
    meta: dict[str, Tensor] = {}
    for file, header in headers.items():
        for name, info in header.items():
            if name == "__metadata__" or name.endswith(IGNORED_SUFFIXES):
                continue
            if info["dtype"] not in FLOAT_DTYPES:
                problems.append(f"{name}: dtype {info['dtype']} is not a floating-point type")
            where[name] = file
            meta[name] = torch.empty(info["shape"], device="meta")
    # groups converted together: a decoder layer's tensors when transformers fuses some of them, else one tensor
    groups = hf_layout.by_layer(where) if hf_model is not None else {n: [n] for n in where}
    convert = (lambda d: hf_layout.to_module(hf_model, d)) if hf_model is not None else dict
    seen = set()
    needed = set()  # the groups this rank reads: a buffer (every rank runs every layer) or a unit it owns
    for key, names in groups.items():
        for name, t in convert({n: meta[n] for n in names}).items():
            full = prefix + name
            if full in aliases:  # a tied weight saved twice: the store keeps one copy
                continue
            if full in buffers or (full in index and not store.units[store.index[index[full]][0]].remote):
                needed.add(key)
            if full in buffers:
                if tuple(t.shape) != tuple(buffers[full].shape):
                    problems.append(f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(buffers[full].shape)}")
                continue
            if full not in index:
                problems.append(f"{name}: not in the model")
                continue
            _, entry = store.index[index[full]]
            if tuple(t.shape) != tuple(entry.shape):
                problems.append(f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(entry.shape)}")
            seen.add(full)
    problems += [f"{k[len(prefix):]}: missing from the checkpoint" for k in index if k not in seen]
    if problems:
        raise ckpt.CheckpointError(f"Hugging Face checkpoint {directory} does not match the model:\n  "
                                   + "\n  ".join(problems[:50]))
    with contextlib.ExitStack() as stack:
        opened: dict[Path, Any] = {}
        for key, names in groups.items():
            if key not in needed:  # several ranks: another rank's units only (its shards are not even opened)
                continue
            tensors = {}
            for n in names:
                if where[n] not in opened:
                    opened[where[n]] = stack.enter_context(safe_open(str(where[n]), framework="pt"))
                try:
                    tensors[n] = opened[where[n]].get_tensor(n)
                except Exception as e:
                    raise ckpt.CheckpointError(f"corrupted safetensors file {where[n]}: {e}") from e
            for name, value in convert(tensors).items():
                full = prefix + name
                if full in aliases:
                    continue
                if full in buffers:
                    buffers[full].copy_(value)
                    continue
                store.set_weight(index[full], value)  # nothing for another rank's unit, in a group read for a buffer
