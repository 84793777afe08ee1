"""Exact merge of two partial attentions by their log-sum-exp.

    w = sigmoid(lse_a - lse_b);  out = w * out_a + (1 - w) * out_b
    lse = logaddexp(lse_a, lse_b);  a side with lse = -inf contributes nothing
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_longspec.kernels import tuning
from vllm_longspec.kernels.checks import check_merge_inputs
from vllm_longspec.kernels.launch import check_device, next_power_of_2


@triton.jit
def _merge_kernel(
    out_a_ptr, lse_a_ptr, out_b_ptr, lse_b_ptr, out_ptr, lse_out_ptr,
    stride_a_tok, stride_a_head, stride_b_tok, stride_b_head,
    stride_o_tok, stride_o_head, stride_la, stride_lb, stride_lo,
    HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    dim_ok = offs_d < HEAD_SIZE
    lse_a = tl.load(lse_a_ptr + token * stride_la + head)
    lse_b = tl.load(lse_b_ptr + token * stride_lb + head)
    lse_max = tl.maximum(lse_a, lse_b)
    empty = lse_max == float("-inf")
    safe_max = tl.where(empty, 0.0, lse_max)
    weight_a = tl.exp(lse_a - safe_max)  # exp(-inf) = 0 for an empty side
    weight_b = tl.exp(lse_b - safe_max)
    total = weight_a + weight_b
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, total))
    out_a = tl.load(out_a_ptr + token * stride_a_tok + head * stride_a_head + offs_d,
                    mask=dim_ok, other=0.0).to(tl.float32)
    out_b = tl.load(out_b_ptr + token * stride_b_tok + head * stride_b_head + offs_d,
                    mask=dim_ok, other=0.0).to(tl.float32)
    merged = (weight_a * inv) * out_a + (weight_b * inv) * out_b
    merged = tl.where(empty, 0.0, merged)
    tl.store(out_ptr + token * stride_o_tok + head * stride_o_head + offs_d,
             merged.to(out_ptr.dtype.element_ty), mask=dim_ok)
    lse = tl.where(empty, float("-inf"), safe_max + tl.log(tl.where(empty, 1.0, total)))
    tl.store(lse_out_ptr + token * stride_lo + head, lse)


def merge_attention_states(
    out_a: torch.Tensor,  # [num_tokens, num_heads, head_size]
    lse_a: torch.Tensor,  # [num_tokens, num_heads] float32
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_merge_inputs(out_a, lse_a, out_b, lse_b, out, lse_out)
    check_device(_merge_kernel, out_a, out_b)
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.stride(1) != 1:
            raise ValueError(f"{name} must have a contiguous head dim")
    num_tokens, num_heads, head_size = out_a.shape
    if out is None:
        out = torch.empty_like(out_a)
    if lse_out is None:
        lse_out = torch.empty_like(lse_a)
    if lse_out.stride(1) != 1:
        raise ValueError("lse_out must have a contiguous head dim")
    if num_tokens == 0:
        return out, lse_out
    _merge_kernel[(num_tokens, num_heads)](
        out_a, lse_a, out_b, lse_b, out, lse_out,
        out_a.stride(0), out_a.stride(1), out_b.stride(0), out_b.stride(1),
        out.stride(0), out.stride(1), lse_a.stride(0), lse_b.stride(0), lse_out.stride(0),
        HEAD_SIZE=head_size, BLOCK_D=next_power_of_2(head_size), **tuning.merge_launch(),
    )
    return out, lse_out
