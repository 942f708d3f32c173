"""The fused head + cross-entropy equals logits → cross_entropy → autograd, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blip3.modeling.loss import linear_cross_entropy


@pytest.mark.parametrize("with_added,with_bias,chunk", [(True, True, 7), (True, False, 1024), (False, True, 3)])
def test_matches_unfused_cross_entropy(with_added, with_bias, chunk):
    torch.manual_seed(0)
    n, d, rows, num_base = 23, 8, 50, 40  # rows past num_base exist but are never predicted
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(rows, d, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(rows, dtype=torch.float64, requires_grad=True) if with_bias else None
    added_w = torch.randn(3, d, dtype=torch.float64, requires_grad=True) if with_added else None
    added_b = torch.randn(3, dtype=torch.float64, requires_grad=True) if with_added else None
    targets = torch.randint(0, num_base + (3 if with_added else 0), (n,))
    params = [p for p in (hidden, weight, bias, added_w, added_b) if p is not None]

    def unfused():
        logits = F.linear(hidden, weight[:num_base], bias[:num_base] if bias is not None else None)
        if with_added:
            logits = torch.cat([logits, F.linear(hidden, added_w, added_b)], dim=-1)
        return F.cross_entropy(logits, targets, reduction="sum")

    expected = unfused()
    expected_grads = torch.autograd.grad(expected * 0.5, params)
    actual = linear_cross_entropy(hidden, weight, bias, added_w, added_b, targets, num_base, chunk=chunk)
    actual_grads = torch.autograd.grad(actual * 0.5, params)
    assert torch.allclose(actual.double(), expected, rtol=1e-6)
    for a, e in zip(actual_grads, expected_grads):
        assert torch.allclose(a, e, atol=1e-10)
    assert actual_grads[1][num_base:].abs().sum() == 0  # unused head rows get no gradient


def test_without_gradients_only_computes_the_loss():
    hidden, weight = torch.randn(5, 4), torch.randn(10, 4)
    targets = torch.tensor([0, 1, 2, 3, 9])
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, None, None, None, targets, 10)
    assert torch.allclose(loss, F.cross_entropy(hidden @ weight.T, targets, reduction="sum"))
