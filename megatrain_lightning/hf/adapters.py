"""Per-architecture knowledge, as data: where a transformers causal LM keeps its decoder layers. The engine needs
nothing else from the model: the model's own forward calls each layer (layer_calls.py), the rest of the model
(embeddings, final norm, head, rotary tables) stays resident on the device.

Supported: decoders whose forward runs each of `base_model.layers` once, in order, on the hidden state (the
families in ARCHITECTURES, tested against Lightning's default strategy in tests/test_hf_objects.py)."""

from __future__ import annotations

import sys

from typing import Callable

import torch
from torch import nn

from megatrain_lightning.config import FLEX_ATTENTION_TYPES
from megatrain_lightning.errors import UserError
from megatrain_lightning.models.llama import Trunk

# model_type -> the attribute of the base model holding the decoder layers
ARCHITECTURES = {"llama": "layers", "mistral": "layers", "qwen2": "layers", "qwen3": "layers", "mixtral": "layers",
                 "qwen3_moe": "layers", "qwen2_moe": "layers", "phi3": "layers", "gemma3_text": "layers",
                 "gpt_oss": "layers", "deepseek_v3": "layers", "glm4_moe": "layers"}


# a decoder layer's attributes that only its KV cache reads (streamed layers run without one): layers that differ in
# nothing else compute alike (engine templates; transformers 5 sets a sliding window or an attention type as
# attributes of their own, which do count)
CACHE_ONLY_ATTRIBUTES = ("layer_idx",)


