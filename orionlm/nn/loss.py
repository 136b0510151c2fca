"""Cross-entropy of the LM head without materialising the (tokens, vocabulary) logits.

The usual `F.cross_entropy(lm_head(h), targets)` keeps several tokens x vocabulary float32 tensors
alive at once (the logits, their log-softmax, the gradient), each tens of megabytes at a modest batch.
Besides the memory, on CPU every fresh allocation that large is mapped from the OS and faulted in page
by page on every step, which costs as much as the softmax itself. Here the tokens go through the head
in chunks: each chunk's logits give its share of the loss and, since the loss is the end of the graph,
its gradients with respect to the hidden states and the head weight right away (softmax minus the
one-hot target). The backward pass only scales those by the incoming gradient. Same FLOPs as the
unfused form; the peak extra memory is one chunk of logits.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB in float32): cache-sized pieces, big matmuls


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        need_grad = want_hidden or want_weight
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(64, CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows]
            t = targets[start : start + rows]
            keep = valid[start : start + rows]
            logits = (h @ weight.t()).float()  # (n, V); under autocast the matmul runs in its dtype
            safe = t.masked_fill(~keep, 0)
            picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
            # log-sum-exp in place: the chunk's exp(logits - max) becomes the softmax for the gradient
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()
            sums = probs.sum(dim=1, keepdim=True)
            lse = (sums.log() + top).squeeze(1)
            total += ((lse - picked) * keep).sum()
            if need_grad:
                # d(mean loss)/d(logits) = (softmax - onehot(target)) / count, zero on ignored rows
                grad = probs.div_(sums)
                grad.scatter_add_(1, safe.unsqueeze(1), -torch.ones_like(sums))
                grad.mul_((keep / count).unsqueeze(1))
                grad = grad.to(h.dtype)
                if want_hidden:
                    grad_hidden[start : start + rows] = grad @ weight.to(h.dtype)
                if want_weight:
                    grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, skipping targets equal to -100.

    hidden (..., C), weight (V, C), targets (...) of token ids. Equal to
    F.cross_entropy((hidden @ weight.T).float().flatten(0, -2), targets.flatten()) in value and gradients.
    """
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1))
