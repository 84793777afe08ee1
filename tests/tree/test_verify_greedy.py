"""Greedy tree verification against a naive recursive walk."""

from __future__ import annotations

import random

import pytest
import torch

from vllm_longspec.tree import DraftTree, verify_greedy


def reference_path(tokens: list[int], parents: list[int], choice: list[int],
                   slot: int = 0) -> list[int]:
    """The longest path below ``slot`` whose tokens match the target's choices."""
    best: list[int] = []
    for child, parent in enumerate(parents):
        if parent == slot - 1 and tokens[child] == choice[slot]:
            path = [child] + reference_path(tokens, parents, choice, child + 1)
            if len(path) > len(best):
                best = path
    return best


def random_tree(rng: random.Random, nodes: int, vocab: int) -> tuple[list[int], list[int]]:
    """Random deep-ish trees (a parent among the 3 previous slots); siblings get
    distinct tokens (as beam trees do)."""
    parents, tokens = [], []
    for i in range(nodes):
        parent = rng.randrange(max(-1, i - 3), i)
        taken = {t for t, p in zip(tokens, parents, strict=True) if p == parent}
        if len(taken) == vocab:
            parent = i - 1  # the previous node has no children yet
            taken = set()
        parents.append(parent)
        tokens.append(rng.choice([t for t in range(vocab) if t not in taken]))
    return tokens, parents


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_reference(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    batch, nodes, vocab = 8, 20, 3
    trees = [random_tree(rng, nodes, vocab) for _ in range(batch)]
    tree = DraftTree.from_parents(torch.tensor([t for t, _ in trees]),
                                  torch.tensor([p for _, p in trees]))
    logits = torch.randn(batch, nodes + 1, vocab, generator=gen)
    for b, (tokens, parents) in enumerate(trees):  # mostly, the target likes a child
        for slot in range(nodes + 1):
            children = [tokens[i] for i, parent in enumerate(parents) if parent == slot - 1]
            if children and rng.random() < 0.8:
                logits[b, slot, rng.choice(children)] += 4.0
    result = verify_greedy(tree, logits)
    choice = logits.argmax(-1).tolist()
    lengths = []
    for b, (tokens, parents) in enumerate(trees):
        path = reference_path(tokens, parents, choice[b])
        bonus = choice[b][path[-1] + 1 if path else 0]
        lengths.append(len(path))
        assert result.accepted_nodes[b].tolist() == path + [-1] * (tree.max_depth - len(path))
        assert result.emitted_tokens[b].tolist() == (
            [tokens[n] for n in path] + [bonus] + [-1] * (tree.max_depth - len(path)))
        assert result.num_emitted[b] == len(path) + 1
    assert max(lengths) >= 3


def test_chain_accepts_the_matching_prefix():
    tree = DraftTree.chain(torch.tensor([[3, 1, 2, 0], [0, 0, 0, 0]]))
    choice = torch.tensor([[3, 1, 0, 0, 2], [1, 0, 0, 0, 0]])
    logits = torch.nn.functional.one_hot(choice, 4).float()
    result = verify_greedy(tree, logits)
    assert result.emitted_tokens.tolist() == [[3, 1, 0, -1, -1], [1, -1, -1, -1, -1]]
    assert result.num_emitted.tolist() == [3, 1]


def test_ties_go_to_the_lowest_token_and_node():
    # all logits equal: the target's choice is token 0 everywhere. Nodes 0 and 1
    # (both token 0, children of the root) match, with matching children 2 and 3.
    tree = DraftTree.from_parents(torch.tensor([[0, 0, 0, 0]]),
                                  torch.tensor([[-1, -1, 1, 0]]))
    result = verify_greedy(tree, torch.zeros(1, 5, 3))
    assert result.accepted_nodes.tolist() == [[1, 2]]
    assert result.emitted_tokens.tolist() == [[0, 0, 0]]