def is_transformers_model(m: nn.Module) -> bool:
    """A transformers PreTrainedModel (told without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(m).__mro__)


def transformers_model(module: nn.Module) -> nn.Module | None:
    """The first transformers model in `module` (itself, or a submodule: a LightningModule's, peft's base), or None."""
    return next((m for m in module.modules() if is_transformers_model(m)), None)


class LayerList(Trunk):
    """A transformers model's decoder layers, streamed. Until the strategy attaches its engine this is the model's
    ModuleList; then indexing, slicing and iterating it (what the model's forward does) yield callables that run
    each layer through the engine, reading every other attribute (a layer's `attention_type`) from the layer."""

    calls = None  # layer_calls.LayerCalls, set by the strategy

    def __getitem__(self, idx):
        if self.calls is None:
            return super().__getitem__(idx)
        if isinstance(idx, slice):
            return [_LayerCall(self, i) for i in range(len(self))[idx]]
        return _LayerCall(self, range(len(self))[idx])

    def __iter__(self):
        if self.calls is None:
            return super().__iter__()
        return iter(self[:])


class _LayerCall:
    def __init__(self, layers: LayerList, i: int) -> None:
        self._layers, self._i = layers, i

    def __call__(self, hidden_states, *args, **kwargs):
        return self._layers.calls(self._i, hidden_states, args, kwargs)

    def __getattr__(self, name: str):
        return getattr(self._layers._modules[str(self._i)], name)


# peft methods whose layers cannot be streamed, and why (the others wrap a layer's modules or the input embeddings)
UNSTREAMABLE_PEFT = {"PREFIX_TUNING": "gives every decoder layer a key/value prefix (past_key_values), and streamed "
                                      "layers run without a KV cache"}


def _refuse_unstreamable_adapters(module: nn.Module) -> None:
    for m in module.modules():
        configs = getattr(m, "peft_config", None)
        for config in configs.values() if isinstance(configs, dict) else ():
            kind = getattr(getattr(config, "peft_type", None), "value", None)
            if kind in UNSTREAMABLE_PEFT:
                raise UserError(f"peft {kind}: {UNSTREAMABLE_PEFT[kind]}; LoRA, DoRA, IA3, LoHa, VeRA and prompt "
                                "tuning train under the megatrain strategy")


def stream_layers(module: nn.Module) -> LayerList | None:
    """Finds a transformers causal LM in `module` and swaps its decoder layer list for a LayerList (same layers, same
    parameter names); None when there is none. An architecture not in ARCHITECTURES is refused by name."""
    _refuse_unstreamable_adapters(module)
    model = transformers_model(module)
    if model is None:
        return None
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in ARCHITECTURES:
        raise UserError(f"{type(model).__name__} (model_type {kind!r}) cannot be streamed: supported transformers "
                        f"architectures are {', '.join(sorted(ARCHITECTURES))} (decoders whose forward runs each "
                        "layer once, in order)")
    base = model.base_model
    layers = getattr(base, ARCHITECTURES[kind])
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"{type(model).__name__}: its base model's {ARCHITECTURES[kind]!r} is not a list of layers")
    if isinstance(layers, LayerList):
        return layers
    streamed = LayerList(list(layers))
    setattr(base, ARCHITECTURES[kind], streamed)
    return streamed


def initializer(module: nn.Module) -> Callable[[nn.Module], None] | None:
    """For a transformers model in `module`: initializes a freshly materialized part of it the way the model's
    own initialization does (its `_init_weights` on each submodule: linear and embedding weights, norms, experts,
    routers, rotary tables); None when there is no transformers model. peft's adapters: `init_adapters`."""
    model = transformers_model(module)
    if model is None or not callable(getattr(model, "_init_weights", None)):
        return None
    return lambda part: part.apply(model._init_weights)


def adapter_layers(module: nn.Module) -> list[nn.Module]:
    """peft's adapter layers in `module` (none when peft was never imported)."""
    peft = sys.modules.get("peft")
    if peft is None:
        return []
    return [m for m in module.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]


def init_adapters(layers: list[nn.Module], module: nn.Module) -> None:
    """Initializes peft adapter `layers` of `module` materialized from the meta device as peft does, after their
    base layers (initialized, or to be imported: a checkpoint of the base model holds no adapter)."""
    configs = next((m.peft_config for m in module.modules() if isinstance(getattr(m, "peft_config", None), dict)), {})
    for m in layers:
        _adapter_init(m, configs)


# peft's LoRA initializations that need nothing but the adapter's own shapes (reset_lora_parameters)
_LORA_INITS = (True, False, "gaussian")


def _adapter_init(m: nn.Module, configs: dict) -> None:
    """A peft adapter layer (LoRA's lora_A/lora_B) initialized as peft initializes it: A kaiming-uniform (or
    gaussian), B zero, so the adapted model starts as its base model; the model's `_init_weights` alone would draw
    B like any Linear and start somewhere else. DoRA's magnitudes are the base weight's row norms (B being zero);
    `dora_magnitudes` sets them again once the base weights are imported. Adapters whose initialization needs more
    (PiSSA, LoftQ, IA3, DoRA on a layer other than a Linear, ...) are refused by name rather than started wrong."""
    names = list(getattr(m, "lora_A", {}) or [])
    for name in names or [None]:
        init_weights = getattr(configs.get(name), "init_lora_weights", True)
        dora = bool(getattr(m, "use_dora", {}).get(name)) if name is not None else False
        plain_linear = isinstance(m.get_base_layer(), nn.Linear) and not getattr(m, "fan_in_fan_out", False)
        if name is None or (dora and not plain_linear) or init_weights not in _LORA_INITS \
                or not hasattr(m, "reset_lora_parameters"):
            what = (f"DoRA on a {type(m.get_base_layer()).__name__}" if dora else f"init_lora_weights={init_weights!r}"
                    if name is not None else type(m).__name__)
            raise UserError(f"a peft model built in configure_model (on the meta device) with {what}: its adapters' "
                            "initialization needs more than the base weights or is not LoRA's; build the peft model in "
                            "the LightningModule's __init__ instead (the strategy then takes its weights as they are)")
        m.reset_lora_parameters(name, init_weights)
        if dora:
            with torch.no_grad():
                m.lora_magnitude_vector[name].weight.copy_(row_norms(m.get_base_layer().weight))


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """DoRA's magnitude of a Linear weight [out, in] with its LoRA at zero: the L2 norm of each output row, fp32."""
    return torch.linalg.norm(weight.float(), dim=1)


def dora_magnitudes(module: nn.Module) -> list[tuple[str, str]]:
    """(magnitude, base weight) parameter names, relative to `module`, of its DoRA adapter layers."""
    out = []
    for mn, m in module.named_modules():
        at = f"{mn}." if mn else ""
        for name, on in (getattr(m, "use_dora", None) or {}).items():
            if on:
                out.append((f"{at}lora_magnitude_vector.{name}.weight", f"{at}base_layer.weight"))
    return out


def eager_attention_heads(module: nn.Module) -> int:
    """Attention heads of a transformers model in `module` whose attention materializes its [heads, T, T] scores
    (transformers' "eager" implementation: gpt-oss's default, its attention sinks having no SDPA path), for the
    batch sweep's chunk rule; 0 when there is none or attention runs fused (SDPA, flash)."""
    if attention_implementation(module) != "eager":
        return 0
    model = transformers_model(module)
    return int(getattr(model.config, "num_attention_heads", 0) or 0)


def fused_attention_hint(module: nn.Module) -> str | None:
    """Where the transformers model in `module` runs transformers' eager attention: how to run it fused instead
    (flex_attention for the FLEX_ATTENTION_TYPES, whose attention sinks have no SDPA path; else sdpa), for a CUDA run
    to say; None where attention is fused already."""
    if attention_implementation(module) != "eager":
        return None
    kind = transformers_model(module).config.model_type
    fused = "flex_attention" if kind in FLEX_ATTENTION_TYPES else "sdpa"
    return (f"{kind}: its attention runs transformers' eager implementation (scores materialized, layers uncompiled); "
            f"model.attn_implementation={fused} (train.py), or model.set_attn_implementation({fused!r}) on the model "
            "before fit, runs it fused and compiled")


def attention_implementation(module: nn.Module) -> str | None:
    """transformers' name of the attention the transformers model in `module` runs (None: no such model)."""
    model = transformers_model(module)
    return getattr(getattr(model, "config", None), "_attn_implementation", None)
