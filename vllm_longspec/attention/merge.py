"""Exact merge of two partial attentions over disjoint keys, by their LSE.

    w = sigmoid(lse_a - lse_b);  out = w out_a + (1 - w) out_b
    lse = logaddexp(lse_a, lse_b);  a side with lse = -inf contributes nothing
    (both -inf: output 0, lse -inf)

Versions, one signature: ``reference`` (float64), ``cpu`` (torch, float32
math), Triton (``vllm_longspec.kernels.merge_attention_states``) and the
dispatcher ``merge_attention_states`` (CPU tensors: ``cpu``; else Triton).
"""

from __future__ import annotations

import torch

from vllm_longspec.attention.paged_prefix import on_cpu, reference_outputs
from vllm_longspec.kernels.checks import check_merge_inputs


def merge_attention_states(
    out_a: torch.Tensor,  # [num_tokens, num_heads, head_size]
    lse_a: torch.Tensor,  # [num_tokens, num_heads] float32
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if on_cpu(out_a):
        return cpu(out_a, lse_a, out_b, lse_b, out, lse_out)
    from vllm_longspec.kernels import merge_attention_states as triton

    return triton.merge_attention_states(out_a, lse_a, out_b, lse_b, out, lse_out)


def cpu(out_a, lse_a, out_b, lse_b, out=None, lse_out=None
        ) -> tuple[torch.Tensor, torch.Tensor]:
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


def reference(out_a, lse_a, out_b, lse_b, out=None, lse_out=None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth in float64."""
    out, lse_out = reference_outputs(out_a, out, lse_out)
    a, b = lse_a.double(), lse_b.double()
    lse = torch.logaddexp(a, b)
    empty = torch.isneginf(lse)
    weight_a = torch.where(empty, 0.0, torch.exp(a - lse)).unsqueeze(-1)
    weight_b = torch.where(empty, 0.0, torch.exp(b - lse)).unsqueeze(-1)
    out.copy_(weight_a * out_a.double() + weight_b * out_b.double())
    lse_out.copy_(lse)
    return out, lse_out
