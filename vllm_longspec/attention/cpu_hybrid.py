"""CPU fast paths of hybrid tree attention, reading vLLM's CPU cache in place.

Same signatures as ``vllm_longspec.reference.hybrid_attention`` (plus
``cpu_isa``). With the small C++ extension (``csrc/hybrid_attention.cpp``) the
paged prefix and the masked new tokens are one kernel call: the new tokens are
one more block of the same online softmax, so no separate merge is needed.
Without a compiler: a per-request gather of only the needed prefix blocks,
vectorised torch for the masked part over the whole batch, and an LSE merge.
"""

from __future__ import annotations

import torch

from vllm_longspec.attention.cpu_cache import (
    DECODED_ISAS,
    STRIDED_ISAS,
    gather_kv_blocks,
    logical_kv_views,
)
from vllm_longspec.attention.cpu_extension import load_cpu_extension
from vllm_longspec.kernels.checks import (
    check_masked_inputs,
    check_merge_inputs,
    check_paged_inputs,
)

EXTENSION_HEAD_SIZES = (64, 128)
# Prefix blocks per work item of the C++ kernel; 0 = its own choice (split long
# prefixes only when several threads would otherwise idle). Tests force splits.
SPLIT_BLOCKS = 0
# bfloat16 through vdpbf16ps where the kernel was compiled for a CPU with
# AVX512_BF16 (``has_bf16_pairs()``); False widens to float32 (tests cover both).
BF16_PAIRS = True
_NO_TENSOR = torch.empty(0)
_NO_BITS = torch.empty(0, 0, dtype=torch.int32)


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
    cpu_isa: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query tokens of request r attend cache positions [0, prefix_lens[r]).

    ``cpu_isa=None``: ``key_cache``/``value_cache`` are logical views indexed
    (block, head, token, dim). Otherwise they are the packed halves exactly as
    vLLM's CPU backend passes them (``cpu_cache.split_kv_pages``) and ``cpu_isa``
    is the ISA that wrote them. ``out`` may be float32 or the query dtype.
    """
    check_paged_inputs(query, key_cache, value_cache, block_table, prefix_lens,
                       query_start_loc, out, lse_out)
    num_tokens, num_heads, head_size = query.shape
    if lse_out is None:
        lse_out = torch.empty(num_tokens, num_heads, dtype=torch.float32)
    if out is None:
        out = torch.empty_like(query)
    keys, values = _kv_views(key_cache, value_cache, cpu_isa)
    if _extension_takes(query, keys, values, cpu_isa):
        _extension_call(query, _NO_TENSOR, _NO_TENSOR, keys, values, block_table,
                        prefix_lens, query_start_loc, None, scale, cpu_isa, out, lse_out)
        return out, lse_out
    result = out if out.dtype == torch.float32 else torch.empty(
        num_tokens, num_heads, head_size, dtype=torch.float32)
    _torch_prefix_attention(query, keys, values, block_table, prefix_lens,
                            query_start_loc, scale, cpu_isa, result, lse_out)
    if out is not result:
        out.copy_(result)
    return out, lse_out


def _kv_views(key_cache, value_cache, cpu_isa):
    """Logical (block, head, token, dim) views where the packing has them."""
    if cpu_isa is not None and cpu_isa not in DECODED_ISAS:
        raise ValueError(f"CPU cache packing {cpu_isa!r} is not decoded "
                         f"(known: {DECODED_ISAS})")
    if cpu_isa in STRIDED_ISAS:
        return logical_kv_views(key_cache, value_cache, cpu_isa)
    return key_cache, value_cache


def _extension_takes(query, keys, values, cpu_isa) -> bool:
    return (load_cpu_extension() is not None and query.shape[2] in EXTENSION_HEAD_SIZES
            and (cpu_isa == "amx" or (keys.stride(2) == 1 and values.stride(3) == 1)))


def _extension_call(query, key, value, keys, values, block_table, prefix_lens,
                    query_start_loc, ancestor_bits, scale, cpu_isa, out, lse_out) -> None:
    """The C++ kernel writes float32 or the query dtype; other outputs via a copy."""
    result = out if out.dtype in (torch.float32, query.dtype) else torch.empty_like(query)
    load_cpu_extension().hybrid_attention(
        query, key, value, keys, values, block_table, prefix_lens.contiguous(),
        query_start_loc.contiguous(), _NO_BITS if ancestor_bits is None else ancestor_bits,
        float(scale), SPLIT_BLOCKS, cpu_isa == "amx", BF16_PAIRS, result, lse_out)
    if result is not out:
        out.copy_(result)


def _torch_prefix_attention(query, keys, values, block_table, prefix_lens,
                            query_start_loc, scale, cpu_isa, out, lse_out) -> None:
    """Fallback: per request, gather only its blocks, then float32 attention."""
    num_kv_heads, block_size, head_size = keys.shape[1:]
    group = query.shape[1] // num_kv_heads
    starts = query_start_loc.tolist()
    for r, (start, end) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        length = int(prefix_lens[r])
        if end == start:
            continue
        if length == 0:
            out[start:end] = 0
            lse_out[start:end] = float("-inf")
            continue
        blocks = block_table[r, : -(-length // block_size)]
        if cpu_isa == "amx":
            k, v = gather_kv_blocks(keys, values, blocks, cpu_isa)
        else:
            k, v = keys[blocks.long()], values[blocks.long()]
        # [num_kv_heads, length, head_size]
        k = k.transpose(0, 1).reshape(num_kv_heads, -1, head_size)[:, :length].float()
        v = v.transpose(0, 1).reshape(num_kv_heads, -1, head_size)[:, :length].float()
        # rows (token, group member) per kv head: [num_kv_heads, tokens * group, head]
        q = query[start:end].float().view(end - start, num_kv_heads, group, head_size)
        q = q.permute(1, 0, 2, 3).reshape(num_kv_heads, -1, head_size)
        scores = torch.bmm(q, k.transpose(1, 2)) * scale
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        result = torch.bmm(torch.exp(scores - lse), v)
        out[start:end] = result.view(num_kv_heads, end - start, group, head_size).permute(
            1, 0, 2, 3).reshape(end - start, -1, head_size)
        lse_out[start:end] = lse.view(num_kv_heads, end - start, group).permute(
            1, 0, 2).reshape(end - start, -1)


def masked_spec_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    ancestor_bits: torch.Tensor | None,  # [num_tokens, 4] int32; None = chain
    scale: float,
    out: torch.Tensor | None = None,  # float32 or the query dtype
    lse_out: torch.Tensor | None = None,  # [num_tokens, num_heads] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """All requests at once, padded to the longest: float32 scores, one softmax."""
    check_masked_inputs(query, key, value, query_start_loc, ancestor_bits, out, lse_out)
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    lens = query_start_loc[1:] - query_start_loc[:-1]
    num_reqs = lens.numel()
    if out is None:
        out = torch.empty_like(query)
    if lse_out is None:
        lse_out = torch.empty(num_tokens, num_heads, dtype=torch.float32)
    if num_tokens == 0 or num_reqs == 0:
        return out, lse_out
    longest = int(lens.max())
    positions = torch.arange(longest)
    # [num_reqs, longest]: token index of (request, position), padding clamped
    token_index = (query_start_loc[:-1, None].long() + positions).clamp(max=num_tokens - 1)
    real = positions < lens[:, None]
    if ancestor_bits is None:
        visible = torch.ones(longest, longest, dtype=torch.bool).tril().expand(
            num_reqs, -1, -1)
    else:
        words = ancestor_bits[token_index][..., positions // 32].long()
        visible = ((words >> (positions % 32)) & 1).bool()  # [reqs, q, k]
    # Padding keys are invisible; padding queries see key 0 only (then dropped).
    visible = (visible & real[:, None, :]) | (~real[:, :, None] & (positions == 0))
    q = query[token_index].float().view(num_reqs, longest, num_kv_heads, group, head_size)
    k = key[token_index].float()
    v = value[token_index].float()
    scores = torch.einsum("rqhgd,rkhd->rhgqk", q, k) * scale
    scores.masked_fill_(~visible[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse)
    result = torch.einsum("rhgqk,rkhd->rqhgd", probs, v).reshape(
        num_reqs, longest, num_heads, head_size)
    lse = lse.squeeze(-1).permute(0, 3, 1, 2).reshape(num_reqs, longest, num_heads)
    out[token_index[real]] = result[real].to(out.dtype)
    lse_out[token_index[real]] = lse[real]
    return out, lse_out


def merge_attention_states(
    out_a: torch.Tensor,  # [num_tokens, num_heads, head_size]
    lse_a: torch.Tensor,  # [num_tokens, num_heads] float32
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """w = sigmoid(lse_a - lse_b); out = w out_a + (1 - w) out_b (float32 math)."""
    check_merge_inputs(out_a, lse_a, out_b, lse_b, out, lse_out)
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.sigmoid(lse_a - lse_b)
    # Both sides empty: sigmoid(nan); the output is 0 there.
    weight_a = torch.where(torch.isneginf(lse), 0.0, weight_a).unsqueeze(-1)
    a, b = out_a.float(), out_b.float()
    merged = torch.where(torch.isneginf(lse).unsqueeze(-1), 0.0, b + weight_a * (a - b))
    if out is None:
        out = merged.to(out_a.dtype)
    else:
        out.copy_(merged)
    if lse_out is None:
        lse_out = lse
    else:
        lse_out.copy_(lse)
    return out, lse_out


def hybrid_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size] (the new tokens)
    value: torch.Tensor,
    key_cache: torch.Tensor,  # packed halves (cpu_isa) or logical views
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    prefix_lens: torch.Tensor,  # [num_reqs] int32: committed tokens in the cache
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    ancestor_bits: torch.Tensor | None,
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_size]
    cpu_isa: str | None = None,
) -> torch.Tensor:
    """Prefix (paged) + speculative part (masked): one softmax over both.

    With the C++ extension one kernel call (the new tokens are one more block of
    the prefix's online softmax), else the prefix with its LSE, the masked part
    with its LSE (vectorised torch) and an exact LSE merge.
    """
    check_masked_inputs(query, key, value, query_start_loc, ancestor_bits, out, None)
    keys, values = _kv_views(key_cache, value_cache, cpu_isa)
    if _extension_takes(query, keys, values, cpu_isa):
        check_paged_inputs(query, keys, values, block_table, prefix_lens, query_start_loc,
                           out, None)
        _extension_call(query, key, value, keys, values, block_table, prefix_lens,
                        query_start_loc, ancestor_bits, scale, cpu_isa, out, _NO_TENSOR)
        return out
    prefix_out, prefix_lse = paged_prefix_attention(
        query, key_cache, value_cache, block_table, prefix_lens, query_start_loc,
        scale, out=torch.empty(query.shape, dtype=torch.float32), cpu_isa=cpu_isa)
    spec_out, spec_lse = masked_spec_attention(
        query, key, value, query_start_loc, ancestor_bits, scale,
        out=torch.empty(query.shape, dtype=torch.float32))
    merge_attention_states(prefix_out, prefix_lse, spec_out, spec_lse, out=out)
    return out
