"""The dynamic beam tree builder against a naive enumerate-and-sort reference,
and the law of its sampled children."""

from __future__ import annotations

import itertools

import pytest
import torch
from tv_bound import detectable_tv, tv_threshold

from vllm_longspec.tree import BatchSampling, BeamTreeBuilder
from vllm_longspec.tree.beam import child_counts


def build(widths: list[int], sampling: BatchSampling, level_logits: list[torch.Tensor]):
    builder = BeamTreeBuilder(widths, sampling)
    for logits in level_logits:
        builder.expand(logits)
    assert builder.done
    return builder.build()


def random_level_logits(widths: list[int], batch: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, frontier, vocab, generator=gen) * 2
            for frontier in [1] + widths[:-1]]


def reference_beam(widths: list[int], level_logits: list[torch.Tensor], row: int):
    """Score every child of the frontier, sort, keep the best; order the kept
    ones by parent, then by log-prob. Returns (tokens, parents, scores)."""
    tokens, parents, scores = [], [], []
    frontier = [(-1, 0.0)]  # (node, cumulative score)
    for width, logits in zip(widths, level_logits, strict=True):
        log_probs = torch.log_softmax(logits[row].double(), -1)
        children = [(score + float(log_probs[f, v]), f, v)
                    for f, (_, score) in enumerate(frontier) for v in range(logits.shape[-1])]
        kept = sorted(children, key=lambda c: -c[0])[:width]
        kept.sort(key=lambda c: (c[1], -float(log_probs[c[1], c[2]])))
        first = len(tokens)
        for score, f, v in kept:
            tokens.append(v)
            parents.append(frontier[f][0])
            scores.append(score)
        frontier = [(first + i, score) for i, (score, _, _) in enumerate(kept)]
    return tokens, parents, scores


@pytest.mark.parametrize("widths,vocab", [
    ([4, 16, 16, 16, 16], 50), ([3, 5, 4], 7), ([2, 6], 3), ([1, 1, 1], 9),
])
def test_greedy_matches_the_reference(widths, vocab):
    batch = 3
    level_logits = random_level_logits(widths, batch, vocab, seed=len(widths) + vocab)
    beam = build(widths, BatchSampling.greedy(batch), level_logits)
    assert beam.draft_probs is None
    assert beam.tree.num_nodes == sum(widths)
    expected_depths = [d for d, w in enumerate(widths, start=1) for _ in range(w)]
    for row in range(batch):
        tokens, parents, scores = reference_beam(widths, level_logits, row)
        assert beam.tree.tokens[row].tolist() == tokens
        assert beam.tree.parents[row].tolist() == parents
        assert beam.tree.depths[row].tolist() == expected_depths
        torch.testing.assert_close(beam.scores[row].double(),
                                   torch.tensor(scores, dtype=torch.float64),
                                   atol=1e-5, rtol=0)


def test_chain_is_the_greedy_path():
    level_logits = random_level_logits([1, 1, 1, 1], 2, 11, seed=3)
    beam = build([1, 1, 1, 1], BatchSampling.greedy(2), level_logits)
    expected = torch.cat([logits.argmax(-1) for logits in level_logits], dim=1)
    assert torch.equal(beam.tree.tokens, expected)
    assert beam.tree.parents.tolist() == [[-1, 0, 1, 2]] * 2


