"""The batch sweep's policy: how a batch is cut into chunks of whole sequences (and, for long context, a sequence
into pieces for blocks that support it), which extras go with each chunk, and the fp32 sums of a layer's weight
gradients over the chunks. The engine (and layer_calls.py) run the chunks; this module decides them."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from megatrain_lightning import schedule as S

log = logging.getLogger(__name__)


class Sweep:
    def __init__(self, device: torch.device, chunk_tokens: int | None, per_sample_extras: tuple[int, ...],
                 templates: list[nn.Module], layers: int = 1) -> None:
        """`chunk_tokens`: schedule.chunk_sequences (None: from free device memory, the whole batch on the CPU).
        `per_sample_extras`: indices of extras whose first dimension is the batch's (sliced with each chunk); the
        others are shared by every sequence (rotary tables). `layers`: how many layers backward recomputes together
        (the checkpoint interval): a chunk's activations are theirs."""
        self.device, self.chunk_tokens, self.layers = device, chunk_tokens, layers
        self.per_sample_extras = tuple(per_sample_extras)
        self.chunk_of: dict[tuple, int] = {}  # (batch, seq_len, dtype) -> sequences per chunk, chosen once
        self.token_chunk_of: dict[tuple, int | None] = {}  # ... -> tokens per piece of a block's token-wise part
        # templates that can run their token-wise part in pieces of a sequence (long context)
        self.token_chunked = [t for t in {id(t): t for t in templates}.values() if hasattr(t, "token_chunk")]
        self.eager = False  # the blocks run checkpointed pieces: not through torch.compile
        # attention heads of layers whose attention materializes its scores (adapters.eager_attention_heads; 0: not)
        self.eager_attention_heads = 0
        self._warned: set[int] = set()

    def chunks(self, x: Tensor) -> list[tuple[int, int]]:
        """The chunks of x [B, T, ...]: sequence ranges, chosen once per batch shape; and, for blocks that have a
        `token_chunk` (model.Block), the tokens of a sequence their token-wise part runs at a time."""
        B, T = x.shape[0], (x.shape[1] if x.dim() > 2 else 1)
        key = (B, T, x.dtype)
        if key not in self.chunk_of:
            if self.device.type == "cuda" and self.chunk_tokens is None:
                free, _ = torch.cuda.mem_get_info(self.device)
                free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            else:
                free = float("inf")  # the CPU: the device is the host
            per_token = x[0].numel() // T * x.element_size()
            scores = self.eager_attention_heads * (T + 1) * x.element_size()  # one token's probabilities
            n = S.chunk_sequences(B, T, self.chunk_tokens, per_token, free, self.layers, scores)
            self.chunk_of[key] = n
            self.token_chunk_of[key] = S.token_chunk(T, self.chunk_tokens, per_token, free, self.layers) \
                if n == 1 else None
            if n < B:
                log.info(f"batch sweep: {B} sequences of {T} tokens run in chunks of {n}")
            if self.token_chunk_of[key] is not None and self.token_chunked:
                log.info(f"long context: the token-wise part of each layer runs {self.token_chunk_of[key]} of "
                         f"{T} tokens at a time")
        tc = self.token_chunk_of[key]
        for template in self.token_chunked:
            template.token_chunk = tc
        self.eager = tc is not None and bool(self.token_chunked)
        return S.chunks(B, self.chunk_of[key])

    def extras(self, extras: tuple[Tensor, ...], lo: int, hi: int, whole: bool) -> tuple[Tensor, ...]:
        """The extras of sequences [lo, hi)."""
        if whole:
            return extras
        return tuple(e[lo:hi] if j in self.per_sample_extras else e for j, e in enumerate(extras))

    def check_extras(self, x: Tensor, extras: tuple[Tensor, ...]) -> None:
        """Chunked: an extra that looks per-sequence (the batch's size first) but is passed whole is named once."""
        B = x.shape[0]
        for j, e in enumerate(extras):
            if (j not in self.per_sample_extras and j not in self._warned and e.dim() > 0 and e.shape[0] == B
                    and B > 1):
                self._warned.add(j)
                log.warning(f"Trunk extra {j} has the batch's size ({B}) as its first dimension but is not in the "
                            f"Trunk's per_sample_extras: each chunk of the batch sweep gets it whole (declare "
                            f"Trunk(..., per_sample_extras=({j},)) if it holds one entry per sequence)")


def add_fp32(sums: list[Tensor | None] | None, grads: tuple[Tensor | None, ...]) -> list[Tensor | None]:
    """Running fp32 sums of one layer's weight gradients over the sweep's chunks (None: not reached yet)."""
    if sums is None:
        return [None if g is None else g.float() if g.dtype != torch.float32 else g for g in grads]
    for k, g in enumerate(grads):
        if g is not None:
            sums[k] = g.float() if sums[k] is None else sums[k].add_(g)
    return sums
