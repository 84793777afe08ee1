"""Hybrid tree attention as vLLM's CPU attention backend (target verification).

Target: ``vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend`` (CPU_ATTN),
overridden through vLLM's backend registry; ``get_name()`` stays "CPU_ATTN".
Why: vLLM's CPU kernel knows causal and sliding-window masks only, and returns
no log-sum-exp, so it cannot verify a speculative tree.
How: the metadata builder runs vLLM's build, then, when a ``SpecTreeBatch`` is
set (``spec_trees``), adds a plan: which rows carry trees (their prefix lengths,
block tables, packed ancestor masks) and a stock sub-batch for the other rows.
The impl attends tree rows with prefix (paged, LSE) + tree part (masked, LSE) +
merge (``cpu_hybrid``), and the rest with vLLM's own kernel. Without a plan
(no tree set: prefill, plain decode, chains, the draft's layers) every call is
``CPUAttentionBackendImpl.forward`` unchanged.
When it can go: when vLLM's CPU backend accepts an arbitrary per-request mask.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_longspec.attention.cpu_cache import split_kv_pages
from vllm_longspec.attention.cpu_extension import load_cpu_extension
from vllm_longspec.attention.cpu_hybrid import hybrid_attention
from vllm_longspec.attention.spec_trees import hybrid_chains_enabled
from vllm_longspec.attention.tree_rows import (
    TreeRows,
    applicable_tree_batch,
    check_impl_supports_trees,
    find_tree_masks,
    sub_batch,
)

ENABLE_ENV = "VLLM_LONGSPEC_HYBRID_ATTENTION"
# Tests: a file created the first time a process runs the hybrid path, so an
# engine test can tell that the path ran (the worker is another process).
USED_MARKER_ENV = "VLLM_LONGSPEC_HYBRID_USED_MARKER"
_marked = False


def _mark_hybrid_used() -> None:
    global _marked
    marker = os.environ.get(USED_MARKER_ENV)
    if marker and not _marked:
        open(marker, "a").close()
        _marked = True
BACKEND_CLASS_PATH = "vllm_longspec.attention.backend.HybridCPUAttentionBackend"
GPU_BACKEND_CLASS_PATH = "vllm_longspec.attention.gpu_backend.HybridFlashAttentionBackend"


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
    # The last step's plan without block tables: (key, HybridPlan). With a draft
    # next to the target, vLLM's hybrid KV-cache manager gives every target
    # layer its own KV-cache group (own block table), so one step builds
    # metadata once per layer; the rows, masks and stock scheduler metadata are
    # the same for all of them, only the block-table rows differ.
    _last_plan: tuple | None = None

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        fields = {f.name: getattr(metadata, f.name)
                  for f in dataclasses.fields(CPUAttentionMetadata)}
        plan = None
        if (not self.is_cross_attention and not self.is_encoder_only_attention
                and metadata.causal is True and metadata.dynamic_causal is None):
            plan = self._plan(common_attn_metadata, metadata)
        return HybridCPUAttentionMetadata(**fields, hybrid_plan=plan)

    def _plan(self, common, metadata) -> HybridPlan | None:
        num_reqs = common.num_reqs
        qsl = common.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = metadata.seq_lens[:num_reqs]
        # Everything the plan depends on but the block table (compared by value).
        key = (applicable_tree_batch(self.layer_names), self.window_size == -1,
               hybrid_chains_enabled(), tuple(qsl), tuple(seq_lens.tolist()),
               self.num_heads, self.num_kv_heads, self.head_dim, self.dtype,
               self.window_size, self.isa, self.kv_cache_dtype, common.max_seq_len)
        cached = HybridCPUAttentionMetadataBuilder._last_plan
        if cached is not None and cached[0] == key:
            shared = cached[1]
        else:
            shared = self._plan_rows(qsl, seq_lens, common.max_seq_len)
            HybridCPUAttentionMetadataBuilder._last_plan = (key, shared)
        if shared is None:
            return None
        self._check_tree_support()
        block_table = metadata.block_table
        tree = dataclasses.replace(
            shared.tree, block_table=block_table[torch.tensor(shared.tree.rows)].contiguous())
        stock = shared.stock
        if stock is not None:
            stock = dataclasses.replace(
                stock, block_table=block_table[stock.rows].contiguous())
        return HybridPlan(tree=tree, stock=stock)

    def _plan_rows(self, qsl, seq_lens, max_seq_len) -> HybridPlan | None:
        """The plan with empty block tables (``_plan`` fills them per group)."""
        num_reqs = len(qsl) - 1
        query_lens = [qsl[r + 1] - qsl[r] for r in range(num_reqs)]
        # Chain rows of sliding-window layers keep vLLM's kernel (debug switch).
        masks = find_tree_masks(self.layer_names, query_lens,
                                chains_too=self.window_size == -1)
        if not masks:
            return None
        no_blocks = torch.empty(num_reqs, 0, dtype=torch.int32)
        tree = TreeRows.build(masks, qsl, seq_lens, no_blocks, max_seq_len)
        stock_rows = [r for r in range(num_reqs) if r not in masks and query_lens[r] > 0]
        stock = None
        if stock_rows:
            stock_index, stock_qsl = sub_batch(qsl, stock_rows)
            stock_seq_lens = seq_lens[torch.tensor(stock_rows)].to(torch.int32)
            stock = StockRows(
                token_index=stock_index,
                query_start_loc=stock_qsl,
                seq_lens=stock_seq_lens,
                rows=torch.tensor(stock_rows),
                block_table=no_blocks,
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

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        plan = getattr(attn_metadata, "hybrid_plan", None)
        if plan is None or self.attn_type != AttentionType.DECODER:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata,
                                   output, output_scale, output_block_scale)
        self._check_tree_support(key, output_scale, output_block_scale)
        key_half, value_half = split_kv_pages(kv_cache)
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
        _mark_hybrid_used()
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
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls():
        return HybridCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return HybridCPUAttentionMetadataBuilder


def register_attention_backend(force: bool = False) -> bool:
    """Override the platform's attention backend with the hybrid one in this
    process (idempotent): CPU_ATTN on CPU; FLASH_ATTN on GPU, only with the GPU
    switch ``VLLM_LONGSPEC_GPU=1`` (that backend is untested on GPU).

    Does nothing unless ``force`` (tree mode) or ``VLLM_LONGSPEC_HYBRID_ATTENTION=1``.
    Call it from the plugin's ``register()`` (it runs in every vLLM process).
    Returns whether the override is in place.
    """
    if not force and os.environ.get(ENABLE_ENV, "0") != "1":
        return False
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )

    from vllm_longspec.kernels.tuning import GPU_ENV, gpu_paths_enabled

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_CLASS_PATH)
        return True
    if not gpu_paths_enabled():
        raise RuntimeError(
            "hybrid tree attention on a GPU uses a FlashAttention backend that has "
            f"never run on a GPU; set {GPU_ENV}=1 to use it anyway, or draft chains")
    register_backend(AttentionBackendEnum.FLASH_ATTN, GPU_BACKEND_CLASS_PATH)
    return True
