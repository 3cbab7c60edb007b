"""Llama-family model configuration with named presets.

Pure Python (no torch import): the planner reads the same presets to answer a check in well under a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


@dataclass
class Config:
    name: str = "custom"
    vocab_size: int = 256
    n_layer: int = 2
    hidden_size: int = 64
    n_head: int = 4
    n_kv_head: int | None = None  # None: plain multi-head attention (n_kv_head = n_head)
    intermediate_size: int = 128  # SwiGLU MLP width
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 puts a bias on q/k/v projections
    # Llama 3.1+ frequency scaling, in Hugging Face's form: {"rope_type": "llama3", "factor": 8.0,
    # "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    rope_scaling: dict | None = None
    head_size: int | None = None  # per-head width when not hidden_size / n_head (Qwen3: 128 at hidden 1024, 16 heads)
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's q and k before RoPE
    # Mistral / Qwen: each token attends to this many tokens back. Attention here is full causal, which is the same
    # for sequences up to this length: longer ones are refused (never silently different)
    sliding_window: int | None = None
    # transformers families with local attention on some layers (gpt-oss: every other layer within 128 tokens;
    # Gemma 3: five of six within a window): the window and the share of layers that use it (a share, so that a
    # truncated depth keeps it), for the planner's attention FLOPs (transformers runs them). megatrain's Llama has
    # none: its sliding_window refuses longer sequences instead
    local_window: int | None = None
    local_share: float = 0.0
    hf_type: str | None = None  # the Hugging Face model_type to export as (None: llama, or qwen2 with qkv_bias)
    # a checkpoint's model_type that trains as the transformers model itself (model=hf: hf_lm.HFCausalLM; the
    # TRANSFORMERS_HF_TYPES); this Config is then the planner's shape of it. None: megatrain_lightning.Llama
    transformers_type: str | None = None
    # such a model's attention, by transformers' name (eager, sdpa, flex_attention, ...); None: `attention(cuda)`,
    # transformers' choice (SDPA) but for the FLEX_ATTENTION_TYPES
    attn_implementation: str | None = None
    # Mixture-of-experts (megatrain_lightning.Llama has no experts: such models train as the transformers model,
    # transformers_type): each layer's MLP is n_experts SwiGLU experts of moe_intermediate_size and a router, of which
    # experts_per_token run for each token. 0: a dense MLP of intermediate_size.
    n_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0  # experts of moe_intermediate_size every token runs besides its routed ones
    n_dense_layers: int = 0  # the first layers keep a dense MLP of intermediate_size (DeepSeek's first_k_dense_replace)
    # Multi-head latent attention (DeepSeek-V3; planner shapes): q and kv pass through low-rank projections (0: no
    # low rank for q), heads of head_size for q.k of which qk_rope_head_dim carry the rotary part, of v_head_size for
    # v. kv_lora_rank 0: ordinary attention.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_size: int | None = None
    # derived in __post_init__
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for f in ("vocab_size", "n_layer", "hidden_size", "n_head", "n_kv_head", "intermediate_size", "max_seq_len"):
            if getattr(self, f) < 1:
                raise ValueError(f"Config.{f} must be >= 1, got {getattr(self, f)}")
        if self.head_size is None and self.hidden_size % self.n_head:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            need = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            if kind != "llama3" or not need <= set(self.rope_scaling):
                raise ValueError(f"rope_scaling supports rope_type 'llama3' with {sorted(need)}; got {self.rope_scaling}")
        if self.attn_implementation is not None and not self.transformers_type:
            raise ValueError(f"attn_implementation={self.attn_implementation!r}: only a model that trains as the "
                             "transformers model (transformers_type) chooses its attention; megatrain's Llama runs "
                             "SDPA")
        if not 0 <= self.local_share <= 1 or self.local_share and not (self.local_window or 0) >= 1:
            raise ValueError(f"local_share must be in [0, 1] with a local_window >= 1, got {self.local_share} and "
                             f"{self.local_window}")
        if self.hf_type is not None and self.hf_type not in HF_TYPES:
            raise ValueError(f"hf_type {self.hf_type!r} is not one of {sorted(HF_TYPES)}")
        self.head_dim = self.head_size or self.hidden_size // self.n_head
        if self.n_experts and not 0 < self.experts_per_token <= self.n_experts or self.n_experts and \
                self.moe_intermediate_size < 1:
            raise ValueError(f"a mixture of {self.n_experts} experts needs 1 <= experts_per_token <= n_experts and "
                             f"moe_intermediate_size >= 1, got {self.experts_per_token} and "
                             f"{self.moe_intermediate_size}")
        if (self.n_shared_experts or self.n_dense_layers) and not self.n_experts:
            raise ValueError("n_shared_experts and n_dense_layers describe a mixture of experts: set n_experts")
        if not 0 <= self.n_dense_layers < self.n_layer:
            raise ValueError(f"n_dense_layers must be in [0, n_layer), got {self.n_dense_layers}")
        if self.kv_lora_rank and not 0 < self.qk_rope_head_dim < self.head_dim:
            raise ValueError(f"latent attention needs 0 < qk_rope_head_dim < head_size, got {self.qk_rope_head_dim} "
                             f"and {self.head_dim}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """A preset by `name`, with any other Config field overridden (what `conf/model/*.yaml` holds); name `hf`
        with `path`: the config.json of a Hugging Face checkpoint directory."""
        d = dict(d)
        if "name" not in d:
            raise ValueError("a model config needs a preset `name`")
        name = d.pop("name")
        if name == "hf":
            path = d.pop("path", None)
            if not path or path == "???":  # "???": Hydra's mark of a value nobody gave
                raise ValueError("model.path: required: model=hf needs model.path, a Hugging Face checkpoint directory")
            config_file = Path(path) / "config.json"
            if not config_file.is_file():
                raise FileNotFoundError(f"Hugging Face config not found: {config_file}")
            return replace(cls.from_hf(json.loads(config_file.read_text()), name=Path(path).name), **d)
        unknown = set(d) - set(cls.field_names())
        if unknown:
            raise ValueError(f"unknown model field(s) {sorted(unknown)}; known: {cls.field_names()}")
        return cls.from_name(name, **d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "hf") -> Config:
        """From a Hugging Face config.json of a Llama, Mistral, Qwen2 or Qwen3 model (transformers 4 or 5 layout);
        of the families that train as the transformers model, the planner's shape (`moe_from_hf`, `dense_from_hf`)."""
        kind = hf.get("model_type")
        if kind in MOE_HF_TYPES:
            return cls.moe_from_hf(hf, name)
        if kind in TRANSFORMERS_HF_TYPES:
            return cls.dense_from_hf(hf, name)
        if kind not in HF_TYPES:
            raise ValueError(f"model_type {kind!r} is not supported; supported: "
                             f"{', '.join([*HF_TYPES, *TRANSFORMERS_HF_TYPES])}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
        if kind in ("llama", "mistral", "qwen3") and (hf.get("attention_bias") or hf.get("mlp_bias")):
            raise ValueError(f"{kind} with attention_bias or mlp_bias is not supported")
        n_head = hf["num_attention_heads"]
        head = hf.get("head_dim")
        if head is not None and head != hf["hidden_size"] // n_head and kind not in ("qwen3", "mistral"):
            raise ValueError(f"head_dim {head} != hidden_size / num_attention_heads is not supported for {kind}")
        rope = dict(hf.get("rope_parameters") or {})  # transformers 5 keeps theta and scaling here
        theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        max_seq = hf.get("max_position_embeddings", 2048)
        window = hf.get("sliding_window") if hf.get("use_sliding_window", kind == "mistral") else None
        if window and window >= max_seq:  # the window covers every position: full causal attention
            window = None
        return cls(name=name, vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                   hidden_size=hf["hidden_size"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                   intermediate_size=hf["intermediate_size"], max_seq_len=max_seq, rope_theta=float(theta),
                   norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   qkv_bias=kind == "qwen2", rope_scaling=dict(scaling) if scaling else None,
                   head_size=head if head and head != hf["hidden_size"] // n_head else None,
                   qk_norm=kind == "qwen3", sliding_window=window, hf_type=kind)

    @classmethod
    def moe_from_hf(cls, hf: dict[str, Any], name: str = "hf") -> Config:
        """The planner's shape of a mixture-of-experts config.json (these train as transformers model objects, not
        as megatrain_lightning.Llama): experts, shared experts, dense first layers, latent attention."""
        kind = hf["model_type"]
        sparse = hf.get("decoder_sparse_step", 1)
        if kind == "qwen3_moe" and (sparse != 1 or hf.get("mlp_only_layers")):
            raise ValueError("qwen3_moe with dense layers between the sparse ones (decoder_sparse_step, "
                             "mlp_only_layers) is not modelled")
        experts = hf.get("num_local_experts") or hf.get("num_experts") or hf.get("n_routed_experts")
        moe_width = hf["intermediate_size"] if kind in ("mixtral", "gpt_oss") else hf["moe_intermediate_size"]
        latent = {}
        head = hf.get("head_dim")
        if kind == "deepseek_v3":
            latent = dict(q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
                          qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_size=hf["v_head_dim"])
            head = hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]
        return cls(**cls._transformers_shape(hf, name, head),
                   qk_norm=kind == "qwen3_moe" or bool(hf.get("use_qk_norm", False)), n_experts=experts,
                   experts_per_token=hf["num_experts_per_tok"], moe_intermediate_size=moe_width,
                   n_shared_experts=hf.get("n_shared_experts") or 0,
                   n_dense_layers=hf.get("first_k_dense_replace") or 0, **latent)

    @classmethod
    def dense_from_hf(cls, hf: dict[str, Any], name: str = "hf") -> Config:
        """The planner's shape of a dense config.json that trains as the transformers model (Phi-3, Gemma 3 text):
        widths and counts (Gemma's extra norms and a sliding window on some layers are not modelled: full
        attention everywhere, the FLOPs counted on the safe side)."""
        return cls(**cls._transformers_shape(hf, name, hf.get("head_dim")), qk_norm=hf["model_type"] == "gemma3_text")

    @staticmethod
    def _transformers_shape(hf: dict[str, Any], name: str, head: int | None) -> dict[str, Any]:
        """The fields every family that trains as the transformers model reads alike from its config.json."""
        n_head, D = hf["num_attention_heads"], hf["hidden_size"]
        local = sum("sliding" in str(t) for t in hf.get("layer_types") or ())  # transformers 5 lists each layer's
        return dict(name=name, vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], hidden_size=D,
                    local_window=hf.get("sliding_window") if local else None,
                    local_share=local / hf["num_hidden_layers"],
                    n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                    intermediate_size=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                    norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                    qkv_bias=bool(hf.get("attention_bias", False)),
                    head_size=head if head and head != D // n_head else None, transformers_type=hf["model_type"])

    def to_hf(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """A Hugging Face config.json of the architecture it came from (`hf_type`; else LlamaForCausalLM, or
        Qwen2ForCausalLM when q/k/v carry a bias)."""
        kind = self.hf_type or ("qwen2" if self.qkv_bias else "llama")
        window = {"sliding_window": self.sliding_window}
        if kind in ("qwen2", "qwen3"):
            window["use_sliding_window"] = self.sliding_window is not None
        return {"architectures": [HF_TYPES[kind]], "model_type": kind, "vocab_size": self.vocab_size,
                **(window if kind != "llama" else {}),
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
                "num_key_value_heads": self.n_kv_head, "head_dim": self.head_dim, "hidden_act": "silu",
                "max_position_embeddings": self.max_seq_len, "rms_norm_eps": self.norm_eps,
                "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
                "tie_word_embeddings": self.tie_embeddings, "attention_bias": False, "torch_dtype": dtype}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init]

    # ---- sizes (element counts); the planner and the tests use these ----
    @property
    def attn_params(self) -> int:
        D, H, hd = self.hidden_size, self.n_head, self.head_dim
        if self.kv_lora_rank:  # latent attention: q (low rank or not), kv through its latent, o
            v = self.v_head_size or hd
            q = (D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * hd) if self.q_lora_rank \
                else D * H * hd
            kv = D * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank \
                + self.kv_lora_rank * H * (hd - self.qk_rope_head_dim + v)
            return q + kv + H * v * D
        q = D * H * hd
        kv = 2 * D * self.n_kv_head * hd
        o = H * hd * D
        bias = (H + 2 * self.n_kv_head) * hd if self.qkv_bias else 0
        norms = 2 * hd if self.qk_norm else 0
        return q + kv + o + bias + norms

    @property
    def n_moe_layers(self) -> int:
        return self.n_layer - self.n_dense_layers if self.n_experts else 0

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def moe_mlp_params(self) -> int:
        """A mixture layer's MLP: every routed and shared expert and the router."""
        expert = 3 * self.hidden_size * self.moe_intermediate_size
        return (self.n_experts + self.n_shared_experts) * expert + self.hidden_size * self.n_experts

    @property
    def trunk_mlp_params(self) -> int:
        return (self.n_layer - self.n_moe_layers) * self.dense_mlp_params + self.n_moe_layers * self.moe_mlp_params

    @property
    def trunk_active_mlp_params(self) -> int:
        """The MLP weights one token's forward multiplies by, over the trunk: routers, top and shared experts."""
        active = (self.experts_per_token + self.n_shared_experts) * 3 * self.hidden_size * self.moe_intermediate_size \
            + self.hidden_size * self.n_experts
        return (self.n_layer - self.n_moe_layers) * self.dense_mlp_params + self.n_moe_layers * active

    @property
    def mlp_params(self) -> int:
        """Every expert and the router (a mixture), or the dense SwiGLU MLP: what a layer stores and streams (the
        mean over layers when the first are dense)."""
        return self.trunk_mlp_params // self.n_layer

    @property
    def active_mlp_params(self) -> int:
        """The MLP weights one token's forward multiplies by in a layer (the mean over layers)."""
        return self.trunk_active_mlp_params // self.n_layer

    @property
    def active_intermediate_size(self) -> int:
        """The MLP width one token's activations have (routed and shared experts' summed, for a mixture; the wider
        of that and the dense layers')."""
        if not self.n_experts:
            return self.intermediate_size
        moe = (self.experts_per_token + self.n_shared_experts) * self.moe_intermediate_size
        return max(moe, self.intermediate_size) if self.n_dense_layers else moe

    def attention(self, cuda: bool) -> str | None:
        """The attention a transformers model is built with on a CUDA device or not: the chosen one; else
        flex_attention on CUDA for the FLEX_ATTENTION_TYPES (eager elsewhere, transformers' default for them);
        else None, transformers' choice (SDPA). ValueError: flex_attention chosen for those without CUDA."""
        flex_type = self.transformers_type in FLEX_ATTENTION_TYPES
        if self.attn_implementation == "flex_attention" and flex_type and not cuda:
            raise ValueError(f"flex_attention: transformers runs {self.transformers_type}'s attention sinks through "
                             "flex attention on CUDA only")
        if self.attn_implementation or not flex_type:
            return self.attn_implementation
        return "flex_attention" if cuda else "eager"

    @property
    def eager_attention(self) -> bool:
        """Attention materializes its [heads, T, T + 1] scores (transformers' eager implementation): memory grows
        with the square of the length. Unset, the CPU's attention (the planner sets it for its hardware first)."""
        chosen = self.attn_implementation
        return chosen == "eager" if chosen else self.attention(cuda=False) == "eager"

    @property
    def active_params(self) -> int:
        """Parameters one token's forward uses (the metric's N for a mixture of experts; n_params when dense)."""
        return self.n_params - (self.trunk_mlp_params - self.trunk_active_mlp_params)

    @property
    def layer_params(self) -> int:
        """Parameters of one repeated block (attention, MLP and its two RMSNorms); the mean over the trunk when the
        first layers are dense (the planner's per-layer unit: its totals stay exact)."""
        return self.trunk_params // self.n_layer

    @property
    def max_layer_params(self) -> int:
        """The largest block: what a weight slot holds."""
        mlp = self.moe_mlp_params if self.n_experts else self.dense_mlp_params
        return self.attn_params + mlp + 2 * self.hidden_size

    @property
    def trunk_params(self) -> int:
        return self.n_layer * (self.attn_params + 2 * self.hidden_size) + self.trunk_mlp_params

    @property
    def embedding_params(self) -> int:
        """Embedding, final norm and (untied) head: the part that stays resident on the GPU."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.hidden_size + head

    @property
    def n_params(self) -> int:
        return self.trunk_params + self.embedding_params


HF_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
# mixtures of experts whose config.json the planner reads (model=hf model.path=...); they train as transformers
# model objects
MOE_HF_TYPES = ("mixtral", "qwen3_moe", "deepseek_v3", "glm4_moe", "gpt_oss")
# transformers families without an SDPA path (gpt-oss's attention sinks), whose default, eager attention materializes
# [heads, T, T + 1] scores: on CUDA they train through flex_attention, which runs the sinks fused (from its log-sum-
# exp): gpt-oss-120b's layer 1.30x faster than eager (H200, 32 x 2048, one start: docs/performance.md) and scores
# never materialized; transformers runs that path on CUDA only
FLEX_ATTENTION_TYPES = ("gpt_oss",)
# model_types that model=hf trains as the transformers model itself (hf_lm.HFCausalLM): every mixture of experts,
# and dense families whose layers megatrain_lightning.Llama does not have
TRANSFORMERS_HF_TYPES = (*MOE_HF_TYPES, "phi3", "gemma3_text")
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = {**_LLAMA31_ROPE, "factor": 32.0}

PRESETS: dict[str, Config] = {
    c.name: c
    for c in [
        # tiny: tests and the CPU quick start (byte-level vocabulary)
        Config("tiny", vocab_size=256, n_layer=4, hidden_size=64, n_head=4, n_kv_head=2, intermediate_size=176,
               max_seq_len=512),
        Config("tiny-qwen2", vocab_size=256, n_layer=3, hidden_size=64, n_head=4, n_kv_head=2, intermediate_size=176,
               max_seq_len=512, tie_embeddings=True, qkv_bias=True, norm_eps=1e-6),
        # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
        Config("llama-3.2-1b", vocab_size=128256, n_layer=16, hidden_size=2048, n_head=32, n_kv_head=8,
               intermediate_size=8192, max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
               rope_scaling=_LLAMA32_ROPE),
        # Llama-3.2-3B ships with tied embeddings; the peers in DESIGN.md are measured untied (3.61B):
        # use `model.tie_embeddings=false` (or Config.from_name("llama-3.2-3b", tie_embeddings=False)).
        Config("llama-3.2-3b", vocab_size=128256, n_layer=28, hidden_size=3072, n_head=24, n_kv_head=8,
               intermediate_size=8192, max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
               rope_scaling=_LLAMA32_ROPE),
        Config("llama-3-8b", vocab_size=128256, n_layer=32, hidden_size=4096, n_head=32, n_kv_head=8,
               intermediate_size=14336, max_seq_len=8192, rope_theta=500000.0),
        Config("llama-3-70b", vocab_size=128256, n_layer=80, hidden_size=8192, n_head=64, n_kv_head=8,
               intermediate_size=28672, max_seq_len=8192, rope_theta=500000.0),
        # synthetic Llama-3-style 100B (DESIGN.md "Scale targets")
        Config("llama100b", vocab_size=128256, n_layer=88, hidden_size=10240, n_head=80, n_kv_head=8,
               intermediate_size=28672, max_seq_len=8192, rope_theta=500000.0),
        # https://huggingface.co/mistralai/Mistral-Large-Instruct-2407/blob/main/config.json
        Config("mistral-large-123b", vocab_size=32768, n_layer=88, hidden_size=12288, n_head=96, n_kv_head=8,
               intermediate_size=28672, max_seq_len=131072, rope_theta=1000000.0),
        Config("llama-3.1-405b", vocab_size=128256, n_layer=126, hidden_size=16384, n_head=128, n_kv_head=8,
               intermediate_size=53248, max_seq_len=131072, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE),
        # Mixtures of experts (they train as the transformers model of transformers_type; README). Attention biases,
        # attention sinks and expert biases (gpt-oss) are not counted: 0.04% of its parameters.
        # https://huggingface.co/mistralai/Mixtral-8x22B-v0.1/blob/main/config.json
        Config("mixtral-8x22b", vocab_size=32000, n_layer=56, hidden_size=6144, n_head=48, n_kv_head=8,
               intermediate_size=16384, max_seq_len=65536, rope_theta=1000000.0, n_experts=8, experts_per_token=2,
               moe_intermediate_size=16384, transformers_type="mixtral"),
        # https://huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json
        Config("qwen3-235b-a22b", vocab_size=151936, n_layer=94, hidden_size=4096, n_head=64, n_kv_head=4,
               head_size=128, intermediate_size=12288, max_seq_len=40960, rope_theta=1000000.0, norm_eps=1e-6,
               qk_norm=True, n_experts=128, experts_per_token=8, moe_intermediate_size=1536,
               transformers_type="qwen3_moe"),
        # https://huggingface.co/openai/gpt-oss-120b/blob/main/config.json (alternating 128-token sliding and full
        # attention: local_share; attention_bias: q/k/v biases)
        Config("gpt-oss-120b", vocab_size=201088, n_layer=36, hidden_size=2880, n_head=64, n_kv_head=8,
               head_size=64, intermediate_size=2880, max_seq_len=131072, rope_theta=150000.0, n_experts=128,
               experts_per_token=4, moe_intermediate_size=2880, qkv_bias=True, transformers_type="gpt_oss",
               local_window=128, local_share=0.5),
        # https://huggingface.co/zai-org/GLM-4.5-Air/blob/main/config.json: one dense layer, then 45 of 128 routed
        # experts (top 8) and a shared one; q/k/v biases; half-rotary heads (the same FLOPs). The multi-token
        # prediction layer (num_nextn_predict_layers) is not counted, as the published 106B does not
        Config("glm-4.5-air", vocab_size=151552, n_layer=46, hidden_size=4096, n_head=96, n_kv_head=8, head_size=128,
               intermediate_size=10944, max_seq_len=131072, rope_theta=1000000.0, qkv_bias=True, n_experts=128,
               experts_per_token=8, moe_intermediate_size=1408, n_shared_experts=1, n_dense_layers=1,
               transformers_type="glm4_moe"),
        # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json: three dense layers, then 256 routed
        # experts (top 8) and a shared one; multi-head latent attention (q rank 1536, kv rank 512, q.k heads of
        # 128 + 64 rotary, v heads of 128). The multi-token prediction module (14B of the 685B on the Hub) is not
        # counted, as the published 671B does not
        Config("deepseek-v3", vocab_size=129280, n_layer=61, hidden_size=7168, n_head=128, n_kv_head=128,
               head_size=192, intermediate_size=18432, max_seq_len=163840, norm_eps=1e-6, n_experts=256,
               experts_per_token=8, moe_intermediate_size=2048, n_shared_experts=1, n_dense_layers=3,
               q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, v_head_size=128,
               transformers_type="deepseek_v3"),
        # https://huggingface.co/Qwen/Qwen2-0.5B/blob/main/config.json
        Config("qwen2-0.5b", vocab_size=151936, n_layer=24, hidden_size=896, n_head=14, n_kv_head=2,
               intermediate_size=4864, max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6,
               tie_embeddings=True, qkv_bias=True),
    ]
}
