"""Drafting in a draft vocabulary's columns: the trees and draws of drafting over
the whole vocabulary with -inf outside it, for a fraction of the work."""

from __future__ import annotations

import pytest
import torch
from tv_bound import detectable_tv, tv_threshold

from vllm_longspec.tree import BatchSampling, BeamTreeBuilder, DraftVocabulary

VOCAB = 11
COLUMNS = torch.tensor([1, 4, 5, 8, 10])


def whole_vocabulary(logits: torch.Tensor) -> torch.Tensor:
    full = torch.full((*logits.shape[:-1], VOCAB), -float("inf"))
    full[..., COLUMNS] = logits
    return full


def build(widths, sampling, level_logits, vocabulary=None):
    builder = BeamTreeBuilder(widths, sampling, vocabulary)
    for logits in level_logits:
        builder.expand(logits)
    return builder.build()


def level_logits(widths, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, frontier, len(COLUMNS), generator=gen) * 2
            for frontier in [1] + widths[:-1]]


def test_greedy_trees_are_those_of_the_whole_vocabulary():
    widths, batch = [3, 5, 4], 4
    columns = level_logits(widths, batch, seed=2)
    got = build(widths, BatchSampling.greedy(batch), columns,
                DraftVocabulary(COLUMNS, VOCAB))
    want = build(widths, BatchSampling.greedy(batch), [whole_vocabulary(c) for c in columns])
    assert torch.equal(got.tree.tokens, want.tree.tokens)
    assert torch.equal(got.tree.parents, want.tree.parents)
    torch.testing.assert_close(got.scores, want.scores)


def test_sampled_trees_draw_token_ids_and_record_q_over_the_whole_vocabulary():
    widths, batch = [2, 3], 3
    temperature = torch.tensor([0.0, 0.7, 1.5])
    columns = level_logits(widths, batch, seed=5)
    torch.manual_seed(0)
    got = build(widths, BatchSampling(temperature), columns,
                DraftVocabulary(COLUMNS, VOCAB))
    assert set(got.tree.tokens.flatten().tolist()) <= set(COLUMNS.tolist())
    scale = torch.where(temperature > 0, temperature, 1.0).view(-1, 1, 1)
    expected = torch.softmax(whole_vocabulary(torch.cat(columns, 1)) / scale, -1)
    torch.testing.assert_close(got.draft_probs, expected)  # 0 outside the columns


def test_chain_draws_follow_the_draft_law():
    """An exponential-race draw (vLLM's draft sampler) on the columns, 400k
    rows: over the 11 tokens (the 6 outside the columns must never come), a
    correct mapping fails with probability below 1e-6, one whose law is 0.0087
    off in TV with probability at least 0.9."""
    rows, false_failure = 400_000, 1e-6
    assert detectable_tv(rows, VOCAB, false_failure) <= 0.0087
    logits = whole_vocabulary(torch.tensor([0.3, -1.0, 1.2, 0.0, -0.4])).expand(rows, -1)

    def exponential_race(columns):
        probs = torch.softmax(columns, -1)
        return (probs / torch.empty_like(probs).exponential_()).argmax(-1), probs

    torch.manual_seed(3)
    tokens, probs = DraftVocabulary(COLUMNS, VOCAB).sample(logits, exponential_race)
    law = torch.softmax(logits[0], -1).double()
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    frequency = torch.bincount(tokens, minlength=VOCAB).double() / rows
    assert float((frequency - law).abs().sum() / 2) < tv_threshold(rows, VOCAB, false_failure)


def test_greedy_sampler_without_probabilities():
    logits = whole_vocabulary(torch.tensor([[0.0, 2.0, 1.0, -1.0, 0.5]]))
    tokens, probs = DraftVocabulary(COLUMNS, VOCAB).sample(
        logits, lambda columns: (columns.argmax(-1), None))
    assert tokens.tolist() == [4] and probs is None


@pytest.mark.parametrize("ids", [torch.tensor([], dtype=torch.long),
                                 torch.arange(12), torch.zeros(2, 2, dtype=torch.long)])
def test_bad_vocabularies(ids):
    with pytest.raises(ValueError, match="token ids"):
        DraftVocabulary(ids, VOCAB)
