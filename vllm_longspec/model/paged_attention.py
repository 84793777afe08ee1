"""The draft's cross-attention read of the target's paged KV cache, in place.

vLLM stores each layer's cache as one tensor whose logical shape is
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``; how K and V share a page
depends on the backend:

- ``CPU_ATTN``: each (block, head) page is ``[2 * block_size, head_size]``: the
  first half holds the keys, the second half the values, each packed in an
  ISA-specific order (``vec``: keys transposed; ``amx``: both tiled) that only
  vLLM's CPU kernels read. Nothing here interprets those bytes.
- GPU backends (FlashAttention layout): per token, K and V side by side in the
  last dimension; plain token rows.

``split_kv_cache`` returns strided K and V views of either layout (no copy), and
``paged_decode_attention`` attends one query per request (or several, e.g. the
nodes of a draft tree level) over the first ``seq_lens[i]`` cached tokens. On CPU it calls vLLM's own CPU attention kernel on
those views with the target's block table, so the target cache is read where it
lies, in the format that kernel wrote. Elsewhere it falls back to the plain-torch
reference (a gather per request, plain token rows): correct, not fast, and NOT
yet run on a GPU.
"""

from __future__ import annotations

from typing import Literal

import torch

from vllm_longspec.reference.paged_attention import (
    paged_decode_attention as reference_paged_decode_attention,
)

KVLayout = Literal["cpu", "split_content"]


def split_kv_cache(
    kv_cache: torch.Tensor, layout: KVLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(key_cache, value_cache)``, each [num_blocks, kv_heads, block, head]."""
    num_blocks, num_kv_heads, block_size, two_head = kv_cache.shape
    head_size = two_head // 2
    if layout == "cpu":
        pages = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size)
        return pages[:, :, :block_size], pages[:, :, block_size:]
    if layout == "split_content":
        return kv_cache[..., :head_size], kv_cache[..., head_size:]
    raise ValueError(f"unknown KV cache layout {layout!r}")


def paged_decode_attention(
    query: torch.Tensor,  # [num_queries, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    scale: float,
    cpu_isa: str | None = None,
    query_start_loc: torch.Tensor | None = None,  # [num_reqs + 1] int32
) -> torch.Tensor:
    """Output [num_queries, num_heads, head_size]; no mask.

    Request r's queries are rows ``query_start_loc[r]:query_start_loc[r + 1]``
    (``None``: one query per request); each attends the request's first
    ``seq_lens[r]`` cached tokens. ``cpu_isa`` (the ISA string vLLM's CPU
    backend chose for the target layer) selects vLLM's CPU kernel; ``None`` uses
    the reference implementation.
    """
    num_reqs = seq_lens.shape[0]
    if query_start_loc is None:
        query_start_loc = torch.arange(num_reqs + 1, dtype=torch.int32,
                                       device=query.device)
    if cpu_isa is None:
        rows = torch.repeat_interleave(
            torch.arange(num_reqs, device=query.device),
            query_start_loc.diff().long(), output_size=query.shape[0])
        return reference_paged_decode_attention(
            query, key_cache, value_cache, block_table[rows], seq_lens[rows], scale
        )[0]
    return _cpu_paged_decode_attention(
        query, key_cache, value_cache, block_table, seq_lens, scale, cpu_isa,
        query_start_loc.to(torch.int32)
    )


def _cpu_paged_decode_attention(
    query, key_cache, value_cache, block_table, seq_lens, scale, isa, query_start_loc
) -> torch.Tensor:
    from vllm import _custom_ops as ops

    num_reqs = seq_lens.shape[0]
    num_heads, head_size = query.shape[1:]
    num_kv_heads = key_cache.shape[1]
    seq_lens = seq_lens.to(torch.int32)
    scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=num_reqs,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_size,
        seq_lens=seq_lens,
        dtype=query.dtype,
        query_start_loc=query_start_loc,
        causal=False,
        sliding_window_size=-1,
        isa=isa,
        enable_kv_split=True,
    )
    output = torch.empty_like(query)
    ops.cpu_attention_with_kv_cache(
        query=query.contiguous(),
        key_cache=key_cache,
        value_cache=value_cache,
        output=output,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        scale=scale,
        causal=False,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=block_table,
        softcap=0.0,
        scheduler_metadata=scheduler_metadata,
        s_aux=None,
    )
    return output
