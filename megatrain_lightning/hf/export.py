"""Hugging Face checkpoints out: a megatrain checkpoint directory read unit by unit and written as shards of at most
`max_shard_GB` with the model's config.json and the tokenizer files of the checkpoint it was imported from, so that
`transformers` (`from_pretrained`, `pipeline`) loads the result.

What the user owns is never touched: the export is written into a hidden temporary directory beside OUT and renamed
into place. An existing OUT must be empty, or, with `overwrite`, an earlier export (its MARKER lists the files it
wrote, and OUT holds no others); never the current directory, the checkpoint, or a folder holding either.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from megatrain_lightning.checkpointing import directories as ckpt
from megatrain_lightning.hf import layout as hf_layout
from megatrain_lightning.config import Config
from megatrain_lightning.lora_options import LoRA
from megatrain_lightning.errors import UserError
from megatrain_lightning.hf.load import INDEX, base_name, hf_prefix


ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft's file names
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
MARKER = ".megatrain-export.json"  # the files an export wrote: what a later --overwrite may replace
# what transformers' AutoTokenizer and pipeline read beside the weights (generation_config.json: eos, sampling)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def imported_from(source: Path) -> Path | None:
    """The Hugging Face checkpoint directory the run under `source` was initialized from (the strategy's
    `init_from`, recorded in every checkpoint it saves), when it still exists."""
    path = ckpt.load_meta(source).get("megatrain", {}).get("init_from")
    return Path(path) if path and Path(path).is_dir() else None


def default_dtype(source: Path, merge: bool = False) -> tuple[str, str]:
    """The dtype an export writes when none is asked for, and why: a LoRA run's adapter its trained fp32 values;
    a model the imported model's own (its config.json's `torch_dtype`), else bfloat16."""
    meta = ckpt.load_meta(source)
    if LoRA.from_dict(meta.get("hyper_parameters", {}).get("lora")).enabled and not merge:
        return "float32", "a LoRA adapter's trained values"
    configs = [meta.get("hyper_parameters", {}).get("hf_config") or {}]
    origin = imported_from(source)
    if origin is not None and (origin / "config.json").is_file():
        configs.insert(0, json.loads((origin / "config.json").read_text()))
    for config in configs:
        dtype = config.get("torch_dtype") or config.get("dtype")
        if dtype in DTYPES:
            return dtype, "the imported model's dtype"
    return "bfloat16", "the default"


def check_out_dir(out: Path, source: Path, overwrite: bool) -> None:
    """Raises UserError unless exporting into `out` touches nothing the user owns (module docstring)."""
    target, cwd = out.resolve(), Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise UserError(f"{out}: is the current directory or holds it; export into a new directory")
    src = source.resolve()
    if target == src or target in src.parents:
        raise UserError(f"{out}: holds the checkpoint {source}; export into a new directory")
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"{out}: exists and is not a directory; export into a new directory")
    names = {p.name for p in target.iterdir()}
    if not names:
        return
    if not overwrite:
        raise UserError(f"{out}: is not empty; export into a new directory (--overwrite replaces an earlier "
                        "export there, nothing else)")
    try:
        ours = set(json.loads((target / MARKER).read_text())["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        ours = set()
    # an export writes plain files only: a folder or link under one of their names is the user's
    foreign = sorted((names - ours) | {n for n in names & ours if (target / n).is_symlink() or not (target / n).is_file()})
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"{out}: holds files an export did not write ({shown}); --overwrite replaces only an "
                        "earlier export; export into a new directory")


def export(checkpoint_dir: str | Path, out_dir: str | Path, dtype: str | None = None, max_shard_GB: float = 5.0,
           overwrite: bool = False, tokenizer: str | Path | None = None, merge: bool = False) -> Path:
    """Writes a megatrain checkpoint (or the newest intact one in a directory of them) as a Hugging Face checkpoint
    directory `out_dir`. `dtype`: None is `default_dtype`'s. `tokenizer`: a directory (or a file in it) whose
    tokenizer files are copied; None: those beside the checkpoint the run was imported from, if any. A LoRA run
    (conf/lora): its adapter in peft's format (adapter_config.json, adapter_model.safetensors: what
    `PeftModel.from_pretrained(base, out_dir)` loads), or with `merge` the whole model with the adapters folded
    into the base weights."""
    src = ckpt.resolve(checkpoint_dir)
    if not (src / ckpt.MODEL_CONFIG).is_file():
        raise ckpt.CheckpointError(f"{src} has no {ckpt.MODEL_CONFIG}: only checkpoints of megatrain's CausalLM "
                                   "can be exported")
    if dtype is not None and dtype not in DTYPES:  # None: default_dtype, below
        raise UserError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tokenizer_files = _tokenizer_files(src, tokenizer)
    out = Path(out_dir)
    check_out_dir(out, src, overwrite)
    config = Config(**json.loads((src / ckpt.MODEL_CONFIG).read_text()))
    # a transformers model trained as itself (hf_lm.HFCausalLM): its own config.json, its checkpoint layout
    meta = ckpt.load_meta(src)
    lora = LoRA.from_dict(meta.get("hyper_parameters", {}).get("lora"))
    if merge and not lora.enabled:
        raise UserError(f"--merge: {src} is not of a LoRA run (lora.r is 0): there is nothing to merge")
    adapter_only = lora.enabled and not merge
    dtype = dtype or default_dtype(src, merge)[0]
    hf_config = meta.get("hyper_parameters", {}).get("hf_config")
    hf_model = _meta_model(hf_config) if hf_config else None
    entries = json.loads((src / ckpt.MANIFEST).read_text())["units"]
    units = [src / u["file"] for u in entries]
    masters = [[k for k in ckpt.read_header(f) if k != "__metadata__" and "/" not in k] for f in units]
    prefix = hf_prefix(k for keys in masters for k in keys)  # "exp_avg/..." keys are optimizer state
    # its persistent buffers (a router's bias) are part of its checkpoint, by decoder layer
    buffers = hf_layout.by_layer(k[len(prefix):] for k in meta.get("state_dict", {}) if k.startswith(prefix)) \
        if hf_model is not None else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        limit = max_shard_GB * 1e9
        shard: list[tuple[str, Tensor]] = []
        written: list[tuple[str, list[str]]] = []
        adapter: list[tuple[str, Tensor]] = []  # a LoRA run's adapter (small: one file)
        shard_bytes = total = 0

        def flush() -> None:
            name = f"part-{len(written):05d}.safetensors"
            ckpt.write_safetensors(tmp / name, shard, metadata={"format": "pt"})
            written.append((name, [n for n, _ in shard]))
            shard.clear()

        for file, keys, entry in zip(units, masters, entries):  # one unit file at a time
            with safe_open(str(file), framework="pt") as f:
                tensors = {key[len(prefix):]: ckpt.get_verified(f, key, entry, file) for key in keys
                           if not adapter_only or base_name(key) is None}
            if adapter_only:  # peft's names: the module's, "base_model.model." in front, no adapter name
                adapter += [("base_model.model." + n.replace(".default.", "."), t.to(DTYPES[dtype]).contiguous())
                            for n, t in tensors.items()]
                continue
            if lora.enabled:
                tensors = merged(tensors, lora)
            if hf_model is not None:  # a unit is a decoder layer or the rest: transformers' rules stay within one
                layer = next(iter(hf_layout.by_layer(tensors)))
                tensors.update({n: meta["state_dict"][prefix + n] for n in buffers.get(layer, ())})
                tensors = hf_layout.to_checkpoint(hf_model, tensors)
            for name, t in tensors.items():
                t = t.to(DTYPES[dtype]).contiguous()
                if shard and shard_bytes + t.nbytes > limit:
                    flush()
                    shard_bytes = 0
                shard.append((name, t))
                shard_bytes += t.nbytes
                total += t.nbytes
        if shard:
            flush()
        if adapter_only:
            ckpt.write_safetensors(tmp / ADAPTER_WEIGHTS, adapter, metadata={"format": "pt"})
            files = [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
            targets = sorted({n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in adapter if ".lora_A." in n})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(lora, imported_from(src), targets), indent=1))
        else:
            weight_map = {}
            files = [INDEX, "config.json"]
            for k, (name, keys) in enumerate(written):
                final = f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
                os.rename(tmp / name, tmp / final)
                weight_map.update({key: final for key in keys})
                files.append(final)
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=1))
            hf_json = {**hf_config, "torch_dtype": dtype, "dtype": dtype} if hf_config else config.to_hf(dtype)
            (tmp / "config.json").write_text(json.dumps(hf_json, indent=1))
        for f in tokenizer_files:
            shutil.copyfile(f, tmp / f.name)
            files.append(f.name)
        (tmp / MARKER).write_text(json.dumps({"files": files, "checkpoint": str(src.resolve()), "dtype": dtype},
                                             indent=1))
        check_out_dir(out, src, overwrite)  # again: nothing of the user's appeared there meanwhile
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}" if out.exists() else None
        if old is not None:  # empty, or an earlier export of only our files (checked)
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _tokenizer_files(source: Path, tokenizer: str | Path | None) -> list[Path]:
    """The tokenizer files an export copies: from `tokenizer` (a directory or a file in it) or the imported
    checkpoint's directory."""
    if tokenizer is not None:
        where = Path(tokenizer)
        if not where.exists():
            raise UserError(f"--tokenizer: {where} does not exist")
        where = where if where.is_dir() else where.parent
        found = [where / n for n in TOKENIZER_FILES if (where / n).is_file()]
        if not any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for f in found):
            raise UserError(f"--tokenizer: {where} holds no tokenizer.json, tokenizer.model or vocab.json")
        return found
    where = imported_from(source)
    return [] if where is None else [where / n for n in TOKENIZER_FILES if (where / n).is_file()]


