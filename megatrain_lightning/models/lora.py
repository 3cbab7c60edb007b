"""LoRA adapters for train.py's models (`lora=default` in conf/): peft's LoRA layers injected into the model's
decoder layers, the base frozen and held in the compute dtype (2 bytes a parameter in the store: it has no fp32
master), the adapters trainable in fp32. The parameter names stay the model's own, peft's wrappers aside
(`q_proj.base_layer.weight`, `q_proj.lora_A.default.weight`), so a Hugging Face checkpoint imports into the base
(hf/load.py) and the adapter exports in peft's format (hf/export.py)."""

from __future__ import annotations

import torch
from torch import nn

from megatrain_lightning.lora_options import ALL_LINEAR, LoRA
from megatrain_lightning.errors import UserError


def add_lora(model: nn.Module, layers: nn.Module, lora: LoRA, base_dtype: torch.dtype) -> nn.Module:
    """Injects `lora` into the linear layers inside `layers` (the decoder layers) of `model`, in place: every
    parameter of the base frozen in `base_dtype`, the adapters trainable in fp32. Needs peft."""
    try:
        import peft
    except ImportError:
        raise UserError("lora: pip install 'megatrain-lightning[hf]' (peft)") from None
    targets = lora.target_modules
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in layers.named_modules() if isinstance(m, nn.Linear)})
    if targets == ALL_LINEAR:
        targets = linear  # inside the layers only: the head and embeddings stay as they are
    else:
        unknown = sorted(set(targets) - set(linear))
        if unknown:
            raise UserError(f"lora.target_modules: {unknown} are not linear layers of the decoder layers; they "
                            f"have {linear}")
    model.to(base_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    peft.inject_adapter_in_model(peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(targets)), model)
    for p in model.parameters():
        if p.requires_grad:  # peft makes the adapters in the base's dtype: their masters are fp32 (as peft's own
            p.data = p.data.float()  # get_peft_model does)
    return model
