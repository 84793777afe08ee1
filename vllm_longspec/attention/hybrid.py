"""Hybrid tree attention: the committed prefix (paged, LSE) + the speculative
tokens (masked, LSE), merged exactly: one softmax over both.

``hybrid_attention`` is the dispatcher of the composed operation. On CPU with
the C++ kernel it is one call (``cpu_extension``: the new tokens are one more
block of the prefix's online softmax, no merge needed); otherwise the three
operations' own dispatchers (``paged_prefix``, ``masked_spec``, ``merge``: the
torch CPU paths, or the Triton kernels off CPU). The GPU backend composes them
itself around FlashAttention's prefix (``flash_backend.verify_tree_rows``).
"""

from __future__ import annotations

import torch

from vllm_longspec.attention import cpu_extension
from vllm_longspec.attention.masked_spec import masked_spec_attention
from vllm_longspec.attention.merge import merge_attention_states
from vllm_longspec.attention.paged_prefix import (
    logical_or_packed,
    on_cpu,
    paged_prefix_attention,
)
from vllm_longspec.kernels.checks import check_masked_inputs, check_paged_inputs


def hybrid_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size] (the new tokens)
    value: torch.Tensor,
    key_cache: torch.Tensor,  # packed halves (cpu_isa) or logical views
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    prefix_lens: torch.Tensor,  # [num_reqs] int32: committed tokens in the cache
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    ancestor_bits: torch.Tensor | None,  # [num_tokens, 4] int32; None = chain
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_size]
    cpu_isa: str | None = None,
) -> torch.Tensor:
    check_masked_inputs(query, key, value, query_start_loc, ancestor_bits, out, None)
    keys, values = logical_or_packed(key_cache, value_cache, cpu_isa)
    if on_cpu(query) and cpu_extension.takes(query, keys, values, cpu_isa):
        check_paged_inputs(query, keys, values, block_table, prefix_lens, query_start_loc,
                           out, None)
        cpu_extension.run(query, key, value, keys, values, block_table, prefix_lens,
                          query_start_loc, ancestor_bits, scale, cpu_isa, out, None)
        return out
    partial = dict(dtype=torch.float32, device=query.device)
    prefix_out, prefix_lse = paged_prefix_attention(
        query, key_cache, value_cache, block_table, prefix_lens, query_start_loc,
        scale, out=torch.empty(query.shape, **partial), cpu_isa=cpu_isa)
    spec_out, spec_lse = masked_spec_attention(
        query, key, value, query_start_loc, ancestor_bits, scale,
        out=torch.empty(query.shape, **partial))
    merge_attention_states(prefix_out, prefix_lse, spec_out, spec_lse, out=out)
    return out
