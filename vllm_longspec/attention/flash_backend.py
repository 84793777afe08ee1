"""Hybrid tree attention as vLLM's FlashAttention backend (GPU target verification).

UNTESTED ON GPU: this project has had no GPU. It is used only behind the one GPU
switch ``VLLM_LONGSPEC_GPU=1`` (``kernels/tuning.py``); its tree path
(``verify_tree_rows`` with the Triton prefix kernel) runs in tests under the
Triton interpreter on CPU tensors.

Registered in place of ``FLASH_ATTN`` by ``patches/attention_backend.py``;
``get_name()`` stays "FLASH_ATTN".
The metadata builder is vLLM's; for a step with rows to verify,
``patches/attention_metadata.py`` adds ``TreeRows`` (``tree_rows.py``) to the
metadata it built (``plan`` / ``with_plan``). The impl runs
vLLM's forward for the whole batch, then recomputes the tree rows: paged prefix
attention with its log-sum-exp (FlashAttention: the ``flash-attn`` package when
installed, else the copy bundled with vLLM, else the Triton prefix kernel), the
masked tree part (Triton) and the exact LSE merge (Triton), written over those
rows. Attention stays outside CUDA graphs (the builder declares no graph support:
the tree plan is host-side work per step).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import torch
from typing_extensions import override
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from vllm_longspec.attention.masked_spec import masked_spec_attention
from vllm_longspec.attention.merge import merge_attention_states
from vllm_longspec.attention.paged_prefix import paged_prefix_attention
from vllm_longspec.attention.tree_rows import TreeRows, check_impl_supports_trees

# (query, key_cache, value_cache, plan, scale) -> (out, lse [tokens, heads] fp32);
# caches in FlashAttention's layout [num_blocks, block_size, num_kv_heads, head].
PrefixFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def triton_prefix(query, key_cache, value_cache, plan: TreeRows, scale: float):
    """The Triton FlashDecoding prefix kernel over the same pages."""
    return paged_prefix_attention(
        query, key_cache.transpose(1, 2), value_cache.transpose(1, 2), plan.block_table,
        plan.prefix_lens, plan.query_start_loc, scale,
        max_tokens_per_req=plan.max_query_len, max_prefix_len=plan.max_prefix_len)


def _flash_attn_package_prefix(varlen, query, key_cache, value_cache, plan, scale):
    cu_seqlens_k = torch.nn.functional.pad(plan.prefix_lens.cumsum(0, dtype=torch.int32),
                                           (1, 0))
    out, lse, _ = varlen(
        query, key_cache, value_cache, cu_seqlens_q=plan.query_start_loc,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=plan.max_query_len,
        max_seqlen_k=plan.max_prefix_len, softmax_scale=scale, causal=False,
        block_table=plan.block_table, return_attn_probs=True)
    return out, lse.transpose(0, 1).contiguous()  # [heads, tokens] -> [tokens, heads]


def _vllm_flash_attn_prefix(varlen, fa_version, query, key_cache, value_cache, plan,
                            scale):
    out, lse = varlen(
        q=query, k=key_cache, v=value_cache, cu_seqlens_q=plan.query_start_loc,
        max_seqlen_q=plan.max_query_len, seqused_k=plan.prefix_lens,
        max_seqlen_k=plan.max_prefix_len, softmax_scale=scale, causal=False,
        block_table=plan.block_table, return_softmax_lse=True, fa_version=fa_version)
    return out, lse.transpose(0, 1).contiguous()


@functools.cache
def flash_prefix(fa_version: int | None) -> tuple[str, PrefixFn]:
    """The prefix attention this machine has: ``(name, function)``."""
    try:
        from flash_attn import flash_attn_varlen_func  # the `gpu` extra

        return "flash-attn", functools.partial(_flash_attn_package_prefix,
                                               flash_attn_varlen_func)
    except ImportError:
        pass
    from vllm.v1.attention.backends import fa_utils

    if fa_version is not None and fa_utils.is_flash_attn_varlen_func_available():
        return "vllm-flash-attn", functools.partial(
            _vllm_flash_attn_prefix, fa_utils.flash_attn_varlen_func, fa_version)
    return "triton", triton_prefix


def verify_tree_rows(query, key, value, key_cache, value_cache, plan: TreeRows,
                     scale: float, prefix: PrefixFn = triton_prefix) -> torch.Tensor:
    """Hybrid attention of the tree rows: ``query``/``key``/``value`` hold only
    their tokens (``plan.token_index`` order); caches in FlashAttention's layout.
    Returns ``[num_tree_tokens, num_heads, head_size]`` in the query dtype."""
    prefix_out, prefix_lse = prefix(query, key_cache, value_cache, plan, scale)
    tree_out, tree_lse = masked_spec_attention(
        query, key, value, plan.query_start_loc, plan.ancestor_bits, scale,
        max_tokens_per_req=plan.max_query_len)
    out, _ = merge_attention_states(prefix_out, prefix_lse, tree_out, tree_lse,
                                    out=torch.empty_like(query))
    return out


@dataclasses.dataclass
class HybridFlashAttentionMetadata(FlashAttentionMetadata):
    tree_rows: TreeRows | None = None


class HybridFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    """vLLM's builder (``build`` unchanged); ``patches/attention_metadata.py``
    adds a step's ``TreeRows``: ``plan`` once, ``with_plan`` per KV-cache group."""

    _cudagraph_support = AttentionCGSupport.NEVER  # read by get_cudagraph_support

    @property
    def plan_key(self) -> tuple:
        """Builders with equal keys share one plan (it depends on the batch only)."""
        return (self.verifies_chains,)

    @property
    def verifies_chains(self) -> bool:
        """Chain rows of sliding-window layers keep vLLM's kernel (``hybrid_chains``)."""
        return getattr(self.kv_cache_spec, "sliding_window", None) is None

    def plan(self, masks: Mapping[int, torch.Tensor], query_start_loc: Sequence[int],
             metadata: FlashAttentionMetadata) -> TreeRows | None:
        """The rows ``masks`` (row -> [q, q] ancestor mask), block table empty."""
        if not masks or metadata.causal is not True:
            return None
        num_reqs = len(query_start_loc) - 1
        return TreeRows.build(masks, query_start_loc, metadata.seq_lens[:num_reqs],
                              metadata.max_seq_len)

    def with_plan(self, metadata: FlashAttentionMetadata,
                  plan: TreeRows | None) -> FlashAttentionMetadata:
        if plan is None:
            return metadata
        fields = {f.name: getattr(metadata, f.name)
                  for f in dataclasses.fields(FlashAttentionMetadata)}
        return HybridFlashAttentionMetadata(
            **fields, tree_rows=plan.with_block_table(metadata.block_table))


