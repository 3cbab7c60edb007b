"""What one layer pass keeps for backward and holds while it runs on the device, per token, as the planner counts
it (autograd's saved tensors measured with saved_tensors_hooks on megatrain's Block and on transformers' layers:
tests/test_planner.py). The workload asks here (workload.py: act_ and transient_bytes_per_token)."""

from __future__ import annotations

from megatrain_lightning import schedule as S
from megatrain_lightning.config import Config


def saved(c: Config, cb: int, seq_len: int, token_chunk: int | None) -> int:
    """What autograd keeps for one block's backward (the fp32 RMSNorm/RoPE intermediates cost 12 x hidden whatever
    the compute dtype `cb`). With a token chunk the MLP half's share is one piece's, spread over the sequence, plus
    each piece's saved input."""
    whole = (12 + 4 * cb) * c.hidden_size + 4 * cb * c.active_intermediate_size + 2 * cb * c.n_kv_head * c.head_dim
    whole += scores(c, cb, seq_len) + attention_width(c, cb) + routed(c, cb)
    if not token_chunk:
        return whole
    mlp = mlp_saved(c, cb)
    return whole - mlp + cb * c.hidden_size + mlp * token_chunk // seq_len


def scores(c: Config, cb: int, seq_len: int) -> int:
    """Eager attention (Config.eager_attention): one token's [heads, T + 1] probabilities, saved for backward
    (schedule.EAGER_SCORES_COPIES of them exist while a layer runs); 0 for fused attention."""
    return c.n_head * (seq_len + 1) * cb if c.eager_attention else 0


def attention_width(c: Config, cb: int) -> int:
    """The count in `saved` sizes q and the attention output as the hidden state: where heads x head_dim differs
    (qwen3-235b-a22b: twice), their compute-dtype difference; and q/k RMSNorms' (Config.qk_norm) fp32
    intermediates, (4 + cb) bytes a q or k element (measured on transformers' Qwen3-MoE layer: 6.25 in bf16).
    Latent attention (kv_lora_rank) is left at the count."""
    if c.kv_lora_rank:
        return 0
    q = c.n_head * c.head_dim
    return 2 * cb * (q - c.hidden_size) + ((4 + cb) * (q + c.n_kv_head * c.head_dim) if c.qk_norm else 0)


def routed(c: Config, cb: int) -> int:
    """A mixture's routed copies beyond a dense MLP of the same active width (schedule.ROUTED_COPY_INDEX_BYTES),
    and its router's fp32 probabilities; the mean over layers."""
    if not c.n_experts:
        return 0
    layer = c.experts_per_token * (2 * cb * c.hidden_size + S.ROUTED_COPY_INDEX_BYTES) + 4 * c.n_experts
    return layer * c.n_moe_layers // c.n_layer


def mlp_saved(c: Config, cb: int) -> int:
    """The MLP half's part of `saved` (an attribution, not a measurement): the second norm's fp32 intermediates and
    output, gate, up, their activation and product (a mixture: and its routed copies)."""
    return (6 + cb) * c.hidden_size + 4 * cb * c.active_intermediate_size + routed(c, cb)


def transient(c: Config, cb: int, seq_len: int, token_chunk: int | None) -> int:
    """Working set of one layer pass beyond its inputs: the MLP's gate, up and product, fp32 norm copies, and eager
    attention's other copies of its scores."""
    mlp = 3 * cb * c.active_intermediate_size
    if token_chunk:
        mlp = mlp * token_chunk // seq_len
    return mlp + 8 * c.hidden_size + (S.EAGER_SCORES_COPIES - 1) * scores(c, cb, seq_len)
