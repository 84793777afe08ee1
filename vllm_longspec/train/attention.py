"""The draft's two attentions for whole training sequences (scale 1/sqrt(head_dim)).

Self-attention: causal with a sliding window: the query at token t sees tokens
t-W..t (itself and the W previous ones), as vLLM's window of W+1 does at
serving time. The window counts tokens in the sequence, so with AOI a query
right after the anchors still sees them if they are within W tokens.

Cross-attention ("flash noisy training", LongSpec section 2): the query at t
sees the target's last-layer K/V at positions <= t-j only:

    out[:, :, j:] = causal_attention(q[:, :, j:], K[:, :, :T-j], V[:, :, :T-j])
    out[:, :, :j] = 0                                   # no visible key

At serving time the k-th draft token sees target K/V up to k positions back,
so training with j in 1..4 covers the first four draft tokens.

Both use torch SDPA with GQA (``enable_gqa``): H query heads share H_kv K/V heads
in groups of H/H_kv, the target's grouping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Queries per block of the windowed self-attention: memory is
# O(T * (QUERY_BLOCK + W)) instead of O(T^2).
QUERY_BLOCK = 256


def sliding_window_attention(
    q: torch.Tensor,  # [batch, num_heads, seq_len, head_dim]
    k: torch.Tensor,  # [batch, num_kv_heads, seq_len, head_dim]
    v: torch.Tensor,  # [batch, num_kv_heads, seq_len, head_dim]
    window: int,
) -> torch.Tensor:
    """[batch, num_heads, seq_len, head_dim]; query t attends keys t-window..t."""
    seq_len = q.shape[2]
    outputs = []
    for start in range(0, seq_len, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, seq_len)
        key_start = max(0, start - window)
        # [end - start, 1] and [1, end - key_start]: absolute token indices
        query_index = torch.arange(start, end, device=q.device)[:, None]
        key_index = torch.arange(key_start, end, device=q.device)[None, :]
        distance = query_index - key_index
        visible = (distance >= 0) & (distance <= window)
        outputs.append(
            F.scaled_dot_product_attention(
                q[:, :, start:end],
                k[:, :, key_start:end],
                v[:, :, key_start:end],
                attn_mask=visible,
                enable_gqa=True,
            )
        )
    return torch.cat(outputs, dim=2)


def shifted_cross_attention(
    q: torch.Tensor,  # [batch, num_heads, seq_len, head_dim]
    target_keys: torch.Tensor,  # [batch, num_kv_heads, seq_len, head_dim], rotated
    target_values: torch.Tensor,  # [batch, num_kv_heads, seq_len, head_dim]
    noise_shift: int,
) -> torch.Tensor:
    """[batch, num_heads, seq_len, head_dim]; query t attends target positions <= t-j."""
    if noise_shift < 1:
        raise ValueError(f"noise_shift must be >= 1, got {noise_shift}.")
    batch, num_heads, seq_len, head_dim = q.shape
    visible_len = seq_len - noise_shift
    if visible_len <= 0:
        return q.new_zeros(batch, num_heads, seq_len, head_dim)
    keys = target_keys[:, :, :visible_len].to(q.dtype)
    values = target_values[:, :, :visible_len].to(q.dtype)
    # [batch, num_heads, visible_len, head_dim]; row i is the query at t = i + j
    attended = F.scaled_dot_product_attention(
        q[:, :, noise_shift:], keys, values, is_causal=True, enable_gqa=True
    )
    no_key_rows = attended.new_zeros(batch, num_heads, noise_shift, head_dim)
    return torch.cat((no_key_rows, attended), dim=2)
