"""A runner step's verification: trees, chains and bonus-only rows in vLLM's layout."""

from __future__ import annotations

import pytest
import torch

from vllm_longspec.tree import BatchSampling
from vllm_longspec.tree_runner.rounds import ProposedTree, TreeRounds
from vllm_longspec.tree_runner.verification import verify_step

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
    assert step.attention.parents_by_row == {1: [-1, 0, 0]}
    assert step.attention.applies_to(["model.layers.0.attn"])
    assert not step.attention.applies_to(["draft.layers.30.attn"])
    assert rounds.end_step() is step and rounds.step is None
    # Trees are verified in the next step or never.
    assert rounds.begin_step({"a": [3, 4]}, {"a": 0}) is None


def test_requests_with_unsupported_settings_are_refused():
    from vllm import SamplingParams

    from vllm_longspec.tree_runner.sampling import (
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
