"""train.py's LightningModule for a Hugging Face architecture that megatrain's Llama does not have
(`config.TRANSFORMERS_HF_TYPES`: the mixtures of experts, Phi-3, Gemma 3 text), trained as the transformers model
itself. Needs transformers (the `hf` extra)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from megatrain_lightning.config import Config
from megatrain_lightning.errors import UserError
from megatrain_lightning.models.lm import CausalLM


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UserError("model=hf on this architecture trains the transformers model: pip install "
                        "'megatrain-lightning[hf]' (transformers)") from None
    return transformers


def config_json(config: Config) -> dict[str, Any]:
    """The transformers config.json of a preset that trains as the transformers model (`transformers_type`: the
    mixture-of-experts presets), so `model=gpt-oss-120b` trains from a random start as `model=hf` on its checkpoint
    would from the checkpoint's weights. tests/test_hf_as_transformers.py checks that transformers builds exactly
    the parameters the preset counts."""
    c, kind = config, config.transformers_type
    out: dict[str, Any] = dict(
        model_type=kind, vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
        rope_theta=c.rope_theta, num_experts_per_tok=c.experts_per_token)
    if kind in ("mixtral", "gpt_oss"):  # every layer's MLP is its experts, each of intermediate_size
        out.update(intermediate_size=c.moe_intermediate_size, num_local_experts=c.n_experts)
        if kind == "gpt_oss":  # its layer_types alternate local (sliding_window) and full, local first
            out.update(attention_bias=c.qkv_bias, sliding_window=c.local_window)
    elif kind == "qwen3_moe":
        out.update(intermediate_size=c.intermediate_size, moe_intermediate_size=c.moe_intermediate_size,
                   num_experts=c.n_experts, decoder_sparse_step=1, mlp_only_layers=[])
    elif kind in ("glm4_moe", "deepseek_v3"):  # dense first layers, shared experts; one expert group
        out.update(intermediate_size=c.intermediate_size, moe_intermediate_size=c.moe_intermediate_size,
                   n_routed_experts=c.n_experts, n_shared_experts=c.n_shared_experts,
                   first_k_dense_replace=c.n_dense_layers, n_group=1, topk_group=1)
        if kind == "glm4_moe":
            out.update(attention_bias=c.qkv_bias, use_qk_norm=c.qk_norm)
        else:
            out.update(q_lora_rank=c.q_lora_rank or None, kv_lora_rank=c.kv_lora_rank,
                       qk_rope_head_dim=c.qk_rope_head_dim, qk_nope_head_dim=c.head_dim - c.qk_rope_head_dim,
                       v_head_dim=c.v_head_size or c.head_dim, rope_scaling=None)
    else:
        raise UserError(f"model={c.name}: no transformers config is known for transformers_type {kind!r}")
    return out


class HFCausalLM(CausalLM):
    """The transformers causal LM of `hf_config` (a checkpoint's config.json), built in `configure_model` (on the
    meta device under the megatrain strategy, which streams its decoder layers and imports the checkpoint's weights:
    `MegatrainStrategy(init_from=...)`). The loss is CausalLM's: the head runs over chunks of tokens with its
    gradient formed in forward (loss.py), on the base model's final hidden state: only where the hidden state and
    the logits come from differ (`final_hidden`, `logits`)."""

    def __init__(self, config: Config, hf_config: dict[str, Any], **kwargs) -> None:
        if hf_config.get("final_logit_softcapping"):
            raise UserError("model.path: config.json sets final_logit_softcapping, which train.py's loss does not "
                            "apply yet; train the model in your own LightningModule")
        if hf_config.get("output_router_logits"):
            # transformers then adds router_aux_loss_coef times a load-balancing loss to the language-model loss;
            # this module computes the language-model loss alone, so training would silently differ
            raise UserError("model.path: config.json sets output_router_logits=true (an auxiliary router loss), "
                            "which train.py does not compute yet; set it to false, or train the model in your own "
                            "LightningModule")
        super().__init__(config, **kwargs)
        self.hparams["hf_config"] = dict(hf_config)  # plain values: checkpoints load with weights_only=True

    def configure_model(self) -> None:
        if self.model is None:
            cuda = self._trainer is not None and self.trainer.strategy.root_device.type == "cuda"
            try:
                attention = self.config.attention(cuda)
            except ValueError as e:
                raise UserError(f"model.attn_implementation={e}, and this run is on the CPU; leave it unset (eager "
                                "there)") from None
            self.model = self.adapted(build_model(self.hparams["hf_config"], attention).float())  # fp32 masters

    @override
    def final_hidden(self, x: Tensor) -> Tensor:
        return self.model.base_model(input_ids=x, use_cache=False).last_hidden_state

    @override
    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.model.lm_head.weight)


def build_model(hf_config: dict[str, Any], attn_implementation: str | None = None):
    """The transformers causal LM of a config.json (on the device torch's default says: meta under the strategy),
    its attention by transformers' name (None: transformers' choice)."""
    transformers = transformers_module()
    hf_config = dict(hf_config)
    config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    chosen = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        return transformers.AutoModelForCausalLM.from_config(config, **chosen)
    except (ValueError, ImportError) as e:
        if not chosen:
            raise
        raise UserError(f"model.attn_implementation={attn_implementation!r}: transformers refuses it for "
                        f"{config.model_type}: {str(e).splitlines()[0]}") from None
