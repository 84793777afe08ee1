"""Chunked LM-head loss equals the full-logits loss (value and gradient), also over
a draft vocabulary and with a top-k teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vllm_longspec.train.loss import Teacher, chunked_lm_head_loss
from vllm_longspec.train.vocab_map import VocabMap, read_draft_vocab


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
    with pytest.raises(ValueError, match="final hidden states or its top-k"):
        chunked_lm_head_loss(h, weight, labels, row_weights, distill_weight=0.5)


def _draft_vocab_problem(seed: int = 2, rows: int = 29, hidden: int = 16, vocab: int = 60):
    h, weight, labels, row_weights, target_hidden = _problem(seed, rows, hidden, vocab)
    ids = np.sort(np.random.default_rng(seed).choice(vocab, 25, replace=False))
    return h, weight, labels, row_weights, target_hidden, VocabMap.build(vocab, ids)


def _reference_over_draft_vocab(h, head, rows, row_weights, teacher_log_probs,
                                distill_weight):
    """float64: CE on rows whose label is in the head, KL to a given teacher."""
    log_q = F.log_softmax(h.double() @ head.double().T, dim=-1)
    in_head = rows >= 0
    ce = -log_q.gather(1, rows.clamp(min=0)[:, None]).squeeze(1) * in_head
    p = teacher_log_probs.exp()
    kl = torch.where(p > 0, p * (teacher_log_probs - log_q), 0.0).sum(-1)
    weights = row_weights.double()
    return (weights * ((1 - distill_weight) * ce + distill_weight * kl)).sum()


@pytest.mark.parametrize("distill_weight", [0.0, 0.4])
def test_loss_over_the_draft_vocab_drops_tokens_it_cannot_propose(distill_weight):
    """Softmax over the head's rows only; a label outside them has no CE term;
    the full teacher is the target restricted to those rows, renormalised."""
    h, weight, labels, row_weights, target_hidden, vocab = _draft_vocab_problem()
    head, rows = vocab.head(weight), vocab.rows(labels)
    assert 0 < int((rows < 0).sum()) < len(rows)
    teacher = F.log_softmax(target_hidden.double() @ head.double().T, dim=-1)
    h_ref = h.double().clone().requires_grad_(True)
    expected = _reference_over_draft_vocab(h_ref, head, rows, row_weights, teacher,
                                           distill_weight)
    expected.backward()
    h_chunked = h.clone().requires_grad_(True)
    loss, stats = chunked_lm_head_loss(h_chunked, head, rows, row_weights,
                                       target_hidden=target_hidden,
                                       distill_weight=distill_weight, chunk_rows=8)
    loss.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_chunked.grad.double(), h_ref.grad, rtol=1e-4, atol=1e-6)
    assert stats[4].item() == int((rows < 0).sum())
    assert stats[2].item() <= int((rows >= 0).sum())  # an outside label is never a hit


def test_top_k_teacher_is_renormalised_over_its_draft_vocab_entries():
    h, weight, labels, row_weights, target_hidden, vocab = _draft_vocab_problem(seed=3)
    head, rows = vocab.head(weight), vocab.rows(labels)
    k = 6
    top = torch.topk(target_hidden @ weight.T, k, dim=-1)
    top_rows = vocab.rows(top.indices)
    top_rows[0] = -1  # a row none of whose top-k the draft can propose: no KL
    # teacher: softmax over the top-k logits that are in the head, 0 elsewhere
    teacher = torch.full((len(h), head.shape[0]), float("-inf"), dtype=torch.float64)
    for r in range(len(h)):
        keep = top_rows[r] >= 0
        if keep.any():
            teacher[r, top_rows[r][keep]] = F.log_softmax(top.values[r][keep].double(), -1)
    h_ref = h.double().clone().requires_grad_(True)
    expected = _reference_over_draft_vocab(h_ref, head, rows, row_weights, teacher, 0.7)
    expected.backward()
    h_chunked = h.clone().requires_grad_(True)
    loss, _ = chunked_lm_head_loss(
        h_chunked, head, rows, row_weights, distill_weight=0.7, chunk_rows=5,
        teacher=Teacher(top_k_logits=top.values, top_k_rows=top_rows))
    loss.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_chunked.grad.double(), h_ref.grad, rtol=1e-4, atol=1e-6)


def test_vocab_map_reads_a_draft_directory_or_npy(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1), "draft_vocab": torch.tensor([7, 3, 9])},
              str(tmp_path / "model.safetensors"))
    np.save(tmp_path / "ids.npy", np.array([9, 3, 7, 3]))
    for source in (tmp_path, tmp_path / "ids.npy"):
        ids = read_draft_vocab(source)
        assert ids.tolist() == [3, 7, 9]
    vocab = VocabMap.build(12, ids)
    assert vocab.rows(torch.tensor([[3, 4], [9, 7]])).tolist() == [[0, -1], [2, 1]]
    weight = torch.arange(24.0).view(12, 2)
    assert torch.equal(vocab.head(weight), weight[[3, 7, 9]])
    with pytest.raises(ValueError, match="outside the target's vocabulary"):
        VocabMap.build(8, ids)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="draft-vocab"):
        read_draft_vocab(tmp_path)
