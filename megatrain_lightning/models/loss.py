"""Next-token cross-entropy through the output head, a chunk of tokens at a time, with its gradients computed in the
forward pass.

The logits of a step do not fit in memory at long sequences (32768 tokens x 128256 entries in fp32 is 16.8 GB), so
the head runs chunk by chunk. Recomputing each chunk in backward (activation checkpointing) costs a fourth pass of
the head's matmul and a second pass of the softmax; the loss is the last thing before backward, so its gradient
with respect to the logits (softmax - one-hot) can be formed while the chunk's logits exist, multiplied into the
hidden-state and weight gradients right away, and scaled by the incoming gradient (a scalar) in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        # hidden [N, D], weight [V, D], labels [N]: the summed loss over tokens whose label is not IGNORE_INDEX
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        h_all, w = hidden.to(dtype), weight.to(dtype)
        grad_h = torch.empty_like(h_all)
        want_w = ctx.needs_input_grad[1]  # a frozen head needs no [V, D] gradient
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(device, enabled=False):
            for start in range(0, h_all.shape[0], chunk):
                h, y = h_all[start:start + chunk], labels[start:start + chunk]
                logits = (h @ w.t()).float()  # [c, V]
                valid = y != IGNORE_INDEX
                target = y.clamp_min(0)
                picked = logits.gather(1, target[:, None]).squeeze(1)
                # torch.logsumexp a sixteenth of the rows at a time: over the whole chunk it would hold a second
                # [c, V] fp32 temporary
                rows = max(1, len(y) // 16)
                lse = torch.cat([torch.logsumexp(logits[r:r + rows], dim=-1) for r in range(0, len(y), rows)])  # [c]
                total += ((lse - picked) * valid).sum()
                # d loss / d logits = softmax - one-hot, zero on ignored tokens (in place: the logits go)
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(y), device=y.device), target] -= 1.0
                probs.mul_(valid[:, None])
                g = probs.to(dtype)
                del logits, probs  # before the next chunk's logits exist: one chunk's [c, V] at a time
                grad_h[start:start + chunk] = g @ w
                if want_w:
                    grad_w.add_(g.t() @ h)  # [V, D] in the compute dtype, added into fp32 without an fp32 copy
                del g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_h, grad_w = ctx.saved_tensors  # scaled in place: [V, D] fp32 is large (a second backward raises)
        h_dtype, w_dtype = ctx.dtypes
        grad_w = grad_w.mul_(grad).to(w_dtype) if grad_w is not None else None
        return grad_h.mul_(grad.to(grad_h.dtype)).to(h_dtype), grad_w, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels` (IGNORE_INDEX: not trained on), `chunk` tokens of
    logits at a time; equals F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100) and its gradients."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        total = _LinearCrossEntropy.apply(hidden, weight, labels, chunk)
    else:  # validation: the loss alone, chunk by chunk
        total = sum(F.cross_entropy((h @ weight.t()).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")
                    for h, y in zip(hidden.split(chunk), labels.split(chunk)))
    return total / (labels != IGNORE_INDEX).sum()
