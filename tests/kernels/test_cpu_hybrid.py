"""CPU fast paths against the float64 reference, on vLLM-written CPU caches."""

from __future__ import annotations

import random

import pytest
import torch
from hybrid_cases import (
    PagedCase,
    assert_close,
    assert_lse_close,
    dense_hybrid_reference,
    nan_like,
    query_start_loc,
    tree_inputs,
)

from vllm_longspec.attention import (
    cpu_extension,
    hybrid,
    masked_spec,
    merge,
    paged_prefix,
)
from vllm_longspec.attention.kv_cache import logical_kv_views
from vllm_longspec.tree.mask import unpack_ancestor_bits

# Prefix lengths straddle block (32/128) and split edges; 0 = empty prefix.
PREFIX_LENS = [0, 1, 31, 32, 33, 127, 128, 129, 700, 2049]
SPEC_LENS = [3, 1, 5, 2, 16, 1, 7, 4, 2, 9]


def _isa(dtype, head_size, block_size):
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (16, 2)])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("block_size", [32, 128])
def test_prefix_matches_reference(dtype, num_heads, num_kv_heads, head_size, block_size):
    gen = torch.Generator().manual_seed(head_size * num_heads + block_size)
    isa = _isa(dtype, head_size, block_size)
    case = PagedCase(PREFIX_LENS, num_kv_heads, head_size, block_size, dtype, gen, isa)
    qsl = query_start_loc(SPEC_LENS)
    query = torch.randn(int(qsl[-1]), num_heads, head_size, generator=gen).to(dtype)
    before = case.kv_cache.clone()
    scale = head_size**-0.5
    expected, expected_lse = paged_prefix.reference(
        query, case.keys, case.values, case.block_table, case.prefix_lens, qsl, scale)
    got, lse = paged_prefix.cpu(
        query, case.key_half, case.value_half, case.block_table, case.prefix_lens, qsl,
        scale, out=nan_like(query), lse_out=nan_like(query[..., 0], torch.float32),
        cpu_isa=isa)
    assert_close(got, expected, dtype)
    assert_lse_close(lse, expected_lse, dtype)
    assert torch.equal(case.kv_cache.isnan(), before.isnan()), "the cache must not change"


@pytest.mark.parametrize("head_size", [64, 128])
def test_prefix_reads_amx_packing(head_size):
    """vLLM's amx packing (bf16), decoded inside the C++ kernel and the fallback."""
    gen = torch.Generator().manual_seed(3)
    case = PagedCase(PREFIX_LENS[:8], 2, head_size, 32, torch.bfloat16, gen, "amx")
    qsl = query_start_loc(SPEC_LENS[:8])
    query = torch.randn(int(qsl[-1]), 6, head_size, generator=gen).to(torch.bfloat16)
    expected, expected_lse = paged_prefix.reference(
        query, case.keys, case.values, case.block_table, case.prefix_lens, qsl, 0.1)
    got, lse = paged_prefix.cpu(
        query, case.key_half, case.value_half, case.block_table, case.prefix_lens, qsl,
        0.1, out=nan_like(query), cpu_isa="amx")
    assert_close(got, expected, torch.bfloat16)
    assert_lse_close(lse, expected_lse, torch.bfloat16)


@pytest.mark.parametrize("isa", ["vec", "amx"])
def test_prefix_torch_fallback(monkeypatch, isa):
    """Without the C++ extension: per-request gather of the needed blocks."""
    monkeypatch.setattr(cpu_extension, "load_cpu_extension", lambda: None)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(4)
    case = PagedCase(PREFIX_LENS[:8], 2, 64, 32, dtype, gen, isa)
    qsl = query_start_loc(SPEC_LENS[:8])
    query = torch.randn(int(qsl[-1]), 4, 64, generator=gen).to(dtype)
    expected, expected_lse = paged_prefix.reference(
        query, case.keys, case.values, case.block_table, case.prefix_lens, qsl, 0.125)
    got, lse = paged_prefix.cpu(
        query, case.key_half, case.value_half, case.block_table, case.prefix_lens, qsl,
        0.125, out=nan_like(query), cpu_isa=isa)
    assert_close(got, expected, dtype)
    assert_lse_close(lse, expected_lse, dtype)


def test_prefix_logical_views_and_gpu_layout():
    """cpu_isa=None: strided logical views (CPU vec views or the GPU layout)."""
    gen = torch.Generator().manual_seed(5)
    case = PagedCase([5, 300, 64], 2, 64, 32, torch.float32, gen, "vec")
    qsl = query_start_loc([2, 3, 1])
    query = torch.randn(6, 6, 64, generator=gen)
    expected, _ = paged_prefix.reference(
        query, case.keys, case.values, case.block_table, case.prefix_lens, qsl, 0.125)
    for keys, values in (logical_kv_views(case.key_half, case.value_half, "vec"),
                         case.gpu_layout()):
        got, _ = paged_prefix.cpu(
            query, keys, values, case.block_table, case.prefix_lens, qsl, 0.125)
        assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_size", [(8, 8, 64), (9, 3, 64),
                                                              (8, 1, 128)])
