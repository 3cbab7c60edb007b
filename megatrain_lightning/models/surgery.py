"""Module surgery for the strategy and the engine: initializing blocks built on the meta device, finding the
parameters outside the trunk (tied ones once), swapping parameters in place, moving all but the trunk to the
device, and telling which blocks compute alike (one template each)."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn

from megatrain_lightning.errors import UserError


def reset(module: nn.Module) -> None:
    """Initializes a freshly materialized module: the highest module of each subtree with `reset_parameters`."""
    if callable(getattr(module, "reset_parameters", None)):
        module.reset_parameters()
        return
    if any(True for _ in module.parameters(recurse=False)):
        raise UserError(f"cannot initialize {type(module).__name__} built on the meta device: it has no "
                        "reset_parameters()")
    for child in module.children():
        reset(child)


def materialize(block: nn.Module, initialize: bool, init: Callable[[nn.Module], None] | None = None) -> None:
    """Gives a block built on the meta device CPU memory, initialized when `initialize` by `init` (a transformers
    model's own initialization, adapters.initializer) or else its `reset_parameters`. Its buffers' values were never
    computed (meta tensors have none): each must be set by that initialization, or the block would run with
    whatever the memory held; a sentinel fill shows the ones left unset."""
    unset = {n for n, b in block.named_buffers() if b.is_meta}
    block.to_empty(device="cpu")
    buffers = dict(block.named_buffers())
    for n in unset:
        buffers[n].fill_(_sentinel(buffers[n].dtype))
    if initialize:
        (init or reset)(block)
    unset = sorted(n for n in unset if _untouched(buffers[n]))
    if unset:
        raise UserError(f"{type(block).__name__} was built on the meta device and its buffers {unset} have no values "
                        "(a meta tensor holds none): set them in reset_parameters(), or build the module outside "
                        "configure_model")


def materialize_buffers(module: nn.Module, skip: nn.Module, init: Callable[[nn.Module], None] | None) -> None:
    """Buffers outside `skip` (the trunk) still on the meta device: given CPU memory and set by `init` (a
    transformers model's initialization sets its rotary tables); any left unset are named."""
    inside = {id(m) for m in skip.modules()}
    owners = [m for m in module.modules() if id(m) not in inside
              and any(b is not None and b.is_meta for b in m._buffers.values())]
    for m in owners:
        for name, b in m._buffers.items():
            if b is not None and b.is_meta:
                m._buffers[name] = torch.full_like(b, _sentinel(b.dtype), device="cpu")
        if init is not None:
            init(m)
        unset = sorted(n for n, b in m._buffers.items() if b is not None and _untouched(b))
        if unset:
            raise UserError(f"{type(m).__name__} was built on the meta device and its buffers {unset} have no values "
                            "(a meta tensor holds none): build the module outside configure_model")


def _sentinel(dtype: torch.dtype):
    return float("nan") if dtype.is_floating_point else False if dtype == torch.bool else torch.iinfo(dtype).min


def _untouched(t: Tensor) -> bool:
    if t.dtype == torch.bool:
        return False  # no value tells unset from set
    return bool(t.isnan().all() if t.is_floating_point() else (t == _sentinel(t.dtype)).all())


def parameters_to_meta(module: nn.Module) -> None:
    """Replaces every parameter by a meta tensor of its shape (flags kept); buffers keep their values (a router's
    bias, a per-layer mask), which the engine copies to the device."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)


def param_refs(root: nn.Module, skip: nn.Module) -> dict[int, tuple[str, list[tuple[nn.Module, str, Tensor]]]]:
    """Parameters outside `skip`, by identity: their first full name and every (module, attribute) holding them."""
    refs: dict[int, tuple[str, list]] = {}

    def visit(m: nn.Module, prefix: str) -> None:
        if m is skip:
            return
        for attr, p in m._parameters.items():
            if p is None:
                continue
            refs.setdefault(id(p), (prefix + attr, []))[1].append((m, attr, p))
        for name, child in m._modules.items():
            if child is not None:
                visit(child, f"{prefix}{name}.")

    visit(root, "")
    return refs


def assign(owners: list[tuple[nn.Module, str, Tensor]], p: nn.Parameter) -> None:
    for m, attr, _ in owners:
        m._parameters[attr] = p


def full_name(root: nn.Module, target: nn.Module, attr: str) -> str:
    for name, m in root.named_modules(remove_duplicate=False):
        if m is target:
            return f"{name}.{attr}" if name else attr
    raise LookupError(attr)


def move_except(module: nn.Module, device: torch.device, stop: Callable[[nn.Module], bool]) -> None:
    """Moves `module` to `device` except subtrees where `stop` holds (and their ancestors' own parameters,
    which the strategy already placed)."""
    def contains(m: nn.Module) -> bool:
        return any(stop(x) for x in m.modules())

    if stop(module):
        return
    if not contains(module):
        module.to(device)
        return
    for name, b in module._buffers.items():
        if b is not None:
            module._buffers[name] = b.to(device)
    for child in module.children():
        move_except(child, device, stop)


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # what every nn.Module has: parameters, buffers, hooks, training


def configuration(block: nn.Module, ignore: tuple[str, ...] = ()) -> tuple:
    """What, besides its weights, decides what a block computes: each submodule's type and own attributes (plain
    values compared by value, any other object by identity: a shared object is the same, per-block ones differ),
    but those named in `ignore` (attributes known not to change the computation)."""
    def key(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (tuple, list)):
            return type(v), tuple(key(x) for x in v)
        if isinstance(v, dict):
            return dict, tuple(sorted((repr(k), key(x)) for k, x in v.items()))
        if isinstance(v, functools.partial):  # one per block, computing alike (transformers' activations)
            return functools.partial, key(v.func), key(v.args), key(v.keywords)
        return "object", id(v)

    return tuple((name, type(m), tuple(sorted((k, key(v)) for k, v in vars(m).items()
                                              if k not in _MODULE_INTERNALS and k not in ignore)))
                 for name, m in block.named_modules())
