"""A runner step's verification: trees, chains and bonus-only rows in vLLM's layout."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from vllm_longspec.runner.step import ProposedTree, TreeRounds
from vllm_longspec.runner.verification import verify_step
from vllm_longspec.tree import BatchSampling

VOCAB = 11


def _peaked(tokens: list[int]) -> torch.Tensor:
    """Logits whose argmax is each given token."""
    logits = torch.zeros(len(tokens), VOCAB)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return logits


def _tree(tokens, parents, probs=None) -> ProposedTree:
    parents = torch.tensor(parents)
    depths = torch.ones_like(parents)
    for i, parent in enumerate(parents.tolist()):
        if parent >= 0:
            depths[i] = depths[parent] + 1
    return ProposedTree(torch.tensor(tokens), parents, depths, probs)


def test_greedy_rows_of_every_kind():
    # row 0: a tree [root; 3, 4 | 5 under node 1 | 6 under node 2]; the target
    # wants 4 then 6: the second branch, depth 2, bonus 9 (argmax at node 3).
    # row 1: a prompt chunk (no drafts): bonus 2.
    # row 2: a chain [7, 8] of which the target accepts 7, then says 1.
    tree = _tree([3, 4, 5, 6], [-1, -1, 0, 1])
    num_drafts = [4, 0, 2]
    drafts = torch.tensor([3, 4, 5, 6, 7, 8])
    logits = torch.cat([_peaked([4, 0, 6, 0, 9]), _peaked([2]), _peaked([7, 1, 0])])
    result = verify_step({0: tree}, num_drafts, drafts, logits, BatchSampling.greedy(3))
    assert result.sampled_token_ids.tolist() == [
        [4, 6, 9, -1, -1], [2, -1, -1, -1, -1], [7, 1, -1, -1, -1]]
    assert result.sampled_token_ids.dtype == torch.int32
    assert result.accepted_paths == {0: [1, 3]}


def test_trees_of_the_same_shape_share_a_verification():
    trees = {0: _tree([3, 4], [-1, -1]), 1: _tree([5, 6], [-1, -1])}
    logits = torch.cat([_peaked([5, 0, 0]), _peaked([6, 0, 1])])
    result = verify_step(trees, [2, 2], torch.tensor([3, 4, 5, 6]), logits,
                         BatchSampling.greedy(2))
    assert result.sampled_token_ids.tolist() == [[5, -1, -1], [6, 1, -1]]
    assert result.accepted_paths == {0: [], 1: [1]}


def test_sampled_rows_accept_what_the_target_is_sure_of():
    """Target one-hot on the tree's second child: accepted whatever the draft q."""
    q = torch.full((1, VOCAB), 1.0 / VOCAB)
    tree = _tree([3, 4], [-1, -1], probs=q)
    logits = torch.full((3, VOCAB), -1e9)
    logits[0, 4] = logits[2, 8] = 0.0
    sampling = BatchSampling(torch.ones(1))
    result = verify_step({0: tree}, [2], torch.tensor([3, 4]), logits, sampling)
    assert result.sampled_token_ids.tolist() == [[4, 8, -1]]
    assert result.accepted_paths == {0: [1]}


def test_a_greedy_tree_and_a_sampled_chain_of_the_same_shape():
    """Issue 13: a greedy tree cut to one node (drafted in an all-greedy step,
    so without draft distributions) next to a sampled row verifying a stale
    chain of one token raised ValueError, which took the engine down."""
    t = torch.tensor
    result = verify_step({0: ProposedTree(t([5]), t([-1]), t([1]), None)}, [1, 1],
                         t([5, 7]), _peaked([5, 3, 7, 2]), BatchSampling(t([0.0, 1.0])))
    assert result.sampled_token_ids.tolist()[0] == [5, 3]
    assert result.accepted_paths == {0: [0]}


# A full tree [root; node 0 | nodes 1, 2 under node 0], and that tree cut by
# the scheduler to 2 and 1 nodes: the cuts have the shapes of the chains of 2
# and 1 drafts, so they are verified in the same group as those chains.
ROW_SHAPES = {"prompt": 0, "chain1": 1, "chain2": 2, "tree": 3, "cut2": 2, "cut1": 1}
ROW_KINDS = [(mode, shape) for mode in ("greedy", "sampled") for shape in ROW_SHAPES]


@dataclass(frozen=True)
class StepRow:
    proposal: ProposedTree | None
    drafts: torch.Tensor       # [n]
    logits: torch.Tensor       # [n + 1, V]
    temperature: float
    seed: int


def _step_row(kind: tuple[str, str], seed: int) -> StepRow:
    """Random drafts; target logits that favour each slot's drafted children,
    so that paths get accepted. Sampled trees carry their draft distributions,
    greedy ones none (drafted in an all-greedy step)."""
    (mode, shape), n = kind, ROW_SHAPES[kind[1]]
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(VOCAB, (3,), generator=gen)
    probs = torch.softmax(torch.randn(2, VOCAB, generator=gen), -1)
    proposal = None
    if shape in ("tree", "cut2", "cut1"):
        proposal = _tree(tokens.tolist(), [-1, 0, 0],
                         probs if mode == "sampled" else None).cut(n)
    logits = torch.randn(n + 1, VOCAB, generator=gen)
    parents = [-1, 0, 0][:n] if proposal is not None else list(range(-1, n - 1))
    for node, parent in enumerate(parents):
        logits[parent + 1, tokens[node]] += 2.0
    return StepRow(proposal, tokens[:n], logits, 0.0 if mode == "greedy" else 0.8, seed)


