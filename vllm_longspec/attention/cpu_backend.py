"""Hybrid tree attention as vLLM's CPU attention backend (target verification).

Registered in place of ``CPU_ATTN`` by ``patches/attention_backend.py``;
``get_name()`` stays "CPU_ATTN". vLLM's CPU kernel knows causal and
sliding-window masks only, and returns no log-sum-exp, so it cannot verify a
speculative tree.

The metadata builder is vLLM's; for a step with rows to verify,
``patches/attention_metadata.py`` adds a plan to the metadata it built
(``plan`` / ``with_plan``): which rows carry trees (their prefix lengths,
block tables, packed ancestor masks) and a stock sub-batch for the other rows.
The impl attends tree rows with prefix (paged, LSE) + tree part (masked, LSE) +
merge (``hybrid.hybrid_attention``), and the rest with vLLM's own kernel.
Without a plan (prefill, plain decode, chains, the draft's layers) every call
is ``CPUAttentionBackendImpl.forward`` unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from typing_extensions import override
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_longspec.attention.cpu_extension import load_cpu_extension
from vllm_longspec.attention.hybrid import hybrid_attention
from vllm_longspec.attention.kv_cache import split_kv_cache
from vllm_longspec.attention.tree_rows import (
    TreeRows,
    check_impl_supports_trees,
    sub_batch,
)


@dataclasses.dataclass
class StockRows:
    """The other rows, as a sub-batch for vLLM's own CPU kernel."""

    token_index: torch.Tensor  # [num_stock_tokens] int64
    query_start_loc: torch.Tensor  # [num_stock_rows + 1] int32
    seq_lens: torch.Tensor  # [num_stock_rows] int32
    rows: torch.Tensor  # [num_stock_rows] int64, rows of the batch
    block_table: torch.Tensor  # [num_stock_rows, max_blocks] int32
    scheduler_metadata: torch.Tensor


@dataclasses.dataclass
class HybridPlan:
    tree: TreeRows
    stock: StockRows | None


@dataclasses.dataclass
class HybridCPUAttentionMetadata(CPUAttentionMetadata):
    hybrid_plan: HybridPlan | None = None


class HybridCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's builder (``build`` unchanged); a step with rows to verify gets
    their plan added by ``patches/attention_metadata.py``: ``plan`` once for the
    layers that share this builder's configuration (with a draft next to the
    target, every target layer has its own KV-cache group, so one step builds
    metadata once per layer), ``with_plan`` per group (its block table)."""

    @property
    def plan_key(self) -> tuple:
        """What a plan depends on besides the batch: builders with equal keys
        share one."""
        return (self.num_heads, self.num_kv_heads, self.head_dim, self.dtype,
                self.window_size, self.isa, self.kv_cache_dtype)

    @property
    def verifies_chains(self) -> bool:
        """Chain rows of sliding-window layers keep vLLM's kernel (``hybrid_chains``)."""
        return self.window_size == -1

    def plan(self, masks: Mapping[int, torch.Tensor], query_start_loc: Sequence[int],
             metadata: CPUAttentionMetadata) -> HybridPlan | None:
        """The plan of rows ``masks`` (row -> [q, q] ancestor mask), block tables
        empty; None where vLLM's kernel keeps every row."""
        if not masks or not self._plans(metadata):
            return None
        self._check_tree_support()
        num_reqs = len(query_start_loc) - 1
        seq_lens = metadata.seq_lens[:num_reqs]
        tree = TreeRows.build(masks, query_start_loc, seq_lens, metadata.max_seq_len)
        query_lens = [query_start_loc[r + 1] - query_start_loc[r] for r in range(num_reqs)]
        stock_rows = [r for r in range(num_reqs) if r not in masks and query_lens[r] > 0]
        stock = None
        if stock_rows:
            stock_index, stock_qsl = sub_batch(query_start_loc, stock_rows)
            stock_seq_lens = seq_lens[torch.tensor(stock_rows)].to(torch.int32)
            stock = StockRows(
                token_index=stock_index,
                query_start_loc=stock_qsl,
                seq_lens=stock_seq_lens,
                rows=torch.tensor(stock_rows),
                block_table=torch.empty(len(stock_rows), 0, dtype=torch.int32),
                scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
                    num_reqs=len(stock_rows), num_heads=self.num_heads,
                    num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                    seq_lens=stock_seq_lens, dtype=self.dtype,
                    query_start_loc=stock_qsl, causal=True,
                    sliding_window_size=self.window_size, isa=self.isa,
                    enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                    kv_cache_dtype=self.kv_cache_dtype),
            )
        return HybridPlan(tree=tree, stock=stock)

    def with_plan(self, metadata: CPUAttentionMetadata,
                  plan: HybridPlan | None) -> CPUAttentionMetadata:
        """``metadata`` (this group's) carrying ``plan`` with its block table."""
        if plan is None or not self._plans(metadata):
            return metadata
        block_table = metadata.block_table
        stock = plan.stock
        if stock is not None:
            stock = dataclasses.replace(
                stock, block_table=block_table[stock.rows].contiguous())
        fields = {f.name: getattr(metadata, f.name)
                  for f in dataclasses.fields(CPUAttentionMetadata)}
        return HybridCPUAttentionMetadata(**fields, hybrid_plan=HybridPlan(
            tree=plan.tree.with_block_table(block_table), stock=stock))

    def _plans(self, metadata: CPUAttentionMetadata) -> bool:
        """Decoder self-attention with vLLM's causal mask (the target's layers)."""
        return (not self.is_cross_attention and not self.is_encoder_only_attention
                and metadata.causal is True and metadata.dynamic_causal is None)

    def _check_tree_support(self) -> None:
        problems = []
        if self.window_size != -1:
            problems.append(f"sliding window {self.window_size}")
        if self.kv_cache_dtype not in ("auto", None):
            problems.append(f"kv_cache_dtype={self.kv_cache_dtype}")
        if self.isa not in ("vec", "vec16", "amx"):
            problems.append(f"CPU attention ISA {self.isa!r} (cache packing not decoded)")
        if problems:
            raise NotImplementedError(
                "hybrid tree attention does not support " + ", ".join(problems)
                + "; run without speculative trees (chains use vLLM's own kernel)")


class HybridCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        load_cpu_extension()  # build/load the C++ kernel at model construction

    @override
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        plan = getattr(attn_metadata, "hybrid_plan", None)
        if plan is None or self.attn_type != AttentionType.DECODER:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata,
                                   output, output_scale, output_block_scale)
        self._check_tree_support(key, output_scale, output_block_scale)
        return self.forward_planned(layer, query, key, value, kv_cache, plan, output)

    def forward_planned(self, layer, query, key, value, kv_cache, plan: HybridPlan,
                        output) -> torch.Tensor:
        """The planned rows with hybrid attention, the others with vLLM's kernel."""
        key_half, value_half = split_kv_cache(kv_cache, "cpu")
        if plan.stock is not None:
            self._stock_rows(layer, query, key_half, value_half, plan.stock, output)
        tree = plan.tree
        # [num_tree_tokens, num_heads, head_size]
        tree_out = torch.empty((tree.token_index.numel(), *output.shape[1:]),
                               dtype=output.dtype)
        hybrid_attention(
            query[tree.token_index], key[tree.token_index], value[tree.token_index],
            key_half, value_half, tree.block_table, tree.prefix_lens,
            tree.query_start_loc, tree.ancestor_bits, self.scale, tree_out,
            cpu_isa=layer.isa)
        output[tree.token_index] = tree_out
        return output

    def _stock_rows(self, layer, query, key_half, value_half, stock, output) -> None:
        # [num_stock_tokens, num_heads, head_size]
        stock_out = torch.empty((stock.token_index.numel(), *output.shape[1:]),
                                dtype=output.dtype)
        ops.cpu_attention_with_kv_cache(
            query=query[stock.token_index], key_cache=key_half, value_cache=value_half,
            output=stock_out, query_start_loc=stock.query_start_loc,
            seq_lens=stock.seq_lens, scale=self.scale, causal=True,
            alibi_slopes=self.alibi_slopes, sliding_window=self.sliding_window,
            block_table=stock.block_table, softcap=self.logits_soft_cap,
            scheduler_metadata=stock.scheduler_metadata, s_aux=self.sinks,
            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype)
        output[stock.token_index] = stock_out

    def _check_tree_support(self, key, output_scale, output_block_scale) -> None:
        fused_quant = output_scale is not None or output_block_scale is not None
        check_impl_supports_trees(self, key, self.sliding_window != -1,
                                  ["fused output quantization"] if fused_quant else [])


class HybridCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    @override
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    @override
    def get_impl_cls():
        return HybridCPUAttentionImpl

    @staticmethod
    @override
    def get_builder_cls():
        return HybridCPUAttentionMetadataBuilder
