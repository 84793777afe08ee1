"""The whole verification step (``verify_step``) keeps each row's distribution,
by Monte Carlo over one batch of mixed rows.

One step verifies, interleaved at random, rows of every kind the runner sends:
sampled trees (full, whose draft distributions are zero-padded, and cut by the
scheduler, whose are sliced), sampled chains of deterministic proposals, a
sampled prompt row without drafts, and greedy trees and chains, with
temperature, top-k and top-p set per kind and vLLM's filter passed in as the
runner does (``batch_sampling``). Shape groups mix kinds (see ``KINDS``): a
greedy tree without draft distributions next to a sampled chain, sampled and
greedy trees. The draft is the target plus noise (q close to p), and chains
propose the target's most likely tokens, so most proposals are accepted; a test
asserts it.

Toy target: logits for every context of up to 3 tokens over V = 4, on a
coarse bf16 grid so that top-k and top-p cut through ties. Each sampled kind
compares its (first, second) emitted tokens with the exact law p(x1) p(x2 | x1)
of vLLM's filtered target (a row that emitted one token gets its second drawn
from the exact p(. | x1)); the prompt kind its first token. Each cell is tested
with exact binomial bounds (``binomial_cells``), all cells of all kinds
together failing a correct implementation with probability at most 1e-6; a
shift of any one cell's probability by 0.0098 or more is caught with
probability at least 0.9 (``test_the_test_detects_a_bias_of_0_01``). Greedy
rows must emit the target's argmax path.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from vllm.v1.sample.ops import topk_topp_sampler

from tests.unit.binomial_cells import acceptance_bounds, detectable_bias
from vllm_longspec.runner.sampling import batch_sampling
from vllm_longspec.runner.step import ProposedTree
from vllm_longspec.runner.verification import verify_step
from vllm_longspec.tree import BatchSampling, BeamTreeBuilder, DraftTree

VOCAB = 4
CONTEXT_BASE = VOCAB + 1
NUM_CONTEXTS = CONTEXT_BASE ** 3  # contexts of up to 3 tokens: root + 2 drafts
SAMPLED_COPIES = 125_000
GREEDY_COPIES = 2_000
FALSE_FAILURE = 1e-6


@dataclass(frozen=True)
class Kind:
    name: str
    root: int               # the root's context is this one token
    drafts: str             # "tree", "chain" or "none"
    num_drafts: int         # a tree is cut to this many of its nodes
    temperature: float      # 0: greedy
    top_k: int = VOCAB      # vLLM's format: V = off
    top_p: float = 1.0
    widths: tuple[int, ...] = (2, 2)  # a tree's level sizes

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def copies(self) -> int:
        return GREEDY_COPIES if self.greedy else SAMPLED_COPIES

    @property
    def emitted_compared(self) -> int:
        return 1 if self.drafts == "none" else 2


# Groups by shape: [-1, -1, x, y] sampled-tree and greedy-tree; [-1, -1, x]
# sampled-tree-cut-3; [-1] sampled-tree-cut-1 and greedy-tree-cut-1; [-1, 0]
# sampled-chain-2, greedy-chain-2 and greedy-narrow-tree-cut-2; [] the prompt.
KINDS = [
    Kind("sampled-tree", 0, "tree", 4, 1.0),
    Kind("sampled-tree-cut-3-top-k", 1, "tree", 3, 0.7, top_k=2),
    Kind("sampled-tree-cut-1-top-p", 2, "tree", 1, 1.0, top_p=0.8),
    Kind("sampled-chain-2-top-k-top-p", 3, "chain", 2, 0.7, top_k=3, top_p=0.9),
    Kind("sampled-prompt-top-k", 1, "none", 0, 0.7, top_k=2),
    Kind("greedy-tree", 0, "tree", 4, 0.0),
    Kind("greedy-tree-cut-1", 2, "tree", 1, 0.0),
    Kind("greedy-narrow-tree-cut-2", 2, "tree", 2, 0.0, widths=(1, 2)),
    Kind("greedy-chain-2", 0, "chain", 2, 0.0),
]
SAMPLED = [kind for kind in KINDS if not kind.greedy]


class ToyTarget:
    """Target logits per context (ties on a 0.5 grid, in bf16), the draft's
    (the target's plus noise), and the exact filtered target of each kind."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(NUM_CONTEXTS, VOCAB, generator=gen) * 1.5
        self.logits = ((logits * 2).round() / 2).bfloat16().float()  # [contexts, V]
        self.draft_logits = self.logits + 0.25 * torch.randn(NUM_CONTEXTS, VOCAB,
                                                             generator=gen)

    def exact(self, kind: Kind) -> torch.Tensor:
        """[contexts, V] what a row of ``kind`` samples from, by vLLM's filter."""
        rows = NUM_CONTEXTS
        filtered = topk_topp_sampler.apply_top_k_top_p(
            self.logits / kind.temperature, torch.full((rows,), kind.top_k),
            torch.full((rows,), kind.top_p))
        return filtered.softmax(-1)


def slot_contexts(tree: DraftTree, root: int) -> torch.Tensor:
    """[B, N + 1] context id of every slot: (root,), then the path's tokens."""
    ids = torch.full((tree.batch_size, tree.num_nodes + 1), root + 1, dtype=torch.int64)
    for node in range(tree.num_nodes):
        parent_ids = ids.gather(1, tree.parents[:, node:node + 1] + 1).squeeze(1)
        ids[:, node + 1] = parent_ids + (tree.tokens[:, node] + 1) * CONTEXT_BASE ** (
            tree.depths[:, node])
    return ids


@dataclass(frozen=True)
class KindRows:
    drafts: torch.Tensor                  # [copies, n]
    logits: torch.Tensor                  # [copies, n + 1, V]
    proposals: list[ProposedTree] | None  # tree rows only


def build_rows(target: ToyTarget, kind: Kind) -> KindRows:
    copies, n = kind.copies, kind.num_drafts
    if kind.drafts == "tree":
        sampling = (BatchSampling.greedy(copies) if kind.greedy
                    else BatchSampling(torch.full((copies,), kind.temperature)))
        builder = BeamTreeBuilder(kind.widths, sampling)
        level = builder.expand(target.draft_logits[kind.root + 1].expand(copies, 1, VOCAB))
        while not builder.done:
            frontier = slot_contexts(builder.build().tree, kind.root)
            level = builder.expand(target.draft_logits[frontier[:, -level.tokens.shape[1]:]])
        beam = builder.build()
        # the scheduler kept the first n nodes (ProposedTree.cut, for the whole batch)
        tree = DraftTree(beam.tree.tokens[:, :n], beam.tree.parents[:, :n],
                         beam.tree.depths[:, :n])
        return KindRows(tree.tokens, target.logits[slot_contexts(tree, kind.root)],
                        proposals_of(tree, None if beam.draft_probs is None
                                     else beam.draft_probs[:, :n]))
    # A chain proposes the target's most likely tokens (the same for every copy).
    likely = target.logits.argmax(-1) if kind.greedy else target.exact(kind).argmax(-1)
    contexts, drafts = [kind.root + 1], []
    for depth in range(1, n + 1):
        drafts.append(int(likely[contexts[-1]]))
        contexts.append(contexts[-1] + (drafts[-1] + 1) * CONTEXT_BASE ** depth)
    return KindRows(torch.tensor(drafts, dtype=torch.int64).expand(copies, n),
                    target.logits[contexts].expand(copies, n + 1, VOCAB), None)


def proposals_of(tree: DraftTree, draft_probs: torch.Tensor | None) -> list[ProposedTree]:
    """Each row's ``ProposedTree``; rows drawing the same tree share one object
    (over V = 4 few trees exist, and their draft distributions are the same)."""
    # [B, 2n] -> unique rows, and each row's index among them
    unique, which = torch.unique(torch.cat([tree.tokens, tree.parents], 1), dim=0,
                                 return_inverse=True)
    first_row = torch.full((unique.shape[0],), tree.batch_size).scatter_reduce_(
        0, which, torch.arange(tree.batch_size), "amin").tolist()
    shared = [ProposedTree(tree.tokens[row], tree.parents[row], tree.depths[row],
                           None if draft_probs is None else draft_probs[row])
              for row in first_row]
    return [shared[i] for i in which.tolist()]


def run_step(target: ToyTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``verify_step`` over every kind's rows, interleaved at random.
    Returns ([rows] kind index, [rows, 5] emitted tokens), in batch order."""
    built = [build_rows(target, kind) for kind in KINDS]
    kind_of_row = torch.cat([torch.full((kind.copies,), i) for i, kind in enumerate(KINDS)])
    copy_of_row = torch.cat([torch.arange(kind.copies) for kind in KINDS])
    order = torch.randperm(kind_of_row.shape[0])
    kind_of_row, copy_of_row = kind_of_row[order], copy_of_row[order]
    num_drafts_of_kind = torch.tensor([kind.num_drafts for kind in KINDS])
    num_drafts = num_drafts_of_kind[kind_of_row]
    # e.g. num_drafts [2, 0, 3]: drafts start at [0, 2, 2], logits at [0, 3, 4]
    draft_starts = num_drafts.cumsum(0) - num_drafts
    logit_starts = draft_starts + torch.arange(num_drafts.shape[0])
    draft_token_ids = torch.empty(int(num_drafts.sum()), dtype=torch.int64)
    logits = torch.empty(int(num_drafts.sum()) + num_drafts.shape[0], VOCAB)
    trees = {}
    for i, (kind, rows) in enumerate(zip(KINDS, built, strict=True)):
        batch_rows = (kind_of_row == i).nonzero().squeeze(1)
        copies = copy_of_row[batch_rows]
        slots = torch.arange(kind.num_drafts + 1)
        draft_token_ids[draft_starts[batch_rows, None] + slots[:-1]] = rows.drafts[copies]
        logits[logit_starts[batch_rows, None] + slots] = rows.logits[copies]
        if rows.proposals is not None:
            trees.update(zip(batch_rows.tolist(),
                             (rows.proposals[c] for c in copies.tolist()), strict=True))
    settings = torch.tensor([[k.temperature, k.top_k, k.top_p] for k in KINDS])[kind_of_row]
    metadata = SimpleNamespace(all_greedy=False, temperature=settings[:, 0],
                               top_k=settings[:, 1].int(), top_p=settings[:, 2],
                               generators={})
    result = verify_step(trees, num_drafts.tolist(), draft_token_ids, logits,
                         batch_sampling(metadata, num_drafts.shape[0]))
    return kind_of_row, result.sampled_token_ids.long()


def exact_cells(target: ToyTarget, kind: Kind) -> torch.Tensor:
    """[V] or [V * V] the exact law of the first (two) emitted tokens."""
    exact = target.exact(kind).double()
    first = exact[kind.root + 1]
    if kind.emitted_compared == 1:
        return first
    after_first = exact[kind.root + 1 + (torch.arange(VOCAB) + 1) * CONTEXT_BASE]
    return (first.unsqueeze(1) * after_first).flatten()


def cell_alpha() -> float:
    return FALSE_FAILURE / sum(VOCAB ** kind.emitted_compared for kind in SAMPLED)


@pytest.fixture(scope="module")
def step():
    target = ToyTarget()
    threads = torch.get_num_threads()
    # The step is many small ops: one thread avoids waiting on the other
    # threads of a shared CPU (1.6 times faster on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            kinds, emitted = run_step(target)
    finally:
        torch.set_num_threads(threads)
    return target, kinds, emitted


def test_the_test_detects_a_bias_of_0_01():
    target = ToyTarget()
    worst = max(float(detectable_bias(exact_cells(target, kind), kind.copies,
                                      cell_alpha()).max()) for kind in SAMPLED)
    assert worst <= 0.01


def test_sampled_rows_follow_the_target(step):
    target, kinds, emitted = step
    for i, kind in enumerate(KINDS):
        if kind.greedy:
            continue
        tokens = emitted[kinds == i]
        first = tokens[:, 0]
        cells = first
        if kind.emitted_compared == 2:
            second = tokens[:, 1].clone()
            short = second < 0  # one token emitted: draw the next from the target
            after_first = kind.root + 1 + (first[short] + 1) * CONTEXT_BASE
            second[short] = torch.multinomial(target.exact(kind)[after_first], 1).squeeze(1)
            cells = first * VOCAB + second
        expected = exact_cells(target, kind)
        counts = torch.bincount(cells, minlength=expected.shape[0])
        lowest, highest = acceptance_bounds(expected, tokens.shape[0], cell_alpha())
        outside = ((counts < lowest) | (counts > highest)).nonzero().squeeze(1).tolist()
        assert not outside, (kind.name, outside, counts[outside].tolist(),
                             (expected[outside] * tokens.shape[0]).tolist())


def test_most_proposals_are_accepted(step):
    """Acceptance is exercised, deep paths included, and rejection too: trees
    (q close to p) and chains (the target's most likely tokens) alike."""
    _, kinds, emitted = step
    for i, kind in enumerate(KINDS):
        if kind.greedy or kind.drafts == "none":
            continue
        accepted = (emitted[kinds == i] >= 0).sum(1) - 1
        depth = 2 if kind.drafts == "tree" and kind.num_drafts > 2 else kind.num_drafts
        assert float((accepted >= 1).double().mean()) > 0.4, kind.name
        assert float((accepted == depth).double().mean()) > 0.2, kind.name
        assert float((accepted < depth).double().mean()) > 0.05, kind.name


def test_greedy_rows_emit_the_argmax_path(step):
    target, kinds, emitted = step
    argmax = target.logits.argmax(-1)
    for i, kind in enumerate(KINDS):
        if not kind.greedy:
            continue
        tokens = emitted[kinds == i]
        context = torch.full((tokens.shape[0],), kind.root + 1)
        for position in range(tokens.shape[1]):
            emitted_here = tokens[:, position] >= 0
            assert torch.equal(tokens[emitted_here, position], argmax[context[emitted_here]])
            context = context + (tokens[:, position] + 1) * CONTEXT_BASE ** (position + 1)
        if kind.drafts == "chain":  # it proposes the argmax path: all accepted
            assert ((tokens >= 0).sum(1) == kind.num_drafts + 1).all(), kind.name
