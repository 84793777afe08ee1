"""Paged prefix attention with log-sum-exp: the committed prefix of each request.

Every query token of request r attends cache positions [0, prefix_lens[r]) of
its block table, no mask; the LSE lets a caller merge it with attention over
other keys (``merge``). Versions, all with this signature:

- ``reference``: plain torch, float64, a loop over requests (ground truth);
- ``cpu``: vLLM's packed CPU cache read in place, by the C++ kernel
  (``cpu_extension``) where it serves the shape, else a per-request gather of
  only the needed blocks;
- Triton: ``vllm_longspec.kernels.paged_prefix_attention`` (FlashDecoding
  splits, any strides, untested on a GPU);
- ``paged_prefix_attention``: the dispatcher (CPU tensors: ``cpu``; else Triton).

``paged_decode_attention`` is the draft's cross-attention: the same operation
without the LSE; on a CPU engine it runs vLLM's own CPU kernel on the target
cache as that kernel packed it, elsewhere the dispatcher above.

Conventions shared by the attention operations (``masked_spec``, ``merge``):
``query_start_loc`` [num_reqs + 1] int32 (request r owns query tokens
``query_start_loc[r]:query_start_loc[r + 1]``); GQA (query head ``h`` reads kv
head ``h // (num_heads // num_kv_heads)``); ``lse`` [num_tokens, num_heads]
float32, the natural-log log-sum-exp of the scaled scores, ``-inf`` where a
query saw no key (its output is then 0).
"""

from __future__ import annotations

import torch

from vllm_longspec.attention import cpu_extension
from vllm_longspec.attention.kv_cache import (
    DECODED_ISAS,
    STRIDED_ISAS,
    gather_kv_blocks,
    logical_kv_views,
)
from vllm_longspec.kernels.checks import check_paged_inputs


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
    max_tokens_per_req: int | None = None,
    max_prefix_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cpu_isa``: see ``cpu``; the ``max_*`` hints spare the Triton launcher
    device syncs."""
    if on_cpu(query):
        return cpu(query, key_cache, value_cache, block_table, prefix_lens,
                   query_start_loc, scale, out, lse_out, cpu_isa)
    from vllm_longspec.kernels import paged_prefix_attention as triton

    return triton.paged_prefix_attention(
        query, key_cache, value_cache, block_table, prefix_lens, query_start_loc, scale,
        out, lse_out, max_tokens_per_req=max_tokens_per_req,
        max_prefix_len=max_prefix_len)


def on_cpu(tensor: torch.Tensor) -> bool:
    """Whether the dispatchers take the CPU path for ``tensor`` (else Triton)."""
    return tensor.device.type == "cpu"


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
    """Output [num_queries, num_heads, head_size]: the draft's cross-attention.

    Request r's queries are rows ``query_start_loc[r]:query_start_loc[r + 1]``
    (``None``: one query per request); each attends the request's first
    ``seq_lens[r]`` cached tokens. With ``cpu_isa`` (the ISA vLLM's CPU backend
    packed the cache with) vLLM's CPU kernel; else ``paged_prefix_attention``.
    """
    num_reqs = seq_lens.shape[0]
    if query_start_loc is None:
        query_start_loc = torch.arange(num_reqs + 1, dtype=torch.int32,
                                       device=query.device)
    query_start_loc = query_start_loc.to(torch.int32)
    seq_lens = seq_lens.to(torch.int32)
    if cpu_isa is None:
        out, _ = paged_prefix_attention(query.contiguous(), key_cache, value_cache,
                                        block_table, seq_lens, query_start_loc, scale)
        return out
    from vllm import _custom_ops as ops

    num_heads, head_size = query.shape[1:]
    scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=num_reqs, num_heads=num_heads, num_kv_heads=key_cache.shape[1],
        head_dim=head_size, seq_lens=seq_lens, dtype=query.dtype,
        query_start_loc=query_start_loc, causal=False, sliding_window_size=-1,
        isa=cpu_isa, enable_kv_split=True)
    output = torch.empty_like(query)
    ops.cpu_attention_with_kv_cache(
        query=query.contiguous(), key_cache=key_cache, value_cache=value_cache,
        output=output, query_start_loc=query_start_loc, seq_lens=seq_lens, scale=scale,
        causal=False, alibi_slopes=None, sliding_window=-1, block_table=block_table,
        softcap=0.0, scheduler_metadata=scheduler_metadata, s_aux=None)
    return output


def cpu(query, key_cache, value_cache, block_table, prefix_lens, query_start_loc, scale,
        out=None, lse_out=None, cpu_isa: str | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``cpu_isa=None``: ``key_cache``/``value_cache`` are logical views indexed
    (block, head, token, dim). Otherwise they are the packed halves exactly as
    vLLM's CPU backend passes them (``kv_cache.split_kv_cache(..., "cpu")``) and
    ``cpu_isa`` is the ISA that wrote them. ``out`` may be float32 or the query
    dtype."""
    check_paged_inputs(query, key_cache, value_cache, block_table, prefix_lens,
                       query_start_loc, out, lse_out)
    num_tokens, num_heads, head_size = query.shape
    if lse_out is None:
        lse_out = torch.empty(num_tokens, num_heads, dtype=torch.float32)
    if out is None:
        out = torch.empty_like(query)
    keys, values = logical_or_packed(key_cache, value_cache, cpu_isa)
    if cpu_extension.takes(query, keys, values, cpu_isa):
        no_tokens = cpu_extension.no_tensor()
        cpu_extension.run(query, no_tokens, no_tokens, keys, values, block_table,
                          prefix_lens, query_start_loc, None, scale, cpu_isa, out, lse_out)
        return out, lse_out
    result = out if out.dtype == torch.float32 else torch.empty(
        num_tokens, num_heads, head_size, dtype=torch.float32)
    _gathered_prefix_attention(query, keys, values, block_table, prefix_lens,
                               query_start_loc, scale, cpu_isa, result, lse_out)
    if out is not result:
        out.copy_(result)
    return out, lse_out


