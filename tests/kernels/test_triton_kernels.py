"""Triton kernels under TRITON_INTERPRET=1 (fp16/fp32: the interpreter's bf16 dot
is broken), against the float64 reference. Small shapes: the interpreter is slow.
GPU execution itself is untested in this project."""

from __future__ import annotations

import random

import pytest
import torch
from hybrid_cases import (
    PagedCase,
    assert_close,
    assert_lse_close,
    nan_like,
    query_start_loc,
    tree_inputs,
)

from vllm_longspec.attention import masked_spec, merge, paged_prefix
from vllm_longspec.attention.kv_cache import logical_kv_views

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_size", [(3, 1, 64), (4, 4, 128)])
@pytest.mark.parametrize("chain", [False, True])
def test_masked_kernel(triton_ops, dtype, num_heads, num_kv_heads, head_size, chain):
    gen = torch.Generator().manual_seed(head_size + num_heads)
    rng = random.Random(num_heads)
    spec_lens = [1, 5, 33] if head_size == 64 else [2, 17]
    query, key, value, qsl, bits = tree_inputs(spec_lens, num_heads, num_kv_heads,
                                               head_size, dtype, gen, rng, chain)
    expected, expected_lse = masked_spec.reference(
        query, key, value, qsl, bits, head_size**-0.5)
    got, lse = triton_ops.masked_spec_attention(
        query, key, value, qsl, None if chain else bits, head_size**-0.5,
        out=nan_like(query), lse_out=nan_like(query[..., 0], torch.float32))
    assert_close(got, expected, dtype)
    assert_lse_close(lse, expected_lse, dtype)


def test_masked_kernel_128_tokens(triton_ops):
    gen = torch.Generator().manual_seed(1)
    query, key, value, qsl, bits = tree_inputs([128], 2, 1, 64, torch.float16, gen,
                                               random.Random(1))
    expected, _ = masked_spec.reference(query, key, value, qsl, bits, 0.125)
    got, _ = triton_ops.masked_spec_attention(query, key, value, qsl, bits, 0.125,
                                              out=nan_like(query))
    assert_close(got, expected, torch.float16)


# vLLM's CPU cache holds fp32/bf16 here, and bf16 cannot run in the interpreter.
LAYOUTS = [("gpu", torch.float32), ("gpu", torch.float16), ("cpu_vec", torch.float32)]


@pytest.mark.parametrize("layout,dtype", LAYOUTS)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_size", [(8, 1, 64), (3, 3, 128),
                                                              (6, 2, 64)])
def test_prefix_kernel(triton_ops, dtype, num_heads, num_kv_heads, head_size, layout):
    gen = torch.Generator().manual_seed(head_size + num_heads)
    block_size = 16
    prefix_lens, spec_lens = [0, 1, 16, 17, 70], [2, 1, 3, 1, 2]
    isa = "vec" if layout == "cpu_vec" else None
    case = PagedCase(prefix_lens, num_kv_heads, head_size, block_size, dtype, gen, isa)
    keys, values = (logical_kv_views(case.key_half, case.value_half, isa) if isa
                    else case.gpu_layout())
    qsl = query_start_loc(spec_lens)
    query = torch.randn(int(qsl[-1]), num_heads, head_size, generator=gen).to(dtype)
    expected, expected_lse = paged_prefix.reference(
        query, case.keys, case.values, case.block_table, case.prefix_lens, qsl, 0.1)
    for num_splits in (1, 3):
        got, lse = triton_ops.paged_prefix_attention(
            query, keys, values, case.block_table, case.prefix_lens, qsl, 0.1,
            out=nan_like(query), lse_out=nan_like(query[..., 0], torch.float32),
            num_splits=num_splits)
        assert_close(got, expected, dtype)
        assert_lse_close(lse, expected_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_kernel(triton_ops, dtype):
    gen = torch.Generator().manual_seed(2)
    out_a = torch.randn(5, 3, 64, generator=gen).to(dtype)
    out_b = torch.randn(5, 3, 64, generator=gen).to(dtype)
    lse_a, lse_b = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    lse_a[0], lse_b[1] = float("-inf"), float("-inf")
    lse_a[2, 0] = lse_b[2, 0] = float("-inf")
    expected, expected_lse = merge.reference(out_a, lse_a, out_b, lse_b)
    got, lse = triton_ops.merge_attention_states(out_a, lse_a, out_b, lse_b,
                                                 out=nan_like(out_a), lse_out=nan_like(lse_a))
    assert_close(got, expected, dtype)
    assert_lse_close(lse, expected_lse, dtype)


def test_launchers_validate(triton_ops):
    query = torch.zeros(3, 4, 64, dtype=torch.float16)
    qsl = torch.tensor([0, 3], dtype=torch.int32)
    key = torch.zeros(3, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        triton_ops.masked_spec_attention(query, key.float(), key.float(), qsl, None, 1.0)
    with pytest.raises(ValueError, match="at most 128"):
        big = torch.zeros(129, 2, 64, dtype=torch.float16)
        triton_ops.masked_spec_attention(big, big, big,
                                         torch.tensor([0, 129], dtype=torch.int32), None, 1.0)
    cache = torch.zeros(4, 2, 16, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="block_table"):
        triton_ops.paged_prefix_attention(query, cache, cache,
                                          torch.zeros(1, 2, dtype=torch.int64),
                                          torch.zeros(1, dtype=torch.int32), qsl, 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        triton_ops.paged_prefix_attention(query, cache, cache,
                                          torch.zeros(1, 2, dtype=torch.int32),
                                          torch.ones(1, dtype=torch.int32), qsl, 1.0,
                                          num_splits=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_draft_cross_attention_off_cpu_is_the_triton_kernel(triton_ops, monkeypatch,
                                                           dtype):
    """Off CPU the draft's cross-attention reads the target cache in FlashAttention's
    layout (split by ``split_kv_cache(..., "flash")``) with the Triton prefix kernel,
    several queries per request (a tree level). Here: CPU tensors under the
    interpreter, dispatched as if off CPU."""
    import sys

    from vllm_longspec.attention.kv_cache import split_kv_cache

    gen = torch.Generator().manual_seed(7)
    case = PagedCase([0, 1, 17, 70], 2, 64, 16, dtype, gen)
    kv_cache = torch.cat([case.keys, case.values], dim=-1)
    keys, values = split_kv_cache(kv_cache, "flash")
    qsl = query_start_loc([1, 3, 2, 4])  # queries per request
    query = torch.randn(int(qsl[-1]), 6, 64, generator=gen).to(dtype)
    kernel = sys.modules["vllm_longspec.kernels.paged_prefix_attention"]
    launches = []

    def recorded(*args, **kwargs):
        launches.append(args[0].shape)
        return triton_ops.paged_prefix_attention(*args, **kwargs)

    monkeypatch.setattr(kernel, "paged_prefix_attention", recorded)
    monkeypatch.setattr(paged_prefix, "on_cpu", lambda tensor: False)
    got = paged_prefix.paged_decode_attention(query, keys, values, case.block_table,
                                              case.prefix_lens, 0.125,
                                              query_start_loc=qsl)
    expected, _ = paged_prefix.reference(query, case.keys, case.values, case.block_table,
                                         case.prefix_lens, qsl, 0.125)
    assert launches == [query.shape]
    assert_close(got, expected, dtype)
