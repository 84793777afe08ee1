"""Sampled tree speculation is lossless, by exact enumeration (no Monte Carlo).

For toy target and draft models over 3-4 tokens, enumerate every tree the beam
builder's sampling rule can draw (the shape from ``beam.child_counts``, each
node's children drawn without replacement from its draft distribution) with its
probability, and every accept/reject branch of recursive rejection sampling
(using ``verify.residual`` and ``verify.remove_token``), across rounds until
two tokens are out. The distribution of the first one and first two emitted
tokens must be the target's to 1e-9. The same enumeration with the reference's
deterministic top-k children treated as samples is visibly wrong.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from toy_lm import ToyLM

from vllm_longspec.tree.beam import child_counts
from vllm_longspec.tree.verify import remove_token, residual

Draws = Iterator[tuple[tuple[int | None, ...], float]]
Distribution = dict[tuple[int, ...], float]


@dataclass(frozen=True)
class Node:
    token: int | None          # None: padding, not a draw
    parent: int                # -1: the root
    context: tuple[int, ...]   # the root's context and the path's tokens
    score: float               # cumulative draft log-prob, -inf for padding


def draws_without_replacement(q: list[float], count: int) -> Draws:
    """Every ordered sequence of ``count`` draws without replacement, with its
    probability; padding (None) once q has no mass left."""
    if count == 0:
        yield (), 1.0
        return
    total = sum(q)
    if total == 0:
        yield (None,) * count, 1.0
        return
    for token, mass in enumerate(q):
        if mass > 0:
            rest = list(q)
            rest[token] = 0.0
            for tail, prob in draws_without_replacement(rest, count - 1):
                yield (token,) + tail, mass / total * prob


def top_children(q: list[float], count: int) -> Draws:
    """The wrong rule: the most likely children, deterministically."""
    ranked = sorted(range(len(q)), key=lambda token: -q[token])[:count]
    yield tuple(token if q[token] > 0 else None for token in ranked), 1.0


def draft_trees(draft: ToyLM, widths: list[int], context: tuple[int, ...],
                children_rule: Callable[[list[float], int], Draws]
                ) -> Iterator[tuple[list[Node], float]]:
    root = Node(None, -1, context, 0.0)

    def grow(nodes: list[Node], frontier: list[tuple[int, Node]], level: int,
             prob: float) -> Iterator[tuple[list[Node], float]]:
        if level == len(widths):
            yield nodes, prob
            return
        real = [node.score > -math.inf for _, node in frontier]
        q_rows = [draft.probs(node.context) for _, node in frontier]
        log_q = torch.stack([q.log() if ok else torch.zeros_like(q)
                             for q, ok in zip(q_rows, real, strict=True)])
        scores = torch.tensor([[node.score for _, node in frontier]], dtype=torch.float64)
        counts = child_counts(scores, log_q.unsqueeze(0), widths[level])[0].tolist()
        options = [children_rule(q.tolist(), count) if ok else [((None,) * count, 1.0)]
                   for q, count, ok in zip(q_rows, counts, real, strict=True)]
        for choice in itertools.product(*options):
            children, next_frontier, choice_prob = [], [], prob
            for (index, parent), (tokens, draw_prob) in zip(frontier, choice, strict=True):
                choice_prob *= draw_prob
                for token in tokens:
                    child = padding_child(index) if token is None else Node(
                        token, index, parent.context + (token,),
                        parent.score + math.log(draft.probs(parent.context)[token]))
                    next_frontier.append((len(nodes) + len(children), child))
                    children.append(child)
            yield from grow(nodes + children, next_frontier, level + 1, choice_prob)

    yield from grow([], [(-1, root)], 0, 1.0)


def padding_child(parent: int) -> Node:
    return Node(None, parent, (), -math.inf)


def verification_outcomes(target: ToyLM, draft: ToyLM, nodes: list[Node],
                          context: tuple[int, ...]) -> Distribution:
    """Emitted tokens (accepted path + bonus) -> probability, for one drawn tree."""

    def from_slot(node: int, context: tuple[int, ...]) -> Distribution:
        children = [i for i, child in enumerate(nodes) if child.parent == node]
        return try_children(target.probs(context), draft.probs(context), children)

    def try_children(p: torch.Tensor, q: torch.Tensor, children: list[int]) -> Distribution:
        if not children:
            return {(token,): float(mass) for token, mass in enumerate(p) if mass > 0}
        child, rest = nodes[children[0]], children[1:]
        if child.token is None:
            return try_children(p, q, rest)
        accept = min(1.0, float(p[child.token] / q[child.token]))
        out: Distribution = defaultdict(float)
        if accept > 0:
            for tail, prob in from_slot(children[0], child.context).items():
                out[(child.token,) + tail] += accept * prob
        if accept < 1:
            token = torch.tensor(child.token)
            for tail, prob in try_children(residual(p, q), remove_token(q, token),
                                           rest).items():
                out[tail] += (1 - accept) * prob
        return out

    return from_slot(-1, context)


def emitted_prefix(target: ToyLM, draft: ToyLM, widths: list[int],
                   context: tuple[int, ...], length: int,
                   children_rule: Callable[[list[float], int], Draws]) -> Distribution:
    """Exact distribution of the first ``length`` tokens emitted from ``context``."""
    out: Distribution = defaultdict(float)
    for nodes, tree_prob in draft_trees(draft, widths, context, children_rule):
        for tokens, prob in verification_outcomes(target, draft, nodes, context).items():
            if len(tokens) >= length:
                out[tokens[:length]] += tree_prob * prob
                continue
            later = emitted_prefix(target, draft, widths, context + tokens,
                                   length - len(tokens), children_rule)
            for tail, tail_prob in later.items():
                out[tokens + tail] += tree_prob * prob * tail_prob
    return out


def target_prefix(target: ToyLM, context: tuple[int, ...], length: int) -> Distribution:
    out: Distribution = {}
    for tokens in itertools.product(range(target.vocab), repeat=length):
        prob = 1.0
        for i, token in enumerate(tokens):
            prob *= float(target.probs(context + tokens[:i])[token])
        out[tokens] = prob
    return out


def max_error(got: Distribution, expected: Distribution) -> float:
    return max(abs(got.get(key, 0.0) - expected.get(key, 0.0))
               for key in set(got) | set(expected))


@dataclass(frozen=True)
class Case:
    vocab: int
    widths: list[int]
    seed: int
    zero_fraction: float = 0.25
    target_overrides: dict | None = None
    draft_overrides: dict | None = None
    same_models: bool = False

    def models(self) -> tuple[ToyLM, ToyLM]:
        target = ToyLM(self.vocab, 2 * self.seed, self.zero_fraction,
                       overrides=self.target_overrides)
        if self.same_models:
            return target, target
        return target, ToyLM(self.vocab, 2 * self.seed + 1, self.zero_fraction,
                             overrides=self.draft_overrides)


CASES = {
    "v3-widths2,2": Case(3, [2, 2], 0),
    "v4-widths2,2": Case(4, [2, 2], 1),
    "v4-widths3,2-full-support": Case(4, [3, 2], 2, zero_fraction=0.0),
    "v3-widths2,3": Case(3, [2, 3], 3),
    "v4-widths1,3": Case(4, [1, 3], 4),
    "v4-chain3": Case(4, [1, 1, 1], 5),
    "v3-chain1": Case(3, [1], 10),
    # the draft misses tokens the target likes and vice versa
    "disjoint-supports": Case(4, [2, 2], 7, target_overrides={(): [0.5, 0.5, 0.0, 0.0]},
                              draft_overrides={(): [0.0, 0.3, 0.7, 0.0]}),
    # the root's draft has one token only: its second child is padding
    "draft-support-1": Case(4, [2, 2], 8, draft_overrides={(): [0.0, 0.0, 1.0, 0.0]}),
    "equal-models": Case(3, [2, 2], 9, same_models=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_first_two_tokens_follow_the_target(case):
    target, draft = case.models()
    for length in (1, 2):
        got = emitted_prefix(target, draft, case.widths, (), length,
                             draws_without_replacement)
        assert abs(sum(got.values()) - 1) < 1e-12
        assert max_error(got, target_prefix(target, (), length)) < 1e-9


def test_the_enumeration_catches_deterministic_children():
    # The reference's rule: top-k children verified as if they were samples.
    target, draft = CASES["v4-widths2,2"].models()
    got = emitted_prefix(target, draft, [2, 2], (), 2, top_children)
    assert max_error(got, target_prefix(target, (), 2)) > 1e-2
