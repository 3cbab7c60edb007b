"""Llama-family decoder (Llama 2/3, Mistral, Qwen2): embedding, repeated blocks, final norm + head.

Parameter names follow Hugging Face's `LlamaForCausalLM` (`model.embed_tokens.weight`,
`model.layers.0.self_attn.q_proj.weight`, ..., `lm_head.weight`), so checkpoints map one to one.

The repeated blocks live in a `Trunk`. Without a strategy it runs them one after another like any
`nn.ModuleList`; the megatrain strategy attaches its streaming engine to it, and from then on the
blocks' weights live in host memory and stream through the compute device.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from megatrain_lightning.config import Config


class Trunk(nn.ModuleList):
    """The streamable part of a model: a list of blocks called in order as `x = block(x, *extras)`.

    Any model can use it: wrap the repeated layers in a `Trunk` and call `trunk(x, *extras)`. Blocks must be
    stateless between calls; `extras` (e.g. rotary tables) are shared by every block and receive no gradient.
    The megatrain strategy may run a batch in chunks of whole sequences (x[lo:hi]): an extra is then passed whole,
    shared by every sequence, unless its index is in `per_sample_extras` (its first dimension is the batch's, e.g.
    a per-sequence mask, and it is sliced with x).
    """

    def __init__(self, blocks=None, per_sample_extras: tuple[int, ...] = ()) -> None:
        super().__init__(blocks)
        self.per_sample_extras = tuple(per_sample_extras)
        # set by the megatrain strategy: a callable (x, *extras) -> x that streams the blocks
        self.engine: Callable[..., Tensor] | None = None

    def forward(self, x: Tensor, *extras: Tensor) -> Tensor:
        if self.engine is not None:
            return self.engine(x, *extras)
        for block in self:
            x = block(x, *extras)
        return x


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # normalize in fp32 (as HF does) so bf16 activations keep their precision here
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


# The final norm runs on the whole batch (the trunk's output), where autograd would keep its fp32 intermediates for all
# tokens: llama100b at 96 x 4096 held 15 GiB in rms_norm and 75 GiB more through its backward on the H200
# (bench/step.py --memory-peak, 2026-12-02), beyond the sweep's chunked layers. In pieces of this many tokens, each
# recomputed in backward, it keeps only its bf16 output; the numbers are the same (the norm is per token).
FINAL_NORM_TOKENS = 16384


def rms_norm_in_pieces(x: Tensor, weight: Tensor, eps: float, tokens: int = FINAL_NORM_TOKENS) -> Tensor:
    """rms_norm of x [..., D], `tokens` rows at a time with activation checkpointing when autograd records it."""
    rows = x.reshape(-1, x.shape[-1])  # [N, D]
    if not torch.is_grad_enabled() or rows.shape[0] <= tokens:
        return rms_norm(x, weight, eps)
    out = None
    for lo in range(0, rows.shape[0], tokens):
        piece = torch.utils.checkpoint.checkpoint(rms_norm, rows[lo:lo + tokens], weight, eps, use_reentrant=False)
        if out is None:
            out = torch.empty(rows.shape, dtype=piece.dtype, device=piece.device)  # [N, D]
        out[lo:lo + tokens] = piece  # autograd's CopySlices hands each piece its gradient
        del piece
    return out.view(x.shape)


def swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _mlp_residual(h: Tensor, norm: Tensor, eps: float, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """A block's second half on h [B, t, D]: h + MLP(norm(h)), from its weights as arguments (a checkpointed piece
    recomputes it in backward, when the module's own parameters may be meta tensors again: engine.py binds the
    streamed weights only for the call)."""
    return h + swiglu(rms_norm(h, norm, eps), gate, up, down)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(config: Config, seq_len: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin: [seq_len, head_dim] in fp32, HF's half-rotation layout."""
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32, device=device)
                                            / config.head_dim))
    if config.rope_scaling is not None:
        inv_freq = _llama3_scaling(inv_freq, config.rope_scaling)
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # [T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
    return emb.cos(), emb.sin()


def _llama3_scaling(inv_freq: Tensor, s: dict) -> Tensor:
    """Llama 3.1's frequency scaling (as in Hugging Face's `_compute_llama3_parameters`): long wavelengths are
    slowed by `factor`, short ones kept, the band between interpolated smoothly."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, smoothed, scaled)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, H, T, hd]; cos/sin: [T, hd] (fp32) -> computed in fp32, returned in x's dtype
    return (x.float() * cos + _rotate_half(x.float()) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, config.n_head * config.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, d, bias=False)
        if config.qk_norm:  # Qwen3
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # [B, T, H, hd]
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # [B, T, Hkv, hd]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, hd], [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


def _init_normal(module: nn.Module, std: float) -> None:
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif p.dim() >= 2:
            nn.init.normal_(p, mean=0.0, std=std)
        else:
            nn.init.ones_(p)  # norm weights


class Block(nn.Module):
    # Long context: tokens of the second half (norm, MLP, residual) run at a time, each piece under
    # torch.utils.checkpoint, so that backward holds one piece's MLP activations (with the pieces' inputs) instead of
    # the whole sequence's; None: the whole sequence. The megatrain engine sets it when one sequence of the batch
    # sweep does not fit (schedule.token_chunk); attention runs on the whole sequence (SDPA, memory-efficient).
    token_chunk: int | None = None

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        c = self.token_chunk
        if c is None or x.shape[1] <= c:
            return x + self.mlp(self.post_attention_layernorm(x))
        norm, mlp = self.post_attention_layernorm, self.mlp
        weights = (norm.weight, norm.eps, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        pieces = []
        for lo in range(0, x.shape[1], c):
            part = x[:, lo:lo + c]  # [B, c, D]
            if torch.is_grad_enabled():
                pieces.append(torch.utils.checkpoint.checkpoint(_mlp_residual, part, *weights, use_reentrant=False))
            else:
                pieces.append(_mlp_residual(part, *weights))
        return torch.cat(pieces, dim=1)

    def reset_parameters(self) -> None:
        _init_normal(self, std=0.02)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)


class Head(nn.Linear):
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)


class LlamaBody(nn.Module):
    """HF's `LlamaModel`: embed_tokens, layers, norm."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = Trunk(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


class Llama(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.transformers_type:
            raise ValueError(f"{config.name} is a {config.transformers_type} shape: it trains as the transformers "
                             "model (model=hf: hf_lm.HFCausalLM), not as Llama")
        if config.n_experts:
            raise ValueError(f"{config.name} is a mixture of experts: Llama has dense MLPs (train it as a "
                             "transformers model object)")
        if config.kv_lora_rank:
            raise ValueError(f"{config.name} has latent attention: Llama's is grouped-query (train it as a "
                             "transformers model object)")
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = Head(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.lm_head.weight.device.type != "meta":
            self.reset_parameters()

    def forward(self, idx: Tensor) -> Tensor:
        """idx: [B, T] token ids -> hidden states after the final norm: [B, T, D]."""
        T = idx.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len {self.config.max_seq_len}")
        if self.config.sliding_window and T > self.config.sliding_window:
            raise ValueError(f"sequence length {T} exceeds the model's sliding window {self.config.sliding_window}: "
                             "attention here is full causal, the same as the window's only up to its length")
        cos, sin = rope_tables(self.config, T, device=idx.device)
        x = self.model.embed_tokens(idx)  # [B, T, D]
        x = self.model.layers(x, cos, sin)
        norm = self.model.norm
        return rms_norm_in_pieces(x, norm.weight, norm.eps)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)  # [B, T, V]

    def reset_parameters(self) -> None:
        _init_normal(self, std=0.02)

