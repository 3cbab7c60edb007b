"""train.py's LightningModule for a Hugging Face architecture that megatrain's Llama does not have
(`config.TRANSFORMERS_HF_TYPES`: the mixtures of experts, Phi-3, Gemma 3 text), trained as the transformers model
itself. Needs transformers (the `hf` extra)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from megatrain_lightning.config import Config
from megatrain_lightning.errors import UserError
from megatrain_lightning.lm import CausalLM
from megatrain_lightning.loss import linear_cross_entropy


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UserError("model=hf on this architecture trains the transformers model: pip install "
                        "'megatrain-lightning[hf]' (transformers)") from None
    return transformers


class HFCausalLM(CausalLM):
    """The transformers causal LM of `hf_config` (a checkpoint's config.json), built in `configure_model` (on the
    meta device under the megatrain strategy, which streams its decoder layers and imports the checkpoint's weights:
    `MegatrainStrategy(init_from=...)`). The loss is CausalLM's: the head runs over chunks of tokens with its
    gradient formed in forward (loss.py), on the base model's final hidden state."""

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
            transformers = transformers_module()
            hf_config = dict(self.hparams["hf_config"])
            config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
            self.model = transformers.AutoModelForCausalLM.from_config(config).float()  # fp32 masters

    def loss(self, batch: Tensor | dict[str, Tensor]) -> Tensor:
        if isinstance(batch, dict):
            x, y = batch["input_ids"], batch["labels"]
        else:
            x, y = batch[:, :-1], batch[:, 1:]
        hidden = self.model.base_model(input_ids=x, use_cache=False).last_hidden_state.flatten(0, 1)  # [B*T, D]
        y = y.flatten()
        head = self.model.lm_head.weight  # [V, D]
        chunk = self.hparams.get("loss_chunk_tokens")
        if chunk is None:
            return F.cross_entropy(F.linear(hidden, head).float(), y, ignore_index=-100)
        return linear_cross_entropy(hidden, head, y, chunk)
