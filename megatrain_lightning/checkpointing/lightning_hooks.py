"""What Lightning's checkpoint hooks do over the host store: the strategy owns one `StoreCheckpoints` (made with the
store) and its checkpoint overrides call it. Checkpoints are directories of per-unit safetensors (directories.py)
written from the store and read back into it; Lightning's part of a checkpoint (loop state, the module's buffers,
param groups and step counts) rides along in the same directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from megatrain_lightning.checkpointing import directories as ckpt
from megatrain_lightning.errors import UserError
from megatrain_lightning.storage.store import HostStore


class StoreCheckpoints:
    def __init__(self, store: HostStore, param_names: dict[int, str], aliases: dict[str, str],
                 flush: Callable[[], None], init_from: Path | None) -> None:
        """`param_names`: id(parameter as the module holds it) -> its store name; `aliases`: a tied parameter's name
        -> the name the store keeps; `flush`: waits for queued updates (the store is then the model's state);
        `init_from`: the Hugging Face checkpoint the run was initialized from (recorded: `hf export` finds the
        tokenizer files there)."""
        self.store, self.param_names, self.aliases = store, param_names, aliases
        self.flush, self.init_from = flush, init_from
        self.restored_from: Path | None = None  # the checkpoint directory last loaded
        self._masters_in_state_dict = True  # off while Lightning's checkpoint takes the module's small state

    def state_dict_hook(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta) -> None:
        """A state_dict hook on every module of the model: the parameters the store holds (the trunk's are meta
        tensors, the resident ones a compute-dtype device copy) appear as their fp32 masters, so `state_dict()`
        after (or during) fit is the trained model, materialized tensor by tensor on request."""
        if not self._masters_in_state_dict:
            return
        self.flush()
        for attr, p in module._parameters.items():
            name = self.param_names.get(id(p)) if p is not None else None
            if name is not None and prefix + attr in state_dict:
                state_dict[prefix + attr] = self.store.master_of(name)

    def module_state(self, module: nn.Module) -> dict[str, Any]:
        """The module's own small state (buffers, metric states); the parameters are saved from the store."""
        self._masters_in_state_dict = False
        try:
            state = module.state_dict()
        finally:
            self._masters_in_state_dict = True
        return {k: v for k, v in state.items() if k not in self.store.index and k not in self.aliases}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Param groups (LR, betas, ...) and step counts; the moments are saved from the store."""
        self.flush()
        sd = getattr(optimizer, "_optimizer", optimizer).state_dict()
        sd["state"] = {k: {"step": s["step"].clone()} for k, s in sd["state"].items()}
        return sd

    def save(self, checkpoint: dict[str, Any], filepath: str | Path, model_config: dict | None) -> None:
        self.flush()
        if self.init_from is not None:  # where `hf export` finds the tokenizer files
            checkpoint["megatrain"] = {"init_from": str(self.init_from.resolve())}
        ckpt.save(filepath, self.store, checkpoint, model_config=model_config)

    def load(self, checkpoint_path: str | Path, model_config: dict | None) -> dict[str, Any]:
        """Loads the store from `checkpoint_path`, or from the newest intact checkpoint of a directory of them (a
        damaged newer one is named in a warning); returns Lightning's part."""
        self.flush()
        self.restored_from, meta = ckpt.load_newest_intact(checkpoint_path, self.store, model_config)
        return meta

    def check_restorable(self) -> None:
        if self.restored_from is None:
            raise UserError("the megatrain strategy loads its own checkpoint directories (trainer.fit(ckpt_path="
                            "...)); a state dict alone does not hold the weights")

    @staticmethod
    def restore_optimizers(optimizers: Sequence[torch.optim.Optimizer], saved: Sequence[Mapping[str, Any]]) -> None:
        """Param groups and step counts back into the optimizers (their moments came with the store)."""
        for optimizer, state in zip(optimizers, saved):
            groups = state["param_groups"]
            if len(groups) != len(optimizer.param_groups):
                raise UserError(f"checkpoint has {len(groups)} optimizer param groups, the optimizer has "
                                f"{len(optimizer.param_groups)}")
            params = [p for g in optimizer.param_groups for p in g["params"]]
            for group, g in zip(optimizer.param_groups, groups):
                group.update({k: v for k, v in g.items() if k != "params"})
            for index, step in state["state"].items():
                optimizer.state[params[int(index)]]["step"].copy_(step["step"])
