"""Reference attention of a few queries per request over a paged KV cache.

Used by the tests as ground truth and, off-CPU, as the draft's cross-attention
until the Triton kernels land. Loops over requests, softmax in float32, never
writes to its inputs.
"""

from __future__ import annotations

import torch


def paged_decode_attention(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req] int
    seq_lens: torch.Tensor,  # [num_reqs] int, keys 0..seq_len-1 are visible
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (output [num_reqs, num_heads, head_dim], lse [num_reqs, num_heads]).

    Query i attends the first ``seq_lens[i]`` keys of request i, no mask.
    ``lse`` is the natural-log log-sum-exp of the scaled scores (-inf if empty).
    """
    num_reqs, num_heads, head_dim = query.shape
    _, num_kv_heads, block_size, _ = key_cache.shape
    group = num_heads // num_kv_heads
    out = torch.zeros(num_reqs, num_heads, head_dim, dtype=query.dtype,
                      device=query.device)
    lse = torch.full((num_reqs, num_heads), float("-inf"), dtype=torch.float32,
                     device=query.device)
    for i in range(num_reqs):
        length = int(seq_lens[i])
        if length == 0:
            continue
        num_blocks = -(-length // block_size)
        blocks = block_table[i, :num_blocks].long()
        # [num_kv_heads, length, head_dim]
        keys = key_cache[blocks].permute(1, 0, 2, 3).reshape(
            num_kv_heads, -1, head_dim)[:, :length].float()
        values = value_cache[blocks].permute(1, 0, 2, 3).reshape(
            num_kv_heads, -1, head_dim)[:, :length].float()
        keys = keys.repeat_interleave(group, dim=0)
        values = values.repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,hkd->hk", query[i].float(), keys) * scale
        lse[i] = torch.logsumexp(scores, dim=-1)
        probs = torch.softmax(scores, dim=-1)
        out[i] = torch.einsum("hk,hkd->hd", probs, values).to(query.dtype)
    return out, lse