def _meta_model(hf_config: dict[str, Any]) -> nn.Module:
    """The transformers model of a config.json, on the meta device (its layout rules need the model, not weights)."""
    from megatrain_lightning.hf.model import build_model

    with torch.device("meta"):
        return build_model(hf_config)


def merged(tensors: dict[str, Tensor], lora: LoRA) -> dict[str, Tensor]:
    """One unit's tensors with each LoRA-adapted weight folded in (W + alpha/r * B @ A, in fp32) under the base
    layer's own name; the adapters dropped."""
    out = {}
    for name, t in tensors.items():
        if base_name(name) is None:
            continue
        if name.endswith(".base_layer.weight"):
            module = name[:-len(".base_layer.weight")]
            a, b = tensors[f"{module}.lora_A.default.weight"], tensors[f"{module}.lora_B.default.weight"]
            t = t.float() + (lora.alpha / lora.r) * (b.float() @ a.float())  # [out, r] @ [r, in]
        out[base_name(name)] = t
    return out


def adapter_config(lora: LoRA, base: Path | None, targets: list[str]) -> dict[str, Any]:
    """peft's adapter_config.json for `lora` on modules named `targets` (the fields peft's LoraConfig reads; the rest
    take its defaults)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "target_modules": targets,
            "base_model_name_or_path": str(base) if base is not None else None}