@pytest.mark.parametrize("chain", [False, True])
def test_masked_matches_reference(dtype, num_heads, num_kv_heads, head_size, chain):
    gen = torch.Generator().manual_seed(num_heads + head_size)
    rng = random.Random(num_heads)
    spec_lens = [1, 2, 31, 32, 33, 64, 128, 5]
    query, key, value, qsl, bits = tree_inputs(spec_lens, num_heads, num_kv_heads,
                                               head_size, dtype, gen, rng, chain)
    expected, expected_lse = masked_spec.reference(
        query, key, value, qsl, bits, head_size**-0.5)
    for ancestor_bits in ([bits, None] if chain else [bits]):
        got, lse = masked_spec.cpu(
            query, key, value, qsl, ancestor_bits, head_size**-0.5,
            out=nan_like(query), lse_out=nan_like(query[..., 0], torch.float32))
        assert_close(got, expected, dtype)
        assert_lse_close(lse, expected_lse, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_matches_reference(dtype):
    gen = torch.Generator().manual_seed(6)
    out_a = torch.randn(7, 4, 64, generator=gen).to(dtype)
    out_b = torch.randn(7, 4, 64, generator=gen).to(dtype)
    lse_a = torch.randn(7, 4, generator=gen) * 5
    lse_b = torch.randn(7, 4, generator=gen) * 5
    lse_a[0], lse_b[1] = float("-inf"), float("-inf")
    lse_a[2, :2] = lse_b[2, :2] = float("-inf")  # both empty: output 0
    expected, expected_lse = merge.reference(out_a, lse_a, out_b, lse_b)
    got, lse = merge.cpu(
        out_a, lse_a, out_b, lse_b, out=nan_like(out_a),
        lse_out=nan_like(lse_a))
    assert_close(got, expected, dtype)
    assert_lse_close(lse, expected_lse, dtype)
    assert torch.equal(got[2, :2], torch.zeros_like(got[2, :2]))
    if dtype == torch.float32:  # an empty side leaves the other one exactly
        assert torch.equal(got[0], out_b[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["extension", "extension-split-1", "extension-1-thread",
                                  "extension-widened", "torch"])
@pytest.mark.parametrize("mask", ["tree", "chain"])
@pytest.mark.parametrize("heads,kv_heads,head_size,seed", [
    (6, 2, 64, 8), (8, 8, 128, 9), (9, 3, 64, 10), (16, 2, 128, 11)])
def test_hybrid_equals_dense_masked_attention(monkeypatch, request, dtype, path, mask,
                                              heads, kv_heads, head_size, seed):
    """prefix + masked part (one C++ softmax, with its own or one-block prefix
    splits, or torch + LSE merge) == one softmax over the prefix and the
    visible new tokens."""
    if path == "torch":
        monkeypatch.setattr(cpu_extension, "load_cpu_extension", lambda: None)
    elif cpu_extension.load_cpu_extension() is None:
        pytest.fail("the C++ extension did not build on this machine")
    if path == "extension-split-1":
        monkeypatch.setattr(cpu_extension, "SPLIT_BLOCKS", 1)
    if path == "extension-widened":  # bf16 without vdpbf16ps: widened to float32
        monkeypatch.setattr(cpu_extension, "BF16_PAIRS", False)
    if path == "extension-1-thread":  # the kernel's own choice: no splits
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    prefix_lens = [0, 130, 257, rng.randrange(1, 3000)]
    spec_lens = [4, 16, 9, rng.randrange(1, 128)]
    isa = _isa(dtype, head_size, 128)
    case = PagedCase(prefix_lens, kv_heads, head_size, 128, dtype, gen, isa)
    query, key, value, qsl, bits = tree_inputs(spec_lens, heads, kv_heads, head_size,
                                               dtype, gen, rng)
    if mask == "chain":
        bits = None
    out = nan_like(query)
    hybrid.hybrid_attention(query, key, value, case.key_half, case.value_half,
                                case.block_table, case.prefix_lens, qsl, bits, 0.125, out,
                                cpu_isa=isa)
    lens = (qsl[1:] - qsl[:-1]).tolist()
    new_visible = [torch.ones(n, n, dtype=torch.bool).tril() if bits is None
                   else unpack_ancestor_bits(bits[qsl[r]:qsl[r + 1]], n)
                   for r, n in enumerate(lens)]
    expected = dense_hybrid_reference(case, qsl, query, key, value, new_visible, 0.125)
    assert_close(out, expected, dtype)


def test_bad_arguments_raise_value_errors():
    query = torch.zeros(3, 4, 64)
    key = torch.zeros(3, 2, 64)
    qsl = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="num_kv_heads"):
        masked_spec.cpu(query, torch.zeros(3, 3, 64), torch.zeros(3, 3, 64),
                                         qsl, None, 1.0)
    with pytest.raises(ValueError, match="query_start_loc"):
        masked_spec.cpu(query, key, key, qsl.long(), None, 1.0)
    with pytest.raises(ValueError, match="ancestor_bits"):
        masked_spec.cpu(query, key, key, qsl,
                                         torch.zeros(3, 2, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="not decoded"):
        paged_prefix.cpu(
            query, torch.zeros(2, 2, 32, 64), torch.zeros(2, 2, 32, 64),
            torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), qsl,
            1.0, cpu_isa="neon")
    with pytest.raises(ValueError, match="lse_b"):
        merge.cpu(query, torch.zeros(3, 4), query, torch.zeros(3, 5))


def test_bf16_pairs_are_compiled_where_the_cpu_has_them():
    """So the bf16 cases above run vdpbf16ps here (and the widened path too)."""
    from pathlib import Path

    extension = cpu_extension.load_cpu_extension()
    if extension is None:
        pytest.fail("the C++ extension did not build on this machine")
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), "")
    assert extension.has_bf16_pairs() == ("avx512_bf16" in flags.split())
