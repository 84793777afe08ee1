"""Attention among each request's new (speculative) tokens under an ancestor mask.

One program per (request, query head) holds all of the request's tokens (at
most 128): S = Q K^T * scale, masked where the token is not an ancestor (or
itself), softmax, O = P V. Returns O and the log-sum-exp (natural log of the
scaled scores), ready to merge with the paged prefix part.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_longspec.kernels import tuning
from vllm_longspec.kernels.checks import MAX_SPEC_TOKENS, check_masked_inputs
from vllm_longspec.kernels.launch import check_device, next_power_of_2

LOG2E = 1.4426950408889634


@triton.jit
def _masked_spec_kernel(
    q_ptr, k_ptr, v_ptr, qsl_ptr, bits_ptr, out_ptr, lse_ptr,
    scale_log2,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head,
    stride_v_tok, stride_v_head, stride_o_tok, stride_o_head, stride_lse_tok,
    GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr, BITS_WORDS: tl.constexpr, CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    start = tl.load(qsl_ptr + req)
    n = tl.load(qsl_ptr + req + 1) - start
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    tok_ok = offs_t < n
    dim_ok = offs_d < HEAD_SIZE
    tile_ok = tok_ok[:, None] & dim_ok[None, :]
    tokens = start + offs_t
    # [BLOCK_T, BLOCK_D]
    q = tl.load(q_ptr + tokens[:, None] * stride_q_tok + head * stride_q_head
                + offs_d[None, :], mask=tile_ok, other=0.0)
    k = tl.load(k_ptr + tokens[:, None] * stride_k_tok + kv_head * stride_k_head
                + offs_d[None, :], mask=tile_ok, other=0.0)
    v = tl.load(v_ptr + tokens[:, None] * stride_v_tok + kv_head * stride_v_head
                + offs_d[None, :], mask=tile_ok, other=0.0)
    # [BLOCK_T queries, BLOCK_T keys], log2 domain
    if IEEE:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = scores * scale_log2
    if CAUSAL:
        visible = offs_t[None, :] <= offs_t[:, None]
    else:
        words = tl.load(bits_ptr + tokens[:, None] * BITS_WORDS + offs_t[None, :] // 32,
                        mask=tok_ok[:, None] & tok_ok[None, :], other=0)
        visible = ((words >> (offs_t[None, :] % 32)) & 1) != 0
    visible = visible & tok_ok[None, :] & tok_ok[:, None]
    scores = tl.where(visible, scores, float("-inf"))
    row_max = tl.max(scores, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    probs = tl.exp2(scores - row_max[:, None])
    row_sum = tl.sum(probs, axis=1)
    if IEEE:
        acc = tl.dot(probs.to(v.dtype), v, input_precision="ieee")
    else:
        acc = tl.dot(probs.to(v.dtype), v)
    seen = row_sum > 0.0
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_o_tok + head * stride_o_head
             + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=tile_ok)
    lse = tl.where(seen, (row_max + tl.log2(tl.where(seen, row_sum, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(lse_ptr + tokens * stride_lse_tok + head, lse, mask=tok_ok)


def masked_spec_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    ancestor_bits: torch.Tensor | None,  # [num_tokens, 4] int32; None = causal chain
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_size]
    lse_out: torch.Tensor | None = None,  # [num_tokens, num_heads] float32
    max_tokens_per_req: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_tokens_per_req`` (<= 128) avoids a device sync to find it."""
    check_masked_inputs(query, key, value, query_start_loc, ancestor_bits, out, lse_out)
    check_device(_masked_spec_kernel, query, key, value)
    num_tokens, num_heads, head_size = query.shape
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
    if max_tokens_per_req > MAX_SPEC_TOKENS:
        raise ValueError(f"a request has {max_tokens_per_req} new tokens; the masked "
                         f"kernel takes at most {MAX_SPEC_TOKENS}")
    causal = ancestor_bits is None
    _masked_spec_kernel[(num_reqs, num_heads)](
        query, key, value, query_start_loc, query_start_loc if causal else ancestor_bits,
        out, lse_out, float(scale) * LOG2E,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), out.stride(0), out.stride(1), lse_out.stride(0),
        GROUP=num_heads // key.shape[1], HEAD_SIZE=head_size,
        BLOCK_D=max(16, next_power_of_2(head_size)),
        BLOCK_T=max(16, next_power_of_2(max_tokens_per_req)),
        BITS_WORDS=MAX_SPEC_TOKENS // 32, CAUSAL=causal,
        IEEE=query.dtype == torch.float32, **tuning.masked_launch(),
    )
    return out, lse_out
