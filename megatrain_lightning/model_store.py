"""The model's parameters moved into the host store at setup: the trunk found (a `Trunk`, or a transformers
model's decoder layers), each layer materialized (from the meta device, initialized as the model would be) and
copied in one at a time, then freed; the resident rest (embedding, norms, head; tied weights once) likewise;
a Hugging Face checkpoint imported into the store when asked."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from megatrain_lightning import hf, placement
from megatrain_lightning.hf import adapters
from megatrain_lightning.models import surgery
from megatrain_lightning.errors import UserError
from megatrain_lightning.options import resolve_stream
from megatrain_lightning.models.llama import Trunk
from megatrain_lightning.parallel.ranks import Ranks
from megatrain_lightning.storage.store import HostStore, Layout

log = logging.getLogger(__name__)


@dataclass
class Built:
    store: HostStore
    trunk: Trunk
    prefix: str  # the trunk's name in the module
    refs: list  # resident parameters: [(store name, [(module, attribute, parameter)])]
    aliases: dict[str, str] = field(default_factory=dict)  # tied parameter name -> the name the store keeps
    param_names: dict[int, str] = field(default_factory=dict)  # id(parameter as the module held it) -> store name


def build(module: nn.Module, dtype: torch.dtype, pin: bool, storage: str, stream: str,
          ram_budget_GiB: float | None, nvme_dir: str | Path | Sequence[str | Path],
          init_from: Path | None, world: int = 1, rank: int = 0, device: torch.device | None = None,
          ranks_per_node: int = 1, replicate_nodes: bool = False) -> Built:
    """Moves `module`'s parameters into a new host store (the strategy's settings: `storage`, `stream`,
    `ram_budget_GiB`, `nvme_dir`, `init_from`); the trunk's blocks keep meta tensors afterwards. With several ranks
    (`world`), this `rank` keeps the units it owns (ranks.py) and, under storage=nvme, its share of the node's RAM
    budget (`ranks_per_node`; `replicate_nodes`: every node holds all units, dealt among its ranks); every rank
    initializes every layer (the same random numbers) and imports only its own."""
    aliases: dict[str, str] = {}
    param_names: dict[int, str] = {}
    adapters.stream_layers(module)  # a transformers causal LM: its decoder layers become a LayerList (a Trunk)
    trunks = [(n, m) for n, m in module.named_modules() if isinstance(m, Trunk)]
    if not trunks:
        raise UserError(
            f"{type(module).__name__} has no streamable blocks: the megatrain strategy streams the blocks of a "
            "`megatrain_lightning.Trunk` (wrap the model's repeated layers in one and call it as "
            "`x = trunk(x, *extras)`)")
    if len(trunks) > 1:
        raise UserError(f"the megatrain strategy streams one Trunk per model; found {[n for n, _ in trunks]}")
    prefix, trunk = trunks[0]
    if len(trunk) == 0:
        raise UserError(f"the Trunk {prefix!r} has no blocks")
    refs = list(surgery.param_refs(module, skip=trunk).values())  # resident: [(name, [(module, attr, parameter)])]
    streamed = resolve_stream(storage, stream, fp32=dtype == torch.float32)

    def layout(named: list[tuple[str, nn.Parameter]]) -> Layout:
        # a frozen parameter already in the compute dtype (a bf16 base under LoRA) is kept in that dtype alone: an
        # fp32 master of it would double its bytes and never change
        frozen = {n for n, p in named if not p.requires_grad}
        in_copy = {n for n, p in named if n in frozen and p.dtype == dtype != torch.float32}
        return Layout([(n, p.shape) for n, p in named], frozen=frozen, in_copy=in_copy)

    layouts = [layout(list(block.named_parameters())) for block in trunk]
    layouts.append(layout([(name, owners[0][2]) for name, owners in refs]))
    names = [f"{prefix}.{i}." for i in range(len(trunk))] + [""]
    ranks = Ranks.from_sizes([4 * lay.tile_numel for lay in layouts], world, rank, device, ranks_per_node,
                             replicate_nodes)
    nvme_units = placement.nvme_units(layouts, dtype, ram_budget_GiB, ranks.owners, rank, ranks_per_node) \
        if storage == "nvme" else []
    store = HostStore(layouts, names, dtype, pin=pin, stream=streamed, nvme_units=nvme_units, nvme_dir=nvme_dir,
                      ranks=ranks)
    if nvme_units:
        log.info(f"storage=nvme: the file-backed layers' state is in {store.nvme.dir}")

    # a transformers model built on the meta device (configure_model) is initialized part by part as its own
    # initialization would, one layer at a time
    init = adapters.initializer(module) if isinstance(trunk, adapters.LayerList) else None
    dora: list[tuple[str, str]] = []  # DoRA magnitudes built here, and their base weights: set again after an import
    for i, block in enumerate(trunk):
        if any(p.is_meta for p in block.parameters()) or any(b.is_meta for b in block.buffers()):
            # imported weights replace the initialized ones; a buffer (a router's bias) is set by the model's
            # initialization in any case, and by the checkpoint when it holds one
            unset_buffers = any(b.is_meta for b in block.buffers())
            surgery.materialize(block, initialize=init_from is None or unset_buffers, init=init)
            adapters.init_adapters(adapters.adapter_layers(block), module)  # no base checkpoint holds them
            dora += [(f"{prefix}.{i}.{mag}", f"{prefix}.{i}.{w}") for mag, w in adapters.dora_magnitudes(block)]
        store.fill(i, list(block.named_parameters()))
        surgery.parameters_to_meta(block)  # the store holds the weights now; free the module's copy (buffers stay)
        for n, p in block.named_parameters():
            param_names[id(p)] = f"{prefix}.{i}.{n}"

    # the resident rest of the model: parameters outside the trunk, deduplicated (tied weights)
    meta_owners = {id(m): m for _, owners in refs for m, _, p in owners if p.is_meta}
    inside = {id(m) for m in trunk.modules()}
    meta_adapters = [m for m in adapters.adapter_layers(module)
                     if id(m) not in inside and any(p.is_meta for p in m.parameters())]
    meta_ids = {id(m) for m in meta_adapters}
    dora += [(f"{n}.{mag}", f"{n}.{w}") for n, m in module.named_modules() if id(m) in meta_ids
             for mag, w in adapters.dora_magnitudes(m) if mag.startswith("lora_magnitude_vector.")]  # its own
    for _, owners in refs:
        p = owners[0][2]
        if p.is_meta:
            surgery.assign(owners, nn.Parameter(torch.empty_like(p, device="cpu"), p.requires_grad))
    for m in meta_owners.values() if init_from is None else ():
        if init is not None:
            init(m)
            continue
        if not callable(getattr(m, "reset_parameters", None)):
            raise UserError(f"cannot initialize {type(m).__name__} built on the meta device: it has no "
                            "reset_parameters()")
        m.reset_parameters()
    adapters.init_adapters(meta_adapters, module)  # after their base layers, imported or not
    surgery.materialize_buffers(module, skip=trunk, init=init)  # e.g. rotary tables outside the layers
    store.fill(len(trunk), [(name, owners[0][0]._parameters[owners[0][1]]) for name, owners in refs])
    for name, owners in refs:
        for m, attr, _ in owners[1:]:
            aliases[surgery.full_name(module, m, attr)] = name
    if init_from is not None:
        hf_model = adapters.transformers_model(module)
        buffers = {n: b for n, b in module.named_buffers() if not n.startswith(prefix + ".")}
        buffers.update({f"{prefix}.{i}.{n}": b for i, block in enumerate(trunk) for n, b in block.named_buffers()})
        hf.load_into_store(init_from, store, aliases, hf_model, buffers)
        for magnitude, weight in dora:  # from the imported base weights (the adapters start at zero)
            store.set_weight(aliases.get(magnitude, magnitude), adapters.row_norms(store.master_of(weight)))
        log.info(f"initialized from the Hugging Face checkpoint {init_from}")
    return Built(store, trunk, prefix, refs, aliases, param_names)
