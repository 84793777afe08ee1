"""Masked speculative attention: each request's new tokens among themselves.

Token i of a request attends the request's new tokens j that its ancestor mask
allows (itself and its ancestors; ``ancestor_bits``, bit ``j % 32`` of word
``j // 32`` in token i's row, ``tree.mask``; ``None``: a causal chain), and
returns the LSE for the merge with the paged prefix. Versions, one signature
(conventions in ``paged_prefix``):

- ``reference``: plain torch, float64, a loop over requests;
- ``cpu``: vectorised torch, all requests padded to the longest, one softmax
  (the C++ kernel does this part only fused with the prefix, ``hybrid``);
- Triton: ``vllm_longspec.kernels.masked_spec_attention``;
- ``masked_spec_attention``: the dispatcher (CPU tensors: ``cpu``; else Triton).
"""

from __future__ import annotations

import torch

from vllm_longspec.attention.paged_prefix import (
    on_cpu,
    reference_outputs,
    reference_softmax_into,
)
from vllm_longspec.kernels.checks import check_masked_inputs
from vllm_longspec.tree.mask import unpack_ancestor_bits


def masked_spec_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    ancestor_bits: torch.Tensor | None,  # [num_tokens, 4] int32; None = chain
    scale: float,
    out: torch.Tensor | None = None,  # float32 or the query dtype
    lse_out: torch.Tensor | None = None,  # [num_tokens, num_heads] float32
    max_tokens_per_req: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_tokens_per_req`` spares the Triton launcher a device sync."""
    if on_cpu(query):
        return cpu(query, key, value, query_start_loc, ancestor_bits, scale, out, lse_out)
    from vllm_longspec.kernels import masked_spec_attention as triton

    return triton.masked_spec_attention(query, key, value, query_start_loc,
                                        ancestor_bits, scale, out, lse_out,
                                        max_tokens_per_req=max_tokens_per_req)


def cpu(query, key, value, query_start_loc, ancestor_bits, scale, out=None,
        lse_out=None) -> tuple[torch.Tensor, torch.Tensor]:
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


def reference(query, key, value, query_start_loc, ancestor_bits, scale, out=None,
              lse_out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth: float64, a loop over requests, never writes its inputs."""
    out, lse_out = reference_outputs(query, out, lse_out)
    group = query.shape[1] // key.shape[1]
    starts = query_start_loc.tolist()
    for start, end in zip(starts[:-1], starts[1:], strict=True):
        n = end - start
        if n == 0:
            continue
        if ancestor_bits is None:
            visible = torch.ones(n, n, dtype=torch.bool).tril()
        else:
            visible = unpack_ancestor_bits(ancestor_bits[start:end].cpu(), n)
        keys = key[start:end].double().repeat_interleave(group, dim=1)
        values = value[start:end].double().repeat_interleave(group, dim=1)
        # [heads, queries, keys]
        scores = torch.einsum("qhd,khd->hqk", query[start:end].double(), keys) * scale
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        reference_softmax_into(scores, values, out[start:end], lse_out[start:end])
    return out, lse_out
