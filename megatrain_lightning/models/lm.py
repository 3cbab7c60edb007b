"""A causal language model as an ordinary LightningModule (it knows nothing about streaming)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from megatrain_lightning.config import Config
from megatrain_lightning.errors import UserError
from megatrain_lightning.models.loss import linear_cross_entropy
from megatrain_lightning.models.llama import Llama
from megatrain_lightning.lora_options import LoRA
from megatrain_lightning.models.lora import add_lora


class CausalLM(L.LightningModule):
    def __init__(self, config: Config, lr: float = 3e-4, weight_decay: float = 0.1, betas=(0.9, 0.95),
                 warmup_steps: int = 10, max_steps: int | None = None, min_lr_ratio: float = 0.1,
                 loss_chunk_tokens: int | None = 4096, model: Llama | None = None,
                 lora: dict | None = None) -> None:
        """`model`: an already built Llama (tests pass one to share initial weights); otherwise the model is built
        in `configure_model`, which the megatrain strategy runs on the meta device. `loss_chunk_tokens`: the head
        and loss run over this many tokens at a time, their gradients formed in forward (loss.py), so the [tokens,
        vocab] fp32 logits never exist whole (None: all at once, through autograd). `lora`: conf/lora's fields
        (lora.py); with r > 0 the built model gets LoRA adapters and its base is frozen."""
        super().__init__()
        if loss_chunk_tokens is not None and (not isinstance(loss_chunk_tokens, int) or loss_chunk_tokens < 1):
            raise UserError(f"loss_chunk_tokens must be a positive integer or None, got {loss_chunk_tokens!r}")
        self.save_hyperparameters(ignore=["model", "config"])
        # plain fields, so checkpoints load with torch.load(weights_only=True)
        self.hparams["model_config"] = {f: getattr(config, f) for f in Config.field_names()}
        self.config = config
        self.lora = LoRA.from_dict(lora)
        self.model = model
        self.val_loss = MeanMetric()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Also takes the megatrain strategy's checkpoint directories (or a directory of them: the newest): the
        model is built on the CPU and holds the checkpoint's fp32 master weights (for evaluation or export; to
        go on training, pass the directory to `trainer.fit(ckpt_path=...)`)."""
        if not Path(checkpoint_path).is_dir():
            return super().load_from_checkpoint(checkpoint_path, map_location=map_location,
                                                hparams_file=hparams_file, strict=strict, **kwargs)
        from megatrain_lightning.checkpointing import directories as ckpt

        path = ckpt.resolve(checkpoint_path)
        meta = ckpt.load_meta(path)
        hp = {**meta.get("hyper_parameters", {}), **kwargs}
        lm = cls(Config(**hp.pop("model_config")), **hp)
        lm.configure_model()
        masters = ckpt.read_masters(path)
        missing, unexpected = lm.load_state_dict({**meta.get("state_dict", {}), **masters}, strict=False)
        loaded = {lm.get_parameter(k).data_ptr() for k in masters if k not in unexpected}
        missing = [k for k in missing if lm.get_parameter(k).data_ptr() not in loaded]  # tied: loaded as the other
        if missing or unexpected:
            raise ckpt.CheckpointError(f"checkpoint {path} does not match {cls.__name__}: missing {missing[:10]}, "
                                       f"unexpected {unexpected[:10]}")
        return lm.to(map_location) if map_location is not None else lm

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.adapted(Llama(self.config))

    def adapted(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` with the LoRA adapters of `lora` (none when r is 0), its frozen base in the compute dtype."""
        if not self.lora.enabled:
            return model
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        base_dtype = torch.bfloat16 if precision.startswith("bf16") else \
            torch.float16 if precision.startswith("16") else torch.float32
        return add_lora(model, model.get_submodule("model.layers"), self.lora, base_dtype)

    def loss(self, batch: Tensor | dict[str, Tensor]) -> Tensor:
        """Mean next-token cross-entropy. `batch`: [B, T+1] token ids (predict tokens 1..T from 0..T-1), or a dict
        of `input_ids` [B, T] and `labels` [B, T] (-100 where a token is not trained on, e.g. a prompt)."""
        if isinstance(batch, dict):
            x, y = batch["input_ids"], batch["labels"]
        else:
            x, y = batch[:, :-1], batch[:, 1:]
        hidden = self.final_hidden(x).flatten(0, 1)  # [B*T, D]
        y = y.flatten()
        chunk = self.hparams.get("loss_chunk_tokens")
        if chunk is None:
            return F.cross_entropy(self.logits(hidden).float(), y, ignore_index=-100)
        return linear_cross_entropy(hidden, self.model.lm_head.weight, y, chunk)  # [chunk, V] logits at a time

    def final_hidden(self, x: Tensor) -> Tensor:
        """[B, T, D] hidden state after the final norm, for token ids x [B, T]."""
        return self.model(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """[N, V] logits of hidden states [N, D] (the unchunked loss)."""
        return self.model.logits(hidden)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        # several ranks: the mean over them (each rank's loss is of its own part of the batch)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        self.log("train_ppl", torch.exp(loss.detach()), sync_dist=True)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self.val_loss.update(self.loss(batch))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_ppl", torch.exp(loss), prog_bar=True)
        self.val_loss.reset()

    def configure_optimizers(self):
        hp = self.hparams
        # no weight decay on norms and biases (the usual Llama recipe)
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=tuple(hp.betas))
        total = hp.max_steps or self.trainer.estimated_stepping_batches

        def schedule(step: int) -> float:  # linear warmup, cosine decay to min_lr_ratio
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
