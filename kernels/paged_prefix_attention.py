"""Paged prefix attention with log-sum-exp, FlashDecoding-style.

Every query token of request r attends cache positions [0, prefix_lens[r]) of
its block table, no mask. Rows of a program are (token, query head) pairs that
share one kv head (GQA), so each cache tile is loaded once for the whole group.

Phase 1, grid (row tiles, requests * kv heads, splits): each program walks its
split of the prefix in BLOCK_N steps (online softmax) and writes a normalised
partial output and its lse. Phase 2, grid (tokens, heads): merge the splits.

The caches are logical views [num_blocks, num_kv_heads, block_size, head_size]
with any strides, so one kernel reads
- the GPU/FlashAttention layout: ``kv_cache[..., :head]`` / ``[..., head:]`` of
  the [num_blocks, num_kv_heads, block_size, 2 * head_size] view, and
- vLLM's CPU "vec"/"vec16" packing via ``attention.kv_cache.logical_kv_views``
  (keys transposed per page: token stride 1). The CPU "amx" tile packing has no
  strided view; on CPU the C++ path serves it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_longspec.kernels import tuning
from vllm_longspec.kernels.checks import check_paged_inputs
from vllm_longspec.kernels.launch import check_device, next_power_of_2

LOG2E = 1.4426950408889634


@triton.jit
def _prefix_split_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, prefix_lens_ptr, qsl_ptr,
    part_out_ptr, part_lse_ptr,
    scale_log2, num_tokens,
    stride_q_tok, stride_q_head,
    stride_k_blk, stride_k_head, stride_k_tok, stride_k_dim,
    stride_v_blk, stride_v_head, stride_v_tok, stride_v_dim,
    stride_bt,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
    HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    row_tile = tl.program_id(0)
    req = tl.program_id(1) // NUM_KV_HEADS
    kv_head = tl.program_id(1) % NUM_KV_HEADS
    split = tl.program_id(2)
    start = tl.load(qsl_ptr + req)
    num_rows = (tl.load(qsl_ptr + req + 1) - start) * GROUP
    if row_tile * BLOCK_M >= num_rows:
        return
    prefix_len = tl.load(prefix_lens_ptr + req)
    chunk = tl.cdiv(tl.cdiv(prefix_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_begin = split * chunk
    kv_end = tl.minimum(kv_begin + chunk, prefix_len)

    # rows: (token, group member) -> query token and head
    offs_m = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < num_rows
    dim_ok = offs_d < HEAD_SIZE
    tokens = start + offs_m // GROUP
    heads = kv_head * GROUP + offs_m % GROUP
    # [BLOCK_M, BLOCK_D]
    q = tl.load(q_ptr + tokens[:, None] * stride_q_tok + heads[:, None] * stride_q_head
                + offs_d[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(kv_begin, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < kv_end
        blocks = tl.load(block_table_ptr + req * stride_bt + pos // BLOCK_SIZE,
                         mask=pos_ok, other=0).to(tl.int64)
        offset = pos % BLOCK_SIZE
        load_ok = pos_ok[:, None] & dim_ok[None, :]
        # [BLOCK_N, BLOCK_D]
        k = tl.load(k_ptr + blocks[:, None] * stride_k_blk + kv_head * stride_k_head
                    + offset[:, None] * stride_k_tok + offs_d[None, :] * stride_k_dim,
                    mask=load_ok, other=0.0)
        v = tl.load(v_ptr + blocks[:, None] * stride_v_blk + kv_head * stride_v_head
                    + offset[:, None] * stride_v_tok + offs_d[None, :] * stride_v_dim,
                    mask=load_ok, other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(pos_ok[None, :], scores * scale_log2, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        alpha = tl.exp2(row_max - new_max)  # row_max = -inf on the first step: 0
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(probs, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
        row_max = new_max

    seen = row_sum > 0.0
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    lse = tl.where(seen, (row_max + tl.log2(tl.where(seen, row_sum, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    # partials: [NUM_SPLITS, num_tokens, NUM_HEADS, HEAD_SIZE] and [.., NUM_HEADS]
    slot = (split * num_tokens + tokens) * NUM_HEADS + heads
    tl.store(part_out_ptr + slot[:, None] * HEAD_SIZE + offs_d[None, :], out,
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(part_lse_ptr + slot, lse, mask=row_ok)


@triton.jit
def _prefix_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, num_tokens,
    stride_o_tok, stride_o_head, stride_lse_tok,
    NUM_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    split_ok = offs_s < NUM_SPLITS
    slot = (offs_s * num_tokens + token) * NUM_HEADS + head
    lse = tl.load(part_lse_ptr + slot, mask=split_ok, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    empty = lse_max == float("-inf")
    weights = tl.exp(lse - tl.where(empty, 0.0, lse_max))  # empty splits: 0
    total = tl.sum(weights, axis=0)
    parts = tl.load(part_out_ptr + slot[:, None] * HEAD_SIZE + offs_d[None, :],
                    mask=split_ok[:, None] & (offs_d[None, :] < HEAD_SIZE), other=0.0)
    merged = tl.sum(parts * weights[:, None], axis=0) / tl.where(empty, 1.0, total)
    merged = tl.where(empty, 0.0, merged)
    tl.store(out_ptr + token * stride_o_tok + head * stride_o_head + offs_d,
             merged.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_SIZE)
    tl.store(lse_ptr + token * stride_lse_tok + head,
             tl.where(empty, float("-inf"), lse_max + tl.log(tl.where(empty, 1.0, total))))


def paged_prefix_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    prefix_lens: torch.Tensor,  # [num_reqs] int32
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_size]
    lse_out: torch.Tensor | None = None,  # [num_tokens, num_heads] float32
    num_splits: int | None = None,
    max_tokens_per_req: int | None = None,
    max_prefix_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``max_*`` hints avoid device syncs; ``num_splits`` overrides the heuristic."""
    check_paged_inputs(query, key_cache, value_cache, block_table, prefix_lens,
                       query_start_loc, out, lse_out)
    check_device(_prefix_split_kernel, query, key_cache, value_cache)
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    num_reqs = query_start_loc.numel() - 1
    if out is None:
        out = torch.empty_like(query)
    if lse_out is None:
        lse_out = torch.empty(num_tokens, num_heads, dtype=torch.float32,
                              device=query.device)
    if lse_out.stride(1) != 1:
        raise ValueError("lse_out must have a contiguous head dim")
    if num_tokens == 0 or num_reqs == 0:
        return out, lse_out
    if max_tokens_per_req is None:
        max_tokens_per_req = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_prefix_len is None:
        max_prefix_len = int(prefix_lens.max())
    tiles = tuning.prefix_tiles()
    block_m, block_n = tiles.pop("BLOCK_M"), tiles.pop("BLOCK_N")
    row_tiles = -(-max_tokens_per_req * group // block_m)
    if num_splits is None:
        num_splits = tuning.default_num_splits(max_prefix_len,
                                               row_tiles * num_reqs * num_kv_heads)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    part_out = torch.empty(num_splits, num_tokens, num_heads, head_size,
                           dtype=torch.float32, device=query.device)
    part_lse = torch.empty(num_splits, num_tokens, num_heads, dtype=torch.float32,
                           device=query.device)
    block_d = max(16, next_power_of_2(head_size))
    _prefix_split_kernel[(row_tiles, num_reqs * num_kv_heads, num_splits)](
        query, key_cache, value_cache, block_table, prefix_lens, query_start_loc,
        part_out, part_lse, float(scale) * LOG2E, num_tokens,
        query.stride(0), query.stride(1), *key_cache.stride(), *value_cache.stride(),
        block_table.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group,
        HEAD_SIZE=head_size, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits, BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=query.dtype == torch.float32, **tiles,
    )
    _prefix_reduce_kernel[(num_tokens, num_heads)](
        part_out, part_lse, out, lse_out, num_tokens,
        out.stride(0), out.stride(1), lse_out.stride(0),
        NUM_HEADS=num_heads, HEAD_SIZE=head_size, BLOCK_D=block_d,
        NUM_SPLITS=num_splits, BLOCK_S=max(2, next_power_of_2(num_splits)),
    )
    return out, lse_out
