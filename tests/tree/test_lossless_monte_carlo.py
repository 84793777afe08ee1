"""Sampled tree speculation through the batched implementation, by Monte Carlo.

N_DRAWS copies of one request are drafted (``BeamTreeBuilder``) and verified
(``verify``) as one batch, with a second round for the copies whose first round
emitted a single token. The frequencies of the first two emitted tokens (K = 16
categories) are compared with the target's distribution by total variation.
Bound (Bretagnolle-Huber-Carol): P(TV >= t) <= 2**K * exp(-2 n t**2), which for
n = 10000 and t = TV_BOUND = 0.04 is below 1e-9; a correct implementation's
expected TV is about 0.015. The reference's rule, deterministic top-k children
verified as if sampled, is off by far more (exact TV 0.22 for these models, by
the enumerator of test_lossless_exact), so the same bound catches it: see the
``deterministic_children`` case.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from toy_lm import ToyLM, slot_context_ids

from vllm_longspec.tree import (
    BatchSampling,
    BeamTreeBuilder,
    VerifyNoise,
    verify,
    verify_sampling,
)

N_DRAWS = 10_000
TV_BOUND = 0.04
VOCAB = 4
WIDTHS = [2, 3]


def run_round(target: ToyLM, draft: ToyLM, contexts: list[tuple[int, ...]],
              temperature: float, deterministic_children: bool) -> list[list[int]]:
    """One speculation round per context; the tokens each emits."""
    batch = len(contexts)
    sampling = BatchSampling(torch.full((batch,), temperature))
    builder = BeamTreeBuilder(
        WIDTHS, BatchSampling.greedy(batch) if deterministic_children else sampling)
    roots = torch.tensor([draft.context_id(c) for c in contexts], dtype=torch.int64)
    logits = draft.logits_at(roots)
    level = builder.expand(logits.unsqueeze(1))
    while not builder.done:
        frontier = slot_context_ids(builder.build().tree, contexts, draft)
        level = builder.expand(draft.logits_at(frontier[:, -level.tokens.shape[1]:]))
    beam = builder.build()
    slots = slot_context_ids(beam.tree, contexts, target)
    target_logits = target.logits_at(slots)
    if deterministic_children:
        noise = VerifyNoise.draw(sampling, beam.tree.num_nodes, VOCAB, "cpu")
        result = verify_sampling(beam.tree, draft.probs_at(slots),
                                 sampling.target_probs(target_logits), noise)
    else:
        result = verify(beam.tree, target_logits, sampling, beam.draft_probs)
    return [row[:count] for row, count in zip(result.emitted_tokens.tolist(),
                                              result.num_emitted.tolist(), strict=True)]


def first_two_tokens(target: ToyLM, draft: ToyLM, temperature: float,
                     deterministic_children: bool) -> Counter:
    emitted = run_round(target, draft, [()] * N_DRAWS, temperature, deterministic_children)
    short = [i for i, tokens in enumerate(emitted) if len(tokens) == 1]
    second = run_round(target, draft, [tuple(emitted[i]) for i in short], temperature,
                       deterministic_children)
    for i, tokens in zip(short, second, strict=True):
        emitted[i] = emitted[i] + tokens
    return Counter(tuple(tokens[:2]) for tokens in emitted)


def total_variation(counts: Counter, target: ToyLM, temperature: float) -> float:
    distance = 0.0
    for first, second in itertools.product(range(VOCAB), repeat=2):
        expected = float(target.tempered((), temperature)[first]
                         * target.tempered((first,), temperature)[second])
        distance += abs(counts[(first, second)] / N_DRAWS - expected)
    return distance / 2


@pytest.mark.parametrize("temperature,deterministic_children", [
    (1.0, False), (0.7, False), (1.0, True),
], ids=["t1", "t0.7", "deterministic_children-detected"])
def test_emitted_tokens_follow_the_target(temperature, deterministic_children):
    target, draft = ToyLM(VOCAB, seed=16), ToyLM(VOCAB, seed=17)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        counts = first_two_tokens(target, draft, temperature, deterministic_children)
    distance = total_variation(counts, target, temperature)
    if deterministic_children:
        assert distance > TV_BOUND
    else:
        assert distance < TV_BOUND
