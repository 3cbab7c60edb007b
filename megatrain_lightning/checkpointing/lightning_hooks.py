"""The strategy's checkpoints: directories of per-unit safetensors (checkpoint.py), written from the host store
and read back into it; Lightning's part of a checkpoint (loop state, the module's buffers, param groups and step
counts) rides along in the same directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from typing_extensions import override

from megatrain_lightning.checkpointing import directories as ckpt
from megatrain_lightning.parallel.data_parallel import DataParallelBase
from megatrain_lightning.errors import UserError


class StoreCheckpoints(DataParallelBase):
    """Lightning's checkpoint hooks over the store. The subclass (strategy.MegatrainStrategy) has `store`, `engine`, `init_from`,
    `_param_names`, `_aliases`, `_masters_in_state_dict`, `_ckpt_dir`, `flush()` and `_publish_weights()`."""

    def _state_dict_from_store(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta) -> None:
        """A state_dict hook on every module of the model: the parameters the store holds (the trunk's are meta
        tensors, the resident ones a compute-dtype device copy) appear as their fp32 masters, so `state_dict()`
        after (or during) fit is the trained model, materialized tensor by tensor on request."""
        if not self._masters_in_state_dict:
            return
        self.flush()
        for attr, p in module._parameters.items():
            name = self._param_names.get(id(p)) if p is not None else None
            if name is not None and prefix + attr in state_dict:
                state_dict[prefix + attr] = self.store.master_of(name)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # the module's own small state (buffers, metric states); the parameters are saved from the store
        self._masters_in_state_dict = False
        try:
            state = self.lightning_module.state_dict()
        finally:
            self._masters_in_state_dict = True
        return {k: v for k, v in state.items() if k not in self.store.index and k not in self._aliases}

    @override
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        # param groups (LR, betas, ...) and step counts; the moments are saved from the store
        self.flush()
        sd = getattr(optimizer, "_optimizer", optimizer).state_dict()
        sd["state"] = {k: {"step": s["step"].clone()} for k, s in sd["state"].items()}
        return sd

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("the megatrain strategy writes checkpoint directories itself; storage_options is not "
                            "supported")
        self.flush()
        if self.init_from is not None:  # where `hf export` finds the tokenizer files
            checkpoint["megatrain"] = {"init_from": str(self.init_from.resolve())}
        config = self.lightning_module.hparams.get("model_config")
        ckpt.save(filepath, self.store, checkpoint, model_config=dict(config) if config else None)

    @override
    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Loads the store from `checkpoint_path`, or from the newest intact checkpoint of a directory of them (a
        damaged newer one is named in a warning); returns Lightning's part."""
        self.flush()
        config = self.lightning_module.hparams.get("model_config")
        path, meta = ckpt.load_newest_intact(checkpoint_path, self.store, dict(config) if config else None)
        self._ckpt_dir = path
        return meta

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self._ckpt_dir is None:
            raise UserError("the megatrain strategy loads its own checkpoint directories (trainer.fit(ckpt_path="
                            "...)); a state dict alone does not hold the weights")
        self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=False)
        self.engine.load_buffers()  # the blocks' buffers, as the checkpoint had them
        if self.engine.step_cache is not None:
            self.engine.step_cache.invalidate()
        self._publish_weights()
        if self.engine.device_states is not None:
            self.engine.device_states.load()

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
            groups = saved["param_groups"]
            if len(groups) != len(optimizer.param_groups):
                raise UserError(f"checkpoint has {len(groups)} optimizer param groups, the optimizer has "
                                f"{len(optimizer.param_groups)}")
            params = [p for g in optimizer.param_groups for p in g["params"]]
            for group, g in zip(optimizer.param_groups, groups):
                group.update({k: v for k, v in g.items() if k != "params"})
            for index, state in saved["state"].items():
                optimizer.state[params[int(index)]]["step"].copy_(state["step"])

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the store exists only after setup
