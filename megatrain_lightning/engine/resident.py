"""The resident unit's device copy: the embedding, final norm and head (everything outside the trunk) live on the
device for the whole run as one flat compute-dtype buffer, whose views are the module's parameters. Their fp32
master is the store's last unit; after each update the copy is refreshed from the host (or cast from the device
master when the device keeps the unit's state), in two parts so the forward's first need, the embedding, comes
back first. With several ranks the unit's owner refreshes it and broadcasts it to the others.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megatrain_lightning.models import surgery
from megatrain_lightning.storage.store import HostStore

EMBEDDING, REST = 0, 1  # the parts refreshed separately (the updater's part ranges)


class ResidentCopy:
    def __init__(self, store: HostStore, refs: list, dtype: torch.dtype, device: torch.device) -> None:
        """Makes the device copy of `store`'s resident unit and puts its views into the module as its parameters
        (`refs`: [(store name, [(module, attribute, parameter)])], every module sharing one parameter)."""
        self.store, self.index = store, len(store.units) - 1
        unit = store.units[self.index]
        # never an alias of the host store, even when the device is the CPU
        self.flat = torch.empty(unit.layout.numel, dtype=dtype, device=device)  # [numel] compute dtype
        if not unit.remote:
            self._copy_in(unit, non_blocking=False)
        store.ranks.broadcast_(self.flat, self.index)
        views = unit.layout.views(self.flat)
        self.names: dict[int, str] = {}  # id(parameter) -> store name
        params = {}
        for name, owners in refs:
            p = params[name] = nn.Parameter(views[name], requires_grad=owners[0][2].requires_grad)
            surgery.assign(owners, p)
            self.names[id(p)] = name
        self.params = [params[e.name] for e in unit.layout.trainable_entries]  # what gets gradients, layout order
        self.stale: set[int] = set()  # parts updated on the host since the device copy was made

    def take_grads(self) -> list[Tensor | None]:
        """The trainable parameters' gradients of this backward (None where the loss did not reach one), cleared
        from the parameters."""
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return grads

    def updated(self, device_states) -> None:
        """After an update: a unit the device keeps is cast from its device master now (one rank); otherwise both
        parts are stale until `refresh` (several ranks: the owner broadcasts them)."""
        kept = device_states is not None and self.index in device_states
        if kept:
            self.flat[:self.store.units[self.index].layout.master_numel].copy_(device_states.master(self.index))
        if not kept or self.store.ranks.multi:
            self.stale = {EMBEDDING, REST}

    def refresh(self, part: int, updater, device_states) -> None:
        """Copies an updated part to the device, once its host update is done (the owner's; then broadcast)."""
        if part not in self.stale:
            return
        self.stale.discard(part)
        lo, hi = updater.part_range(self.index, part)
        if not self.store.units[self.index].remote and (device_states is None or self.index not in device_states):
            updater.wait(self.index, part)
            self.flat[lo:hi].copy_(self.store.units[self.index].stream[lo:hi], non_blocking=True)
        self.store.ranks.broadcast_(self.flat[lo:hi], self.index)

    def publish(self) -> None:
        """The whole copy from the store's streamed copy (after a checkpoint load, or the CPU's in-line update)."""
        unit = self.store.units[self.index]
        if not unit.remote:
            self._copy_in(unit, non_blocking=True)
        self.store.ranks.broadcast_(self.flat, self.index)

    def _copy_in(self, unit, non_blocking: bool) -> None:
        m = unit.layout.master_numel
        self.flat[:m].copy_(unit.stream, non_blocking=non_blocking)
        self.flat[m:].copy_(unit.frozen, non_blocking=non_blocking)  # frozen parameters without a master
