"""Checkpoint names <-> module names of a transformers model, one layer's tensors at a time.

transformers 5 fuses some weights on load and splits them back on save: a Mixtral checkpoint's
`block_sparse_moe.experts.{e}.w1.weight` / `w3` become one `mlp.experts.gate_up_proj` [experts, 2 * inter, hidden]
in the module. Import and export here apply transformers' own rules (its conversion mapping, the code
`from_pretrained` and `save_pretrained` run), so every family it converts is converted the same way. The rules
group tensors within a layer, never across layers, so a layer's tensors are converted together. Meta tensors go
through too: the shapes a checkpoint will give are known before any data is read. transformers 4 has no
conversions (module names are checkpoint names).
"""

from __future__ import annotations

import re
from copy import deepcopy
from typing import Iterable

from torch import Tensor, nn

LAYER = re.compile(r"^(.*?\blayers\.\d+\.)")  # a decoder layer's prefix in a name ("model.layers.7.")


def _rules(model: nn.Module, saving: bool):
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers 4
        return None
    try:
        rules = get_model_conversion_mapping(model, add_legacy=not saving)
    except TypeError:  # a transformers without the legacy renamings' switch
        rules = get_model_conversion_mapping(model)
    if not rules:
        return None
    return [r for r in rules if isinstance(r, WeightRenaming)], [r for r in rules if isinstance(r, WeightConverter)]


def to_module(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint-named tensors (one layer's, or the ones outside the layers) -> the module's names and layout
    (what `from_pretrained` does to them)."""
    rules = _rules(model, saving=False)
    if rules is None:
        return dict(tensors)
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    renamings, converters = rules
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    out, pending = {}, {}
    for key, t in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):
        name, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            out[name] = t
            continue
        pending.setdefault(name, deepcopy(by_pattern[pattern])).add_tensor(name, key, pattern, t)
    for name, conv in pending.items():
        for target, value in conv.convert(name, model=model, config=model.config).items():
            out[target] = value[0] if isinstance(value, list) else value
    return out


def to_checkpoint(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Module-named tensors -> the checkpoint's names and layout (what `save_pretrained` writes)."""
    if _rules(model, saving=True) is None:
        return dict(tensors)
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


def by_layer(names: Iterable[str]) -> dict[str, list[str]]:
    """Names grouped by decoder layer ("" for those outside every layer), in first-seen order."""
    groups: dict[str, list[str]] = {}
    for n in names:
        m = LAYER.match(n)
        groups.setdefault(m.group(1) if m else "", []).append(n)
    return groups