def _verify_rows(rows: list[StepRow]):
    sampling = BatchSampling(
        torch.tensor([r.temperature for r in rows]),
        top_k=torch.full((len(rows),), 8), top_p=torch.full((len(rows),), 0.95),
        generators={i: torch.Generator().manual_seed(r.seed) for i, r in enumerate(rows)})
    return verify_step(
        {i: r.proposal for i, r in enumerate(rows) if r.proposal is not None},
        [r.drafts.shape[0] for r in rows], torch.cat([r.drafts for r in rows]),
        torch.cat([r.logits for r in rows]), sampling)


MIXES = [list(pair) for pair in itertools.combinations_with_replacement(ROW_KINDS, 2)]


@pytest.mark.parametrize("kinds", MIXES + [ROW_KINDS + ROW_KINDS[::-1]],
                         ids=["+".join("-".join(k) for k in m) for m in MIXES] + ["all"])
def test_a_mixed_step_verifies_each_row_as_if_alone(kinds):
    """Every mix of greedy / sampled, prompt / chain / tree / cut-tree rows in
    one step: each row's result is the one it gets verified alone (seeded rows
    draw the same noise alone and in a batch)."""
    rows = [_step_row(kind, seed) for seed, kind in enumerate(kinds)]
    together = _verify_rows(rows)
    for i, row in enumerate(rows):
        alone = _verify_rows([row])
        width = alone.sampled_token_ids.shape[1]
        assert together.sampled_token_ids[i, :width].tolist() == \
            alone.sampled_token_ids[0].tolist()
        assert (together.sampled_token_ids[i, width:] == -1).all()
        assert together.accepted_paths.get(i) == alone.accepted_paths.get(0)
        if row.proposal is None:
            assert i not in together.accepted_paths


def test_mixed_steps_accept_drafts_of_every_kind():
    """The mixes above are not vacuous: in a step of 4 rows of each kind,
    drafts of every drafted kind get accepted."""
    kinds = ROW_KINDS * 4
    result = _verify_rows([_step_row(kind, seed) for seed, kind in enumerate(kinds)])
    accepted = {kind for kind, tokens in zip(kinds, result.sampled_token_ids.tolist(),
                                             strict=True)
                if sum(token >= 0 for token in tokens) > 1}
    assert accepted == {kind for kind in ROW_KINDS if kind[1] != "prompt"}


def test_rounds_match_scheduled_drafts_with_trees():
    from vllm_longspec.tree import BeamTree, DraftTree

    rounds = TreeRounds()
    rounds.set_target_kv_groups([(0, ["model.layers.0.attn"])])
    tree = DraftTree.from_parents(torch.tensor([[3, 4, 5], [6, 7, 8]]),
                                  torch.tensor([[-1, -1, 0], [-1, -1, 1]]))
    rounds.propose(["a", "b"], BeamTree(tree, torch.zeros(2, 3), None))
    # "a" lost its last draft to the token budget; "b" was rescheduled with
    # other drafts; "c" is new.
    step = rounds.begin_step({"a": [3, 4], "b": [6, 9, 8], "c": [1]},
                             {"a": 1, "b": 0, "c": 2})
    assert list(step.trees) == [1]
    assert step.trees[1].tokens.tolist() == [3, 4]
    # query tokens [root, node 0, node 1], both nodes children of the root
    assert step.ancestor_masks[1].tolist() == [[True, False, False], [True, True, False],
                                               [True, False, True]]
    assert rounds.step is step
    assert rounds.end_step() is step and rounds.step is None
    # Trees are verified in the next step or never.
    assert rounds.begin_step({"a": [3, 4]}, {"a": 0}) is None


def test_requests_with_unsupported_settings_are_refused():
    from vllm import SamplingParams

    from vllm_longspec.runner.sampling import (
        UnsupportedTreeSamplingError,
        check_request_supported,
    )

    check_request_supported("ok", SamplingParams(temperature=0.7, top_k=5, top_p=0.9,
                                                 seed=3, max_tokens=9))
    check_request_supported("pooling", None)
    for settings, name in (({"logprobs": 2}, "logprobs"),
                           ({"logprobs": 0}, "logprobs"),  # the sampled token's
                           ({"repetition_penalty": 1.1}, "repetition_penalty"),
                           ({"min_p": 0.1}, "min_p"),
                           ({"min_tokens": 4}, "min_tokens"),
                           ({"logit_bias": {3: 1.0}}, "logit_bias")):
        with pytest.raises(UnsupportedTreeSamplingError, match=f"'r' sets {name}"):
            check_request_supported("r", SamplingParams(**settings))
