"""The draft's self-attention over tree levels, against attention over explicit key sets."""

from __future__ import annotations

import pytest
import torch

from vllm_longspec.model.level_attention import DraftWindow, LevelSelfAttention
from vllm_longspec.tree import DraftTree

KV_HEADS, GROUP, HEAD = 3, 3, 64
BLOCK_SIZE = 32


def _window_cache(lengths, gen):
    """K/V of positions 0..n-1 per request written by vLLM into a CPU cache with a
    shuffled block table; also returned as plain [B, max_len, heads, head] rows."""
    from vllm import _custom_ops as ops

    from vllm_longspec.attention.kv_cache import split_kv_cache

    max_blocks = -(-max(lengths) // BLOCK_SIZE)
    num_blocks = len(lengths) * max_blocks + 1
    order = torch.randperm(num_blocks - 1, generator=gen) + 1
    block_table = order[: len(lengths) * max_blocks].view(len(lengths), max_blocks)
    kv_cache = torch.zeros(num_blocks, KV_HEADS, BLOCK_SIZE, 2 * HEAD)
    key_half, value_half = split_kv_cache(kv_cache, "cpu")
    keys = torch.randn(len(lengths), max(lengths), KV_HEADS, HEAD, generator=gen)
    values = torch.randn(len(lengths), max(lengths), KV_HEADS, HEAD, generator=gen)
    for b, n in enumerate(lengths):
        pos = torch.arange(n)
        slots = block_table[b, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        ops.cpu_attn_reshape_and_cache(keys[b, :n], values[b, :n], key_half, value_half,
                                       slots, "vec")
    return kv_cache, block_table.to(torch.int32), keys, values


def _attend(q, keys, values, scale):
    """q [H, D] over explicit keys [k, KV_HEADS, D] (GQA)."""
    k = keys.repeat_interleave(GROUP, dim=1)
    v = values.repeat_interleave(GROUP, dim=1)
    probs = (torch.einsum("hd,khd->hk", q, k) * scale).softmax(-1)
    return torch.einsum("hk,khd->hd", probs, v)


@pytest.mark.parametrize("window", [8, 40])
def test_levels_see_their_window_ancestors_and_themselves(window):
    gen = torch.Generator().manual_seed(window)
    lengths = [5, 70]  # the first request is shorter than the window
    kv_cache, block_table, cached_k, cached_v = _window_cache(lengths, gen)
    roots = torch.tensor(lengths) - 1  # the root is the last committed token
    scale = HEAD**-0.5
    drafted = DraftWindow.gather(kv_cache, block_table, roots, window, "vec")
    attention = LevelSelfAttention(drafted, roots, window, scale)

    # Two levels of a batch of trees: widths 2 then 3.
    tree = DraftTree.from_parents(torch.zeros(2, 5, dtype=torch.long),
                                  torch.tensor([[-1, -1, 0, 0, 1], [-1, -1, 1, 1, 1]]))
    node_k = torch.randn(2, 5, KV_HEADS, HEAD, generator=gen)
    node_v = torch.randn(2, 5, KV_HEADS, HEAD, generator=gen)
    node_q = torch.randn(2, 5, KV_HEADS * GROUP, HEAD, generator=gen)
    outputs = []
    for depth, level in ((1, slice(0, 2)), (2, slice(2, 5))):
        attention.next_level(depth, tree.ancestor_mask[:, level, : level.stop])
        width = level.stop - level.start
        outputs.append(attention(node_q[:, level].reshape(2 * width, -1),
                                 node_k[:, level].reshape(2 * width, -1),
                                 node_v[:, level].reshape(2 * width, -1)).view(
            2, width, -1, HEAD))
    got = torch.cat(outputs, dim=1)

    for b, root in enumerate(roots.tolist()):
        for i in range(5):
            position = root + int(tree.depths[b, i])
            first = max(0, position - window)
            ancestors = tree.ancestor_mask[b, i]
            keys = torch.cat([cached_k[b, first:root + 1], node_k[b, ancestors]])
            values = torch.cat([cached_v[b, first:root + 1], node_v[b, ancestors]])
            expected = _attend(node_q[b, i], keys, values, scale)
            torch.testing.assert_close(got[b, i], expected, atol=2e-5, rtol=2e-5)


def test_a_level_needs_its_visibility_first():
    window = DraftWindow(torch.zeros(1, 4, KV_HEADS, HEAD), torch.zeros(1, 4, KV_HEADS, HEAD),
                         torch.arange(4).unsqueeze(0))
    attention = LevelSelfAttention(window, torch.tensor([3]), 4, 1.0)
    with pytest.raises(RuntimeError, match="next_level"):
        attention(torch.zeros(1, 9 * HEAD), torch.zeros(1, 3 * HEAD),
                  torch.zeros(1, 3 * HEAD))
    with pytest.raises(ValueError, match="nodes so far"):
        attention.next_level(1, torch.ones(1, 2, 3, dtype=torch.bool))
