"""Linear + cross entropy in token chunks: the same loss and gradients as
`F.cross_entropy(lm_head(h).float(), labels)`, without ever holding the [tokens, vocab] logits.

The forward pass walks the tokens in chunks. For each chunk it computes the chunk's logits (in the
weight's dtype, as nn.Linear would), their fp32 log-sum-exp and loss, and, when gradients are
wanted, the gradient of the summed loss with respect to those logits (softmax - one_hot), which it
turns at once into the chunk's input gradient and adds into an fp32 weight gradient. The chunk's
logits are then freed. Backward only scales the two stored gradients by d(loss) / count, so nothing
is recomputed (the same idea as liger-kernel's fused linear cross entropy, in plain PyTorch).

Memory: one chunk of fp32 logits at a time; by default a chunk holds about as many logits as the
hidden states hold values (chunk = tokens / ceil(vocab / hidden), at least MIN_CHUNK_TOKENS), plus
the input gradient [tokens, hidden] and an fp32 weight gradient [vocab, hidden].
"""

from __future__ import annotations

import math

import torch
from torch import nn

IGNORE_INDEX = -100  # as F.cross_entropy: labels equal to this count neither in the loss nor the mean
MIN_CHUNK_TOKENS = 1024  # smaller matrix products lose more speed than they save memory


def default_chunk_tokens(*, tokens: int, hidden: int, vocab: int) -> int:
    return max(MIN_CHUNK_TOKENS, math.ceil(tokens / math.ceil(vocab / hidden)))


def _loss_and_grads(hidden, weight, labels, *, ignore_index: int, chunk_tokens: int, want_hidden: bool,
                    want_weight: bool):
    """(summed loss, kept-token count, d(sum)/d(hidden) or None, fp32 d(sum)/d(weight) or None)."""
    keep = labels != ignore_index
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    for start in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[start:start + chunk_tokens]
        kept = keep[start:start + chunk_tokens]
        target = labels[start:start + chunk_tokens].masked_fill(~kept, 0)
        logits = (h @ weight.t()).float()  # the dtype of nn.Linear's output, then fp32 as the plain loss
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, target[:, None]).squeeze(1)
        total += ((lse - picked) * kept).sum()
        if not (want_hidden or want_weight):
            continue
        # d(sum of losses) / d(logits) = softmax - one_hot, zero for ignored tokens; in place.
        grad_logits = logits.sub_(lse[:, None]).exp_()
        grad_logits[torch.arange(len(target), device=target.device), target] -= 1.0
        grad_logits.mul_(kept[:, None])
        grad_logits = grad_logits.to(hidden.dtype)  # the plain path's backward casts here too
        if want_hidden:
            grad_hidden[start:start + chunk_tokens] = grad_logits @ weight
        if want_weight:
            if grad_logits.dtype == torch.float32 and h.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), h)
            else:
                grad_weight += (grad_logits.t() @ h).float()
    return total, keep.sum(), grad_hidden, grad_weight


class ChunkedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                chunk_tokens: int) -> torch.Tensor:
        total, count, grad_hidden, grad_weight = _loss_and_grads(
            hidden, weight, labels, ignore_index=ignore_index, chunk_tokens=chunk_tokens,
            want_hidden=ctx.needs_input_grad[0], want_weight=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        # d(mean)/d(sum) times the incoming gradient; with every label ignored the stored gradients are
        # zero and stay zero (as F.cross_entropy's), while the loss itself is 0 / 0 = NaN.
        scale = grad_loss / count.clamp(min=1)
        dh = None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype)
        dw = None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype)
        return dh, dw, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                 ignore_index: int = IGNORE_INDEX, chunk_tokens: int | None = None) -> torch.Tensor:
    """hidden [..., d], weight [vocab, d], labels [...] -> mean fp32 cross entropy over kept tokens."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(tokens=hidden.shape[0], hidden=hidden.shape[1], vocab=weight.shape[0])
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # Validation / no_grad: the loss alone, no gradient buffers.
        total, count, _, _ = _loss_and_grads(hidden, weight, labels, ignore_index=ignore_index,
                                             chunk_tokens=chunk_tokens, want_hidden=False, want_weight=False)
        return total / count
    return ChunkedLinearCrossEntropyFunction.apply(hidden, weight, labels, ignore_index, chunk_tokens)


class HiddenStatesHead(nn.Linear):
    """The lm_head, unchanged as a parameter (same module path, same `weight`, same state_dict key),
    but its forward returns its input: the model then outputs the final normed hidden states and the
    loss applies the head's weight chunk by chunk. Installed by swapping the instance's class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def defer_lm_head(model: nn.Module) -> nn.Linear:
    """Make `model.lm_head` pass its input through (in place); returns the head, whose weight the loss uses."""
    head = model.lm_head
    if type(head) is not nn.Linear or head.bias is not None:
        raise TypeError(f"the fused loss needs a plain bias-free nn.Linear lm_head, got {type(head).__name__}")
    head.__class__ = HiddenStatesHead
    return head


def chunked_loss_for(head: nn.Linear):
    """(hidden, labels) -> loss through `head.weight`: the Trainer's loss_fn after `defer_lm_head`."""

    def loss_fn(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return chunked_linear_cross_entropy(hidden, head.weight, labels)

    return loss_fn
