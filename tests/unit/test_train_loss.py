"""Chunked LM-head loss equals the full-logits loss: value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_longspec.train.loss import chunked_lm_head_loss


def _problem(seed: int = 0, rows: int = 37, hidden: int = 16, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, dtype=torch.float64).float()
    weight = torch.randn(vocab, hidden, generator=g)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    mask = torch.rand(rows, generator=g) > 0.3
    row_weights = mask.float() / mask.sum()
    target_hidden = torch.randn(rows, hidden, generator=g)
    return h, weight, labels, row_weights, target_hidden


def _full_loss(h, weight, labels, row_weights, target_hidden, distill_weight):
    log_probs = F.log_softmax(h @ weight.T, dim=-1)
    ce = F.nll_loss(log_probs, labels, reduction="none")
    target_log_probs = F.log_softmax(target_hidden @ weight.T, dim=-1)
    kl = (target_log_probs.exp() * (target_log_probs - log_probs)).sum(-1)
    return (row_weights * ((1 - distill_weight) * ce + distill_weight * kl)).sum(), ce


@pytest.mark.parametrize("distill_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("chunk_rows", [1, 8, 37, 100])
def test_chunked_loss_equals_full_loss_and_gradient(distill_weight, chunk_rows):
    h, weight, labels, row_weights, target_hidden = _problem()
    h_full = h.clone().requires_grad_(True)
    expected, ce = _full_loss(h_full, weight, labels, row_weights, target_hidden,
                              distill_weight)
    expected.backward()

    h_chunked = h.clone().requires_grad_(True)
    loss, stats = chunked_lm_head_loss(
        h_chunked, weight, labels, row_weights, target_hidden=target_hidden,
        distill_weight=distill_weight, chunk_rows=chunk_rows,
    )
    (loss * 2.0).backward()  # the upstream gradient is applied
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_chunked.grad, 2.0 * h_full.grad, rtol=1e-5, atol=1e-6)
    assert stats[0].item() == pytest.approx(ce.sum().item(), rel=1e-5)
    assert stats[3].item() == h.shape[0]


def test_chunked_loss_needs_no_gradient_and_counts_top1():
    h, weight, labels, row_weights, _ = _problem(seed=1)
    labels = (h @ weight.T).argmax(-1)  # every row right
    loss, stats = chunked_lm_head_loss(h, weight, labels, row_weights, chunk_rows=5)
    assert not loss.requires_grad
    assert stats[2].item() == h.shape[0]


def test_distillation_without_target_hidden_is_an_error():
    h, weight, labels, row_weights, _ = _problem()
    with pytest.raises(ValueError, match="final hidden"):
        chunked_lm_head_loss(h, weight, labels, row_weights, distill_weight=0.5)