class HybridFlashAttentionImpl(FlashAttentionImpl):
    @override
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                        output_scale, output_block_scale)
        plan = getattr(attn_metadata, "tree_rows", None)
        if plan is None or self.attn_type != AttentionType.DECODER:
            return output
        self._check_tree_support(key)
        # Same split as vLLM's forward: [num_blocks, block_size, num_kv_heads, head].
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        _, prefix = flash_prefix(self.vllm_flash_attn_version)
        rows = plan.token_index
        output[rows] = verify_tree_rows(query[rows], key[rows], value[rows], key_cache,
                                        value_cache, plan, self.scale, prefix)
        return output

    def _check_tree_support(self, key) -> None:
        more = []
        if self.kv_cache_dtype not in ("auto", "float16", "bfloat16"):
            more.append(f"kv_cache_dtype={self.kv_cache_dtype}")
        if self.dcp_world_size > 1:
            more.append("decode context parallelism")
        check_impl_supports_trees(self, key, self.sliding_window != (-1, -1), more)


class HybridFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    @override
    def get_name() -> str:
        return "FLASH_ATTN"

    @staticmethod
    @override
    def get_impl_cls():
        return HybridFlashAttentionImpl

    @staticmethod
    @override
    def get_builder_cls():
        return HybridFlashAttentionMetadataBuilder