def logical_or_packed(key_cache, value_cache, cpu_isa):
    """Logical (block, head, token, dim) views where the packing has them (or
    the caches as given: logical already, or ``amx`` tiles)."""
    if cpu_isa is not None and cpu_isa not in DECODED_ISAS:
        raise ValueError(f"CPU cache packing {cpu_isa!r} is not decoded "
                         f"(known: {DECODED_ISAS})")
    if cpu_isa in STRIDED_ISAS:
        return logical_kv_views(key_cache, value_cache, cpu_isa)
    return key_cache, value_cache


def _gathered_prefix_attention(query, keys, values, block_table, prefix_lens,
                               query_start_loc, scale, cpu_isa, out, lse_out) -> None:
    """Without the C++ kernel: per request, gather only its blocks, then float32."""
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


def reference(query, key_cache, value_cache, block_table, prefix_lens, query_start_loc,
              scale, out=None, lse_out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth: float64, a loop over requests, never writes its inputs.
    ``key_cache``/``value_cache`` indexed (block, kv head, token, dim), any strides."""
    out, lse_out = reference_outputs(query, out, lse_out)
    num_kv_heads, block_size, head_size = key_cache.shape[1:]
    group = query.shape[1] // num_kv_heads
    starts = query_start_loc.tolist()
    for r, (start, end) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        length = int(prefix_lens[r])  # 0: no key, lse -inf and output 0 below
        # every cached token of the request's blocks, in order: [tokens, kv_heads, head]
        blocks = block_table[r, : -(-length // block_size)].long()
        keys = key_cache[blocks].transpose(1, 2).reshape(-1, num_kv_heads, head_size)
        values = value_cache[blocks].transpose(1, 2).reshape(-1, num_kv_heads, head_size)
        # the first ``length``, one copy per query head: [length, num_heads, head]
        keys = keys[:length].double().repeat_interleave(group, dim=1)
        values = values[:length].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[start:end].double(), keys) * scale
        reference_softmax_into(scores, values, out[start:end], lse_out[start:end])
    return out, lse_out


def reference_softmax_into(scores, values, out, lse_out) -> None:
    """scores [heads, q, k] float64 (masked entries -inf) -> out, lse_out."""
    lse = torch.logsumexp(scores, dim=-1)  # [heads, q]
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    out.copy_(torch.einsum("hqk,khd->qhd", probs, values))
    lse_out.copy_(lse.transpose(0, 1))


def reference_outputs(like, out, lse_out):
    num_tokens, num_heads, _ = like.shape
    if out is None:
        out = torch.empty_like(like)
    if lse_out is None:
        lse_out = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=like.device)
    return out, lse_out
