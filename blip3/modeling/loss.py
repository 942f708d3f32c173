"""Cross-entropy through the decoupled LM head, with its gradients computed in the same pass.

Training needs only the loss and its gradients. `linear_cross_entropy` takes the supervised positions
in chunks; per chunk it computes the logits, their log-sum-exp and, in the same buffer, the gradient
`softmax − onehot`, which it pushes through the head's matmuls at once. Against "logits, then
`cross_entropy`, then autograd" this saves the separate backward pass over the vocabulary, the
concatenation of the two heads' logits and its backward, and the full-size zero gradient of the sliced
head weight; the matmul FLOPs are the same. The idea is Liger's fused linear cross-entropy, in plain
PyTorch so that it runs on CPUs too. The chunk bounds memory (`chunk × V` floats, 131 MB for 1024 × 32k);
accumulating the head's weight gradient costs one pass over that weight per chunk, so chunks are large.

The head has two parts (REFERENCE §1.5): the first `num_base` rows of the LM's own head (+ bias) and an
optional small head for the added tokens. Their logits are never concatenated: one shared maximum and
the sum of both exponentials give the log-sum-exp.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, added_weight, added_bias, targets, num_base: int, chunk: int):
        # hidden [n, d]; weight [R ≥ num_base, d]; bias [R] | None; added_weight [a, d] | None; targets [n]
        need = ctx.needs_input_grad
        heads = [(weight[:num_base], bias[:num_base] if bias is not None else None, 0)]
        if added_weight is not None:
            heads.append((added_weight, added_bias, num_base))
        grads = [
            torch.empty_like(hidden) if need[0] else None,
            _unused_rows_zeroed(weight, num_base) if need[1] else None,
            _unused_rows_zeroed(bias, num_base) if bias is not None and need[2] else None,
            torch.empty_like(added_weight) if added_weight is not None and need[3] else None,
            torch.empty_like(added_bias) if added_bias is not None and need[4] else None,
        ]
        grad_weights = [(grads[1], grads[2]), (grads[3], grads[4])]
        softmax_dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 logits softmax in fp32
        loss = hidden.new_zeros((), dtype=softmax_dtype)

        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            # each part's logits: [c, rows of the part]
            parts = [(torch.addmm(b, h, w.T) if b is not None else h @ w.T).to(softmax_dtype) for w, b, _ in heads]
            target_logit = torch.zeros(len(t), device=t.device, dtype=softmax_dtype)
            for logits, (w, _, offset) in zip(parts, heads):
                mine = (t >= offset) & (t < offset + len(w))
                target_logit[mine] = logits[mine, t[mine] - offset]
            peak = torch.stack([p.amax(1) for p in parts]).amax(0)[:, None]
            total = 0.0
            for logits in parts:
                logits.sub_(peak).exp_()  # in place: the chunk's only vocabulary-sized buffer
                total = total + logits.sum(1, keepdim=True)
            loss += (peak.squeeze(1) + total.squeeze(1).log() - target_logit).sum()
            if not any(need):
                continue
            grad_h = grads[0][start : start + chunk] if grads[0] is not None else None
            first_chunk = start == 0
            for part, (logits, (w, _, offset), (grad_w, grad_b)) in enumerate(zip(parts, heads, grad_weights)):
                logits.div_(total)  # softmax minus the one-hot target = d(summed loss)/d(logits)
                mine = (t >= offset) & (t < offset + len(w))
                logits[mine.nonzero().squeeze(1), t[mine] - offset] -= 1
                logits = logits.to(h.dtype)
                # `out=` forms write the gradients in place (no zero-filled buffers, no extra adds) and are
                # still the matmuls that FLOP counters see
                if grad_h is not None:
                    _mm_into(grad_h, logits, w, accumulate=part > 0)
                if grad_w is not None:
                    _mm_into(grad_w[: len(w)], logits.T, h, accumulate=not first_chunk)
                if grad_b is not None:
                    if first_chunk:
                        torch.sum(logits, 0, out=grad_b[: len(w)])
                    else:
                        grad_b[: len(w)] += logits.sum(0)
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [g * grad_loss.to(g.dtype) if g is not None else None for g in ctx.grads]
        ctx.grads = None
        return (*grads, None, None, None)


def _unused_rows_zeroed(tensor: torch.Tensor, num_base: int) -> torch.Tensor:
    """A gradient buffer for a head tensor whose rows past `num_base` are never used: those rows are 0."""
    grad = torch.empty_like(tensor)
    grad[num_base:] = 0
    return grad


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    if accumulate:
        torch.addmm(out, a, b, out=out)
    else:
        torch.mm(a, b, out=out)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    added_weight: torch.Tensor | None,
    added_bias: torch.Tensor | None,
    targets: torch.Tensor,
    num_base: int,
    chunk: int = 1024,
) -> torch.Tensor:
    """Summed cross-entropy of `targets` [n] under the logits `[hidden @ weight[:num_base].T + bias ; added head]`."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, added_weight, added_bias, targets, num_base, chunk)