def test_sampled_rows_keep_the_beam_shape_rule_and_record_q():
    widths, batch, vocab = [3, 5, 4], 4, 7
    level_logits = random_level_logits(widths, batch, vocab, seed=9)
    temperature = torch.tensor([0.0, 1.0, 0.5, 2.0])
    greedy = build(widths, BatchSampling.greedy(batch), level_logits)
    torch.manual_seed(0)
    sampled = build(widths, BatchSampling(temperature), level_logits)
    tree, q = sampled.tree, sampled.draft_probs
    assert torch.equal(tree.tokens[0], greedy.tree.tokens[0])
    # q of every expanded slot (the root, then all levels but the last), tempered
    assert q.shape == (batch, 1 + sum(widths[:-1]), vocab)
    scale = torch.where(temperature > 0, temperature, 1.0).view(-1, 1, 1)
    torch.testing.assert_close(q, torch.softmax(torch.cat(level_logits, 1) / scale, -1))
    # each frontier node has as many children as the beam rule gives it
    first = 0
    for depth, width in enumerate(widths):
        frontier = range(first - widths[depth - 1], first) if depth else [-1]
        scores = (sampled.scores[:, list(frontier)] if depth
                  else torch.zeros(batch, 1))
        counts = child_counts(scores, q[:, [f + 1 for f in frontier]].log(), width)
        level_parents = tree.parents[:, first:first + width]
        got = torch.stack([(level_parents == f).sum(1) for f in frontier], dim=1)
        assert torch.equal(got, counts)
        first += width
    # siblings are distinct tokens; a node's score adds its log q to its parent's
    for row, node in itertools.product(range(batch), range(tree.num_nodes)):
        parent = int(tree.parents[row, node])
        siblings = tree.tokens[row][tree.parents[row] == parent]
        assert len(set(siblings.tolist())) == len(siblings)
        parent_score = 0.0 if parent < 0 else float(sampled.scores[row, parent])
        child_log_q = float(q[row, parent + 1, tree.tokens[row, node]].log())
        assert abs(float(sampled.scores[row, node]) - parent_score - child_log_q) < 1e-4


def test_sampled_children_are_draws_without_replacement():
    """Root with 3 children over V = 5, 10**6 rows at once: the (first, second)
    child pairs must follow q(a) q(b) / (1 - q(a)). Over the 25 (a, b) bins, by
    Bretagnolle-Huber-Carol (``tv_bound``), a correct builder reaches TV 0.0039
    with probability below 1e-6, and one whose pair law is 0.0071 or more from
    the right one (in TV) fails with probability at least 0.9."""
    rows, temperature, categories, false_failure = 1_000_000, 0.7, 25, 1e-6
    assert detectable_tv(rows, categories, false_failure) <= 0.01
    logits = torch.tensor([1.0, 0.2, -0.5, 0.7, -2.0])
    q = torch.softmax(logits.double() / temperature, -1)
    torch.manual_seed(1)
    builder = BeamTreeBuilder([3], BatchSampling(torch.full((rows,), temperature)))
    level = builder.expand(logits.expand(rows, 1, 5))
    pairs = level.tokens[:, 0] * 5 + level.tokens[:, 1]
    frequency = torch.bincount(pairs, minlength=categories).double() / rows
    expected = torch.zeros(categories, dtype=torch.float64)
    for a, b in itertools.permutations(range(5), 2):
        expected[a * 5 + b] = q[a] * q[b] / (1 - q[a])
    distance = float((frequency - expected).abs().sum() / 2)
    assert distance < tv_threshold(rows, categories, false_failure)


def test_children_beyond_the_draft_support_are_padding():
    logits = torch.tensor([[[0.0, -float("inf"), -float("inf")]]])  # q = [1, 0, 0]
    builder = BeamTreeBuilder([2], BatchSampling(torch.ones(1)))
    level = builder.expand(logits)
    assert level.tokens[0, 0] == 0
    assert level.scores[0, 0] == 0 and level.scores[0, 1] == -float("inf")


@pytest.mark.parametrize("widths,match", [
    ([], "positive"), ([2, 0], "positive"), ([64, 64], "128"),
])
def test_bad_widths(widths, match):
    with pytest.raises(ValueError, match=match):
        BeamTreeBuilder(widths, BatchSampling.greedy(1))


def test_expand_checks_the_frontier():
    builder = BeamTreeBuilder([2, 2], BatchSampling.greedy(1))
    with pytest.raises(ValueError, match=r"\[1, 1, V\]"):
        builder.expand(torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="exceeds"):
        BeamTreeBuilder([3], BatchSampling.greedy(1)).expand(torch.zeros(1, 1, 2))
    builder.expand(torch.randn(1, 1, 5))
    builder.expand(torch.randn(1, 2, 5))
    with pytest.raises(RuntimeError, match="built"):
        builder.expand(torch.randn(1, 2, 5))
