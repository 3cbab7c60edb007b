"""Host AdamW: the user's own Adam/AdamW, re-pointed at the store's flat fp32 buffers.

The optimizer object the user returned from `configure_optimizers` stays the one Lightning and the LR
schedulers see (so schedules, `gradient_clip_val` and checkpoints of hyperparameters work unchanged);
only its parameters become views of the host fp32 masters, its state becomes views of the store's Adam
moments, and it runs PyTorch's fused CPU kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatrain_lightning.store import HostStore

SUPPORTED = (torch.optim.AdamW, torch.optim.Adam)


def bind_optimizer(optimizer: torch.optim.Optimizer, store: HostStore,
                   param_names: dict[int, str]) -> list[tuple[Tensor, Tensor]]:
    """Re-points `optimizer` at the store. `param_names` maps id(parameter) of the module as the user's
    `configure_optimizers` saw it to the parameter's full name in the store. Returns (host parameter,
    gradient view) pairs for `bind_grads`."""
    if type(optimizer) not in SUPPORTED:
        raise TypeError(
            f"the megatrain strategy runs the optimizer on the host and supports "
            f"{', '.join(c.__name__ for c in SUPPORTED)} (from torch.optim); got {type(optimizer).__name__}")
    masters = store.named("master")
    m, v, grads = store.named("exp_avg"), store.named("exp_avg_sq"), store.named("grad")
    pairs = []
    for group in optimizer.param_groups:
        if group.get("amsgrad"):
            raise ValueError("the megatrain strategy does not support amsgrad=True")
        if group.get("differentiable") or group.get("capturable"):
            raise ValueError("the megatrain strategy does not support differentiable or capturable Adam")
        host_params = []
        for p in group["params"]:
            name = param_names.get(id(p))
            if name is None:
                raise ValueError("the optimizer holds a tensor that is not a parameter of the LightningModule")
            host = masters[name]
            host_params.append(host)
            pairs.append((host, grads[name]))
            optimizer.state[host] = {
                "step": torch.zeros((), dtype=torch.float32),
                "exp_avg": m[name],
                "exp_avg_sq": v[name],
            }
        group["params"] = host_params
        group["fused"], group["foreach"] = True, False  # PyTorch's fused CPU Adam(W) kernel
    optimizer.defaults["fused"], optimizer.defaults["foreach"] = True, False
    for p in list(optimizer.state):  # drop any state of the device parameters
        if not any(p is q for g in optimizer.param_groups for q in g["params"]):
            del optimizer.state[p]
    return pairs


def bind_grads(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """Points each host parameter's .grad at its slice of the fp32 gradient buffers (Lightning's zero_grad
    sets .grad to None; the buffers themselves are reset by the engine's `fresh_grads`)."""
    for p, g in pairs:
        p.grad = g


def host_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with tensors copied out of the store (a view would save its whole tile)."""
    sd = optimizer.state_dict()
    sd["state"] = {k: {n: (t.clone() if isinstance(t, Tensor) else t) for n, t in s.items()}
                   for k, s in sd["state"].items()}
    return sd


def load_host_state_dict(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Loads saved state into the store's buffers in place (the ordinary load would replace them)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_groups = sd["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint has {len(saved_groups)} optimizer param groups, the optimizer has "
                         f"{len(optimizer.param_groups)}")
    for group, saved in zip(optimizer.param_groups, saved_groups):
        for key, value in saved.items():
            if key != "params":
                group[key] = value
    for index, state in sd["state"].items():
        p = params[int(index)]
        for key, value in state.items():
            if key != "step" and value.shape != p.shape:
                raise ValueError(f"optimizer state {index}.{key} has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            optimizer.state[p][key].copy_(value)
