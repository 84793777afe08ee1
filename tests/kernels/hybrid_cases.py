"""Random ragged, paged, tree-shaped inputs shared by the kernel tests."""

from __future__ import annotations

import random

import torch

from vllm_longspec.attention.kv_cache import split_kv_cache
from vllm_longspec.tree.mask import ancestor_mask, pack_ancestor_bits

# Named tolerances: (atol, rtol) of outputs against the float64 reference.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
LSE_TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_close(got, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert not torch.isnan(got).any(), "an output element was not written"
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=rtol)


def assert_lse_close(got, expected, dtype):
    assert not torch.isnan(got).any(), "an lse element was not written"
    both_empty = torch.isneginf(got) & torch.isneginf(expected)
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected))
    tol = LSE_TOLERANCE[dtype]
    torch.testing.assert_close(got[~both_empty], expected[~both_empty].float(),
                               atol=tol, rtol=tol)


def random_parents(n: int, rng: random.Random, chain: bool = False) -> list[int]:
    if chain:
        return list(range(-1, n - 1))
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def query_start_loc(lens) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()),
                        dtype=torch.int32)


def nan_like(tensor, dtype=None):
    return torch.full(tensor.shape, float("nan"), dtype=dtype or tensor.dtype)


def tree_inputs(spec_lens, num_heads, num_kv_heads, head_size, dtype, gen, rng,
                chain=False):
    """New-token q/k/v, query_start_loc and packed ancestor bits of random trees."""
    qsl = query_start_loc(spec_lens)
    n = int(qsl[-1])
    query = torch.randn(n, num_heads, head_size, generator=gen).to(dtype)
    key = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
    masks = [ancestor_mask(random_parents(t, rng, chain)) for t in spec_lens]
    return query, key, value, qsl, pack_ancestor_bits(masks)


class PagedCase:
    """Ragged prefixes stored under a shuffled, non-contiguous block table: as
    plain rows (for the reference), in the GPU layout, and, when ``cpu_isa`` is
    given, written by vLLM's own ``cpu_attn_reshape_and_cache``. Unused cache
    memory is ``fill``: NaN by default, so reading past a prefix shows up (vLLM's
    own CPU kernel needs finite filler: it lets unwritten slots of a request's
    last block into its sums, as 0 * NaN)."""

    def __init__(self, prefix_lens, num_kv_heads, head_size, block_size, dtype, gen,
                 cpu_isa=None, fill=float("nan")):
        blocks_per_req = [-(-n // block_size) for n in prefix_lens]
        num_blocks = sum(blocks_per_req) + 3
        order = torch.randperm(num_blocks, generator=gen)
        self.block_table = torch.zeros(len(prefix_lens), max(blocks_per_req) + 2,
                                       dtype=torch.int32)
        # Spare columns point at real (NaN-filled) blocks: they must not be read.
        self.block_table[:] = order[-1]
        self.prefix_lens = torch.tensor(prefix_lens, dtype=torch.int32)
        shape = (num_blocks, num_kv_heads, block_size, head_size)
        self.keys = torch.full(shape, fill, dtype=dtype)
        self.values = torch.full(shape, fill, dtype=dtype)
        self.kv_cache = torch.full((num_blocks, num_kv_heads, block_size, 2 * head_size),
                                   fill, dtype=dtype)
        key_half, value_half = split_kv_cache(self.kv_cache, "cpu")
        start = 0
        for i, n in enumerate(prefix_lens):
            self.block_table[i, :blocks_per_req[i]] = order[start:start + blocks_per_req[i]]
            start += blocks_per_req[i]
            k = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
            v = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
            pos = torch.arange(n)
            block = self.block_table[i, pos // block_size].long()
            self.keys[block, :, pos % block_size] = k
            self.values[block, :, pos % block_size] = v
            if cpu_isa is not None:
                from vllm import _custom_ops as ops

                ops.cpu_attn_reshape_and_cache(k, v, key_half, value_half,
                                               block * block_size + pos % block_size,
                                               cpu_isa)
        self.key_half, self.value_half = key_half, value_half

    def gpu_layout(self):
        """Logical views of a FlashAttention-layout cache holding the same tokens."""
        kv = torch.cat([self.keys, self.values], dim=-1)  # [blocks, heads, bs, 2 * head]
        kv = kv.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # NHD physical
        head_size = self.keys.shape[-1]
        return kv[..., :head_size], kv[..., head_size:]


def dense_hybrid_reference(case, qsl, query, key, value, new_visible, scale):
    """float64 softmax of each request's query tokens over its whole committed
    prefix in ``case`` and the new tokens ``new_visible[r]`` ([n, n] bool) lets
    them see. ``key``/``value``: the new tokens'. Returns [tokens, heads, head]."""
    num_kv_heads, block_size, head_size = case.keys.shape[1:]
    group = query.shape[1] // num_kv_heads
    expected = torch.empty(query.shape, dtype=torch.float64)
    for r, (start, end) in enumerate(zip(qsl[:-1].tolist(), qsl[1:].tolist(), strict=True)):
        n, length = end - start, int(case.prefix_lens[r])
        blocks = case.block_table[r, : -(-length // block_size)].long()
        keys = torch.cat([case.keys[blocks].transpose(1, 2).reshape(-1, num_kv_heads,
                                                                   head_size)[:length],
                          key[start:end]]).double().repeat_interleave(group, 1)
        values = torch.cat([case.values[blocks].transpose(1, 2).reshape(
            -1, num_kv_heads, head_size)[:length], value[start:end]]).double()
        visible = torch.cat([torch.ones(n, length, dtype=torch.bool), new_visible[r]], dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[start:end].double(), keys) * scale
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        expected[start:end] = torch.einsum("hqk,khd->qhd", probs,
                                           values.repeat_interleave(group, 1))
    return expected
