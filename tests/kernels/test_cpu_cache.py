"""vLLM's CPU KV cache packing, decoded and pinned.

Known values are written with vLLM's own ``cpu_attn_reshape_and_cache`` for
every ISA whose packing we decode (the ``amx`` layout op runs on any x86 CPU;
only vLLM's amx attention kernel needs AMX hardware), then read back through
``logical_kv_views`` / ``gather_kv_blocks``. A vLLM upgrade that changes the
packing turns this file red.
"""

from __future__ import annotations

import pytest
import torch

from vllm_longspec.attention.kv_cache import (
    gather_kv_blocks,
    gather_kv_tokens,
    logical_kv_views,
    move_kv_tokens,
    split_kv_cache,
)

CASES = [(isa, dtype, head, block)
         for isa in ("vec", "vec16", "amx")
         for dtype in (torch.float32, torch.bfloat16)
         for head in (64, 128)
         for block in (32, 128)
         if not (isa == "amx" and dtype == torch.float32)]


def _write(isa, dtype, head_size, block_size, gen):
    from vllm import _custom_ops as ops

    num_blocks, num_kv_heads, num_tokens = 5, 3, 2 * block_size + 7
    kv_cache = torch.full((num_blocks, num_kv_heads, block_size, 2 * head_size),
                          float("nan"), dtype=dtype)
    key_half, value_half = split_kv_cache(kv_cache, "cpu")
    keys = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    values = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    blocks = torch.tensor([4, 1, 2])  # non-contiguous
    pos = torch.arange(num_tokens)
    slots = blocks[pos // block_size] * block_size + pos % block_size
    ops.cpu_attn_reshape_and_cache(keys, values, key_half, value_half, slots, isa)
    return kv_cache, key_half, value_half, keys, values, blocks, pos


@pytest.mark.parametrize("isa,dtype,head_size,block_size", CASES)
def test_gather_decodes_vllm_packing(isa, dtype, head_size, block_size):
    gen = torch.Generator().manual_seed(head_size + block_size)
    kv_cache, key_half, value_half, keys, values, blocks, pos = _write(
        isa, dtype, head_size, block_size, gen)
    before = kv_cache.clone()
    got_k, got_v = gather_kv_blocks(key_half, value_half, blocks, isa)
    # [3 blocks, heads, block, head] -> token rows
    got_k = got_k.permute(0, 2, 1, 3).reshape(-1, *keys.shape[1:])[: len(pos)]
    got_v = got_v.permute(0, 2, 1, 3).reshape(-1, *values.shape[1:])[: len(pos)]
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    assert torch.equal(kv_cache.isnan(), before.isnan()), "decoding must not write"


@pytest.mark.parametrize("isa,dtype,head_size,block_size", CASES)
def test_gather_tokens_reads_chosen_slots(isa, dtype, head_size, block_size):
    gen = torch.Generator().manual_seed(7 * head_size + block_size)
    _, key_half, value_half, keys, values, blocks, pos = _write(
        isa, dtype, head_size, block_size, gen)
    chosen = torch.tensor([len(pos) - 1, 0, block_size + 3, 5, 0])  # any order, repeats
    slots = blocks[chosen // block_size] * block_size + chosen % block_size
    got_k, got_v = gather_kv_tokens(key_half, value_half, slots, isa)
    assert torch.equal(got_k, keys[chosen]) and torch.equal(got_v, values[chosen])


@pytest.mark.parametrize("isa,dtype,head_size,block_size", CASES)
def test_move_tokens_overlapping_source_and_destination(isa, dtype, head_size, block_size):
    """An accepted tree path moving down: destinations overlap later sources."""
    gen = torch.Generator().manual_seed(3 * head_size + block_size)
    kv_cache, key_half, value_half, keys, values, blocks, pos = _write(
        isa, dtype, head_size, block_size, gen)
    src = torch.tensor([block_size - 2, block_size + 1, block_size + 4])
    dst = torch.tensor([block_size - 3, block_size - 2, block_size - 1])

    def slots(p):
        return blocks[p // block_size] * block_size + p % block_size

    move_kv_tokens(kv_cache, slots(src), slots(dst), isa)
    expected_k, expected_v = keys.clone(), values.clone()
    expected_k[dst], expected_v[dst] = keys[src], values[src]
    got_k, got_v = gather_kv_tokens(key_half, value_half, slots(pos), isa)
    assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v)


@pytest.mark.parametrize("isa", ["vec", "vec16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size", [64, 128])
def test_logical_views_are_zero_copy(isa, dtype, head_size):
    gen = torch.Generator().manual_seed(7)
    kv_cache, key_half, value_half, keys, values, blocks, pos = _write(
        isa, dtype, head_size, 32, gen)
    view_k, view_v = logical_kv_views(key_half, value_half, isa)
    assert view_k.data_ptr() == kv_cache.data_ptr()
    assert view_k.stride()[2:] == (1, 32), "keys are stored transposed per page"
    assert view_v.stride()[2:] == (head_size, 1), "values are plain rows"
    block, slot = blocks[pos // 32], pos % 32
    assert torch.equal(view_k[block, :, slot], keys)
    assert torch.equal(view_v[block, :, slot], values)


def test_amx_has_no_strided_view():
    kv_cache = torch.zeros(2, 1, 32, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="gather_kv_blocks"):
        logical_kv_views(*split_kv_cache(kv_cache, "cpu"), "amx")


def test_unknown_packing_is_rejected():
    kv_cache = torch.zeros(2, 1, 32, 128)
    with pytest.raises(ValueError, match="not decoded"):
        gather_kv_blocks(*split_kv_cache(kv_cache, "cpu"), torch.tensor([0]), "neon")


def test_vllm_picks_a_decoded_isa_here():
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    for dtype in (torch.float32, torch.bfloat16):
        for head_size in (64, 128):
            assert _get_attn_isa(dtype, 128, head_size) in ("vec", "vec16", "amx")
