"""The draft's cross-attention read of a paged cache, against dense attention.

On CPU the target cache is written by vLLM's own ``cpu_attn_reshape_and_cache``
(which packs keys in an ISA-specific order), exactly as the target's attention
layers write it; the same tokens are also stored as plain rows for the
plain-torch reference (``paged_prefix.reference``) and the logical-view path
(``paged_prefix.cpu``; off CPU the Triton kernel,
``tests/kernels/test_triton_kernels.py``). Every path, the reference included,
is checked against
``dense_attention`` below: a float64 softmax over each request's K/V as
generated, before any paging, so no test compares an implementation with itself.
Also pins the window semantics of vLLM's CPU kernel that the draft's
self-attention relies on: ``sliding_window = n`` lets a query see itself and the
n - 1 tokens before it.
"""

from __future__ import annotations

import pytest
import torch

from vllm_longspec.attention import paged_prefix
from vllm_longspec.attention.kv_cache import split_kv_cache
from vllm_longspec.attention.paged_prefix import paged_decode_attention

TOLERANCES = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
BLOCK_SIZE = 128


def _cpu_isa(dtype, head_size):
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, BLOCK_SIZE, head_size)


def dense_attention(
    query: torch.Tensor,  # [num_queries, num_heads, head_size]
    keys: list[torch.Tensor],  # per query: [seq_len, num_kv_heads, head_size]
    values: list[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """[num_queries, num_heads, head_size] float64: softmax(q.K^T * scale) V (GQA)."""
    out = []
    for q, k, v in zip(query.double(), keys, values, strict=True):
        group = q.shape[0] // k.shape[1]
        k = k.double().repeat_interleave(group, dim=1)  # [seq_len, num_heads, head]
        v = v.double().repeat_interleave(group, dim=1)
        probs = (torch.einsum("hd,khd->hk", q, k) * scale).softmax(-1)
        out.append(torch.einsum("hk,khd->hd", probs, v))
    return torch.stack(out)


def assert_matches_dense(got, query, cache, requests, scale, dtype=torch.float32):
    """got: [num_queries, ...]; requests: the request each query belongs to."""
    expected = dense_attention(query, [cache.keys[r] for r in requests],
                               [cache.values[r] for r in requests], scale)
    torch.testing.assert_close(got.double(), expected, atol=TOLERANCES[dtype],
                               rtol=TOLERANCES[dtype])


class PagedCache:
    """Random K/V for ragged requests, stored twice under one shuffled block table:
    in vLLM's CPU format (written by vLLM) and as plain rows (for the reference).
    ``keys[i]``/``values[i]`` ([seq_len, num_kv_heads, head_size]) keep request
    i's tokens as generated, for ``dense_attention``."""

    def __init__(self, seq_lens, num_kv_heads, head_size, dtype, gen):
        from vllm import _custom_ops as ops

        blocks_per_req = [-(-n // BLOCK_SIZE) for n in seq_lens]
        num_blocks = sum(blocks_per_req) + 3
        order = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 unused
        self.block_table = torch.zeros(len(seq_lens), max(blocks_per_req) + 2,
                                       dtype=torch.int32)
        start = 0
        for i, n in enumerate(blocks_per_req):
            self.block_table[i, :n] = order[start:start + n]
            start += n
        shape = (num_blocks, num_kv_heads, BLOCK_SIZE, head_size)
        self.plain_keys = torch.zeros(shape, dtype=dtype)
        self.plain_values = torch.zeros(shape, dtype=dtype)
        self.kv_cache = torch.zeros(num_blocks, num_kv_heads, BLOCK_SIZE,
                                    2 * head_size, dtype=dtype)
        keys, values = split_kv_cache(self.kv_cache, "cpu")
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for i, n in enumerate(seq_lens):
            k = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
            v = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
            self.keys.append(k)
            self.values.append(v)
            pos = torch.arange(n)
            block = self.block_table[i, pos // BLOCK_SIZE].long()
            self.plain_keys[block, :, pos % BLOCK_SIZE] = k
            self.plain_values[block, :, pos % BLOCK_SIZE] = v
            slots = block * BLOCK_SIZE + pos % BLOCK_SIZE
            ops.cpu_attn_reshape_and_cache(k, v, keys, values, slots,
                                           _cpu_isa(dtype, head_size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (8, 8), (8, 1)])
@pytest.mark.parametrize("head_size", [64, 128])
def test_cpu_kernel_and_reference_match_dense_attention(dtype, num_heads, num_kv_heads,
                                                        head_size):
    gen = torch.Generator().manual_seed(num_heads * 1000 + head_size)
    seq_lens = torch.tensor([1, 127, 128, 129, 1000, 4097], dtype=torch.int32)
    cache = PagedCache(seq_lens.tolist(), num_kv_heads, head_size, dtype, gen)
    query = torch.randn(len(seq_lens), num_heads, head_size, generator=gen).to(dtype)
    keys, values = split_kv_cache(cache.kv_cache, "cpu")
    before = cache.kv_cache.clone()
    scale = head_size**-0.5
    requests = range(len(seq_lens))

    got = paged_decode_attention(query, keys, values, cache.block_table, seq_lens,
                                 scale, cpu_isa=_cpu_isa(dtype, head_size))
    assert_matches_dense(got, query, cache, requests, scale, dtype)
    assert torch.equal(cache.kv_cache, before), "the target cache must not change"
    # The reference is the ground truth of other tests: it is checked here too.
    one_each = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    reference, _ = paged_prefix.reference(query, cache.plain_keys, cache.plain_values,
                                          cache.block_table, seq_lens, one_each, scale)
    assert_matches_dense(reference, query, cache, requests, scale, dtype)


@pytest.mark.parametrize("cpu", [True, False], ids=["cpu_kernel", "logical_views"])
def test_several_queries_per_request(cpu):
    """A draft tree level: each request's nodes all attend its whole prefix."""
    gen = torch.Generator().manual_seed(5)
    seq_lens = torch.tensor([129, 7, 300], dtype=torch.int32)
    cache = PagedCache(seq_lens.tolist(), 3, 64, torch.float32, gen)
    keys, values = split_kv_cache(cache.kv_cache, "cpu")
    counts = torch.tensor([4, 1, 3])
    query_start_loc = torch.cat([torch.zeros(1), counts.cumsum(0)]).to(torch.int32)
    query = torch.randn(int(counts.sum()), 9, 64, generator=gen)
    if cpu:
        got = paged_decode_attention(query, keys, values, cache.block_table, seq_lens,
                                     0.125, cpu_isa=_cpu_isa(torch.float32, 64),
                                     query_start_loc=query_start_loc)
    else:
        got = paged_decode_attention(query, cache.plain_keys, cache.plain_values,
                                     cache.block_table, seq_lens, 0.125,
                                     query_start_loc=query_start_loc)
    requests = torch.arange(3).repeat_interleave(counts).tolist()
    assert_matches_dense(got, query, cache, requests, 0.125)


def test_logical_views_read_the_flash_layout():
    gen = torch.Generator().manual_seed(1)
    seq_lens = torch.tensor([3, 300], dtype=torch.int32)
    cache = PagedCache(seq_lens.tolist(), 3, 64, torch.float32, gen)
    gpu_layout = torch.cat([cache.plain_keys, cache.plain_values], dim=-1)
    keys, values = split_kv_cache(gpu_layout, "flash")
    query = torch.randn(2, 9, 64, generator=gen)
    got = paged_decode_attention(query, keys, values, cache.block_table, seq_lens,
                                 0.125, cpu_isa=None)
    assert_matches_dense(got, query, cache, range(2), 0.125)


def test_split_kv_cache_views():
    kv_cache = torch.arange(2 * 3 * 4 * 10, dtype=torch.float32).view(2, 3, 4, 10)
    keys, values = split_kv_cache(kv_cache, "cpu")
    page = kv_cache[1, 2].reshape(8, 5)
    assert torch.equal(keys[1, 2], page[:4]) and torch.equal(values[1, 2], page[4:])
    keys, values = split_kv_cache(kv_cache, "flash")
    assert torch.equal(keys, kv_cache[..., :5])
    assert torch.equal(values, kv_cache[..., 5:])
    assert keys.data_ptr() == kv_cache.data_ptr(), "views, not copies"


@pytest.mark.parametrize("window", [40, 127, 128])
def test_vllm_cpu_window_counts_the_query_itself(window):
    """The draft passes window + 1 to vLLM to see itself and `window` tokens."""
    from vllm import _custom_ops as ops

    gen = torch.Generator().manual_seed(window)
    heads, head_size, length = 2, 64, 300
    cache = PagedCache([length], heads, head_size, torch.float32, gen)
    keys, values = split_kv_cache(cache.kv_cache, "cpu")
    query = torch.randn(1, heads, head_size, generator=gen)
    seq_lens = torch.tensor([length], dtype=torch.int32)
    query_start_loc = torch.tensor([0, 1], dtype=torch.int32)
    isa = _cpu_isa(torch.float32, head_size)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=heads, num_kv_heads=heads, head_dim=head_size,
        seq_lens=seq_lens, dtype=torch.float32, query_start_loc=query_start_loc,
        causal=True, sliding_window_size=window + 1, isa=isa, enable_kv_split=False)
    out = torch.empty_like(query)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=keys, value_cache=values, output=out,
        query_start_loc=query_start_loc, seq_lens=seq_lens, scale=head_size**-0.5,
        causal=True, alibi_slopes=None, sliding_window=window + 1,
        block_table=cache.block_table, softcap=0.0, scheduler_metadata=metadata,
        s_aux=None)

    # The query sits at position length - 1 and sees positions [start, length).
    start = length - 1 - window
    blocks = cache.block_table[0, :3].long()
    dense_k = cache.plain_keys[blocks].permute(1, 0, 2, 3).reshape(heads, -1, head_size)
    dense_v = cache.plain_values[blocks].permute(1, 0, 2, 3).reshape(heads, -1, head_size)
    scores = torch.einsum("hd,hkd->hk", query[0], dense_k[:, start:length])
    probs = (scores * head_size**-0.5).softmax(-1)
    expected = torch.einsum("hk,hkd->hd", probs, dense_v[:, start:length])
    torch.testing.assert_close(out[0], expected, atol=2e-5, rtol=2e-5)
