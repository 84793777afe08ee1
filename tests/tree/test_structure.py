"""Draft trees: ancestor masks, depths, children, chains, the query view handed to
the hybrid attention backend, and the ragged form for its kernels."""

from __future__ import annotations

import random

import pytest
import torch

from vllm_longspec.tree import DraftTree, RaggedTrees
from vllm_longspec.tree.mask import ancestor_mask, unpack_ancestor_bits


def random_parents(rng: random.Random, nodes: int) -> list[int]:
    return [rng.randrange(-1, i) for i in range(nodes)]


def naive_ancestors(parents: list[int], node: int) -> set[int]:
    seen = {node}
    while parents[node] >= 0:
        node = parents[node]
        seen.add(node)
    return seen


def random_tree(seed: int, batch: int = 5, nodes: int = 40) -> DraftTree:
    rng = random.Random(seed)
    parents = torch.tensor([random_parents(rng, nodes) for _ in range(batch)])
    return DraftTree.from_parents(torch.randint(100, (batch, nodes)), parents)


@pytest.mark.parametrize("seed", range(3))
def test_masks_depths_and_children_match_naive_walks(seed):
    tree = random_tree(seed)
    for b in range(tree.batch_size):
        parents = tree.parents[b].tolist()
        for node in range(tree.num_nodes):
            ancestors = naive_ancestors(parents, node)
            assert set(tree.ancestor_mask[b, node].nonzero().flatten().tolist()) == ancestors
            assert tree.depths[b, node] == len(ancestors)
        for slot in range(tree.num_nodes + 1):
            children = [i for i, p in enumerate(parents) if p == slot - 1]
            row = tree.children[b, slot].tolist()
            assert row == children + [-1] * (len(row) - len(children))
    assert tree.children.shape[-1] == max(
        max(row.count(p) for p in set(row)) for row in tree.parents.tolist())


def test_node_mask_is_the_query_mask_without_the_root():
    tree = random_tree(7)
    for b, query_parents in enumerate(tree.query_parents()):
        query_mask = ancestor_mask(query_parents)
        assert query_mask[:, 0].all()  # every query token sees the root
        assert torch.equal(query_mask[1:, 1:], tree.ancestor_mask[b])


def test_chain():
    tree = DraftTree.chain(torch.tensor([[5, 6, 7, 8]]))
    assert tree.parents.tolist() == [[-1, 0, 1, 2]]
    assert tree.depths.tolist() == [[1, 2, 3, 4]]
    assert torch.equal(tree.ancestor_mask[0], torch.ones(4, 4).tril().bool())
    assert tree.query_parents() == [[-1, 0, 1, 2, 3]]
    assert tree.positions(torch.tensor([100])).tolist() == [[101, 102, 103, 104]]


def test_query_parents_give_the_nodes_ancestor_masks():
    tree = random_tree(3, batch=2, nodes=6)
    for row, parents in enumerate(tree.query_parents()):
        mask = ancestor_mask(parents)  # [root, nodes...], as the target verifies them
        assert mask[:, 0].all() and not mask[0, 1:].any()
        assert torch.equal(mask[1:, 1:], tree.ancestor_mask[row])


def test_ragged_trees():
    rng = random.Random(1)
    query_parents = [[-1] + [rng.randrange(i) for i in range(1, n)] for n in (1, 6, 41, 2)]
    ragged = RaggedTrees.from_query_parents(query_parents)
    assert ragged.query_start_loc.dtype == torch.int32
    assert ragged.query_start_loc.tolist() == [0, 1, 7, 48, 50]
    bits = ragged.ancestor_bits()
    for r, parents in enumerate(query_parents):
        start, end = ragged.query_start_loc[r:r + 2].tolist()
        assert ragged.parents[start:end].tolist() == parents
        mask = ancestor_mask(parents)
        assert torch.equal(unpack_ancestor_bits(bits[start:end], end - start), mask)
        assert torch.equal(ragged.depths[start:end], mask.sum(-1) - 1)


def test_draft_tree_to_ragged():
    tree = random_tree(4, batch=3, nodes=9)
    ragged = tree.to_ragged()
    assert ragged.query_start_loc.tolist() == [0, 10, 20, 30]
    assert torch.equal(ragged.depths.view(3, 10)[:, 1:], tree.depths)


@pytest.mark.parametrize("parents,match", [
    ([[0, 0]], "topologically"), ([[-1, 1]], "topologically"), ([[-2]], "topologically"),
    ([[]], "N >= 1"),
])
def test_bad_parents(parents, match):
    parents = torch.tensor(parents, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        DraftTree.from_parents(torch.zeros_like(parents), parents)

