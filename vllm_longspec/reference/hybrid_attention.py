"""Reference hybrid tree attention: masked speculative part, paged prefix, merge.

Ground truth for the Triton kernels (``vllm_longspec.kernels``) and the CPU fast
paths (``vllm_longspec.attention.cpu_hybrid``), which share these signatures.
Loops over requests, scores and softmax in float64, never writes to its inputs
(except the optional ``out``/``lse_out`` buffers, filled like the fast paths).

Conventions shared by all three operations:

- ``query_start_loc`` [num_reqs + 1] int32: request r owns query tokens
  ``query_start_loc[r]:query_start_loc[r + 1]``.
- GQA: query head ``hq`` reads kv head ``hq // (num_heads // num_kv_heads)``.
- ``lse`` [num_tokens, num_heads] float32: natural-log log-sum-exp of the scaled
  scores; ``-inf`` where a query saw no key (its output is then 0).
- ``ancestor_bits`` [num_tokens, words] int32, or None for a causal chain: bit
  ``j % 32`` of word ``j // 32`` in the row of a request's token i says whether
  token i sees the request's token j (its ancestors and itself).
"""

from __future__ import annotations

import torch

from vllm_longspec.tree.mask import unpack_ancestor_bits


def masked_spec_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    ancestor_bits: torch.Tensor | None,  # [num_tokens, words] int32; None = chain
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_size]
    lse_out: torch.Tensor | None = None,  # [num_tokens, num_heads] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each request's new tokens attend each other under the ancestor mask."""
    out, lse_out = _outputs(query, out, lse_out)
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
        _softmax_into(scores, values, out[start:end], lse_out[start:end])
    return out, lse_out


def paged_prefix_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    prefix_lens: torch.Tensor,  # [num_reqs] int32
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    scale: float,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query token of request r attends cache positions [0, prefix_lens[r]).

    ``key_cache``/``value_cache`` are indexed (block, kv head, token, dim), any
    strides (e.g. ``cpu_cache.logical_kv_views`` of vLLM's CPU cache).
    """
    out, lse_out = _outputs(query, out, lse_out)
    num_kv_heads, block_size, head_size = key_cache.shape[1:]
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
        blocks = block_table[r, : -(-length // block_size)].long()
        # [length, num_heads, head_size]
        keys = key_cache[blocks].permute(0, 2, 1, 3).reshape(-1, num_kv_heads, head_size)
        values = value_cache[blocks].permute(0, 2, 1, 3).reshape(-1, num_kv_heads, head_size)
        keys = keys[:length].double().repeat_interleave(group, dim=1)
        values = values[:length].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[start:end].double(), keys) * scale
        _softmax_into(scores, values, out[start:end], lse_out[start:end])
    return out, lse_out


def merge_attention_states(
    out_a: torch.Tensor,  # [num_tokens, num_heads, head_size]
    lse_a: torch.Tensor,  # [num_tokens, num_heads] float32
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of two disjoint key sets.

    w = sigmoid(lse_a - lse_b); out = w out_a + (1 - w) out_b; lse = logaddexp.
    A side with lse = -inf contributes nothing (both -inf: output 0, lse -inf).
    """
    out, lse_out = _outputs(out_a, out, lse_out)
    a, b = lse_a.double(), lse_b.double()
    lse = torch.logaddexp(a, b)
    empty = torch.isneginf(lse)
    weight_a = torch.where(empty, 0.0, torch.exp(a - lse)).unsqueeze(-1)
    weight_b = torch.where(empty, 0.0, torch.exp(b - lse)).unsqueeze(-1)
    out.copy_(weight_a * out_a.double() + weight_b * out_b.double())
    lse_out.copy_(lse)
    return out, lse_out


def _softmax_into(scores, values, out, lse_out) -> None:
    """scores [heads, q, k] float64 (masked entries -inf) -> out, lse_out."""
    lse = torch.logsumexp(scores, dim=-1)  # [heads, q]
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    out.copy_(torch.einsum("hqk,khd->qhd", probs, values))
    lse_out.copy_(lse.transpose(0, 1))


def _outputs(like, out, lse_out):
    num_tokens, num_heads, _ = like.shape
    if out is None:
        out = torch.empty_like(like)
    if lse_out is None:
        lse_out = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=like.device)
    return out, lse_out
