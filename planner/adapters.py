"""LoRA's adapters as the planner counts them: their parameters per decoder layer and the device memory their
kernels move (the workload of a LoRA run, workload.py, asks here)."""

from __future__ import annotations

from megatrain_lightning.config import Config
from megatrain_lightning.lora_options import ALL_LINEAR


def linear_shapes(c: Config) -> dict[str, tuple[int, int]]:
    """(in, out) features of the linear layers a decoder layer holds by name, as LoRA counts them (latent attention
    counted as ordinary attention of the same heads; a mixture's routed experts are not linear layers in
    transformers 5: a shared expert is)."""
    D, q, kv = c.hidden_size, c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    out = {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D)}
    inner = c.intermediate_size if not c.n_experts else c.n_shared_experts * c.moe_intermediate_size
    if inner:
        out.update(gate_proj=(D, inner), up_proj=(D, inner), down_proj=(inner, D))
    return out


def adapted_shapes(c: Config, r: int, targets: tuple[str, ...] | str) -> list[tuple[int, int]]:
    """The (in, out) of each linear layer of a decoder layer that gets an adapter (none when r is 0)."""
    if not r:
        return []
    shapes = linear_shapes(c)
    names = shapes if targets == ALL_LINEAR else [n for n in targets if n in shapes]
    return [shapes[n] for n in names]


def params(c: Config, r: int, targets: tuple[str, ...] | str) -> int:
    """One decoder layer's LoRA parameters: r (in + out) per adapted linear layer."""
    return r * sum(i + o for i, o in adapted_shapes(c, r, targets))


def bytes_per_token(c: Config, r: int, targets: tuple[str, ...] | str, compute_bytes: int, compiled: bool) -> int:
    """Device memory one forward pass of a layer's adapters moves per token, beyond their base layers (memory-bound
    at LoRA ranks, r << in, out). Eager, peft's LoRA reads the input (lora_A), writes B's output, scales it (read,
    write) and adds it to the base output (two reads, a write): in + 6 out elements per adapted layer. Compiled,
    the scaling and the sum fuse: in + 2 out fits the H200 measurement (llama-3.2-3b, r=16, 32 x 1024: 0.14 s of
    adapters a step compiled against 0.40 s eager; docs/performance.md, 2026-12-03)."""
    out = 2 if compiled else 6
    return compute_bytes * sum(i + out * o for i, o in adapted_shapes(c, r, targets))
