"""Ancestor masks from parent arrays, and their packed bit form."""

from __future__ import annotations

import random

import pytest
import torch

from vllm_longspec.tree.mask import (
    ancestor_mask,
    chain_parents,
    pack_ancestor_bits,
    unpack_ancestor_bits,
)


def test_chain_is_causal():
    assert torch.equal(ancestor_mask(chain_parents(6)), torch.ones(6, 6).tril().bool())


def test_small_tree():
    #      0
    #    1   2
    #    3
    mask = ancestor_mask([-1, 0, 0, 1])
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]])
    assert torch.equal(mask, expected.bool())


@pytest.mark.parametrize("n", [1, 31, 32, 33, 64, 100, 128])
def test_pack_roundtrip(n):
    rng = random.Random(n)
    masks = [ancestor_mask([-1] + [rng.randrange(i) for i in range(1, m)])
             for m in (n, max(1, n // 3))]
    bits = pack_ancestor_bits(masks)
    assert bits.dtype == torch.int32 and bits.shape == (n + max(1, n // 3), 4)
    assert torch.equal(unpack_ancestor_bits(bits[:n], n), masks[0])
    assert torch.equal(unpack_ancestor_bits(bits[n:], max(1, n // 3)), masks[1])


@pytest.mark.parametrize("parents,match", [
    ([0], "root"), ([-1, 1], "topologically"), ([-1, 0, 5], "topologically"),
    ([], "1..128"), ([-1] * 129, "1..128"),
])
def test_bad_parents(parents, match):
    with pytest.raises(ValueError, match=match):
        ancestor_mask(parents)
