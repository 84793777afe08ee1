"""The hybrid CPU backend against vLLM's stock CPU backend, at unit level.

A batch mixing a prefill row, a plain decode row and speculative rows is laid
into a CPU cache by vLLM's own ``cpu_attn_reshape_and_cache`` (prefix and new
tokens, as the layer's KV update does before attention). Metadata comes from
vLLM's builder ``build()`` (the builder object is assembled by hand: its
constructor needs a whole engine config). The stock impl's output is the
reference for chains; trees are checked against dense masked attention.
"""

from __future__ import annotations

import random
import types

import pytest
import torch
from hybrid_cases import PagedCase, assert_close, nan_like, query_start_loc

from vllm_longspec.attention.spec_trees import (
    HYBRID_CHAINS_ENV,
    SpecTreeBatch,
    spec_trees,
)
from vllm_longspec.tree.mask import ancestor_mask

pytest.importorskip("vllm")

BLOCK_SIZE = 128
# rows: prefill (no prefix), plain decode, speculative rows straddling blocks
PREFIX_LENS = [0, 300, 127, 700, 1]
QUERY_LENS = [150, 1, 5, 16, 128]


class Batch:
    def __init__(self, dtype, num_heads, num_kv_heads, head_size, seed):
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        gen = torch.Generator().manual_seed(seed)
        self.isa = _get_attn_isa(dtype, BLOCK_SIZE, head_size)
        seq_lens = [p + q for p, q in zip(PREFIX_LENS, QUERY_LENS, strict=True)]
        self.case = PagedCase(seq_lens, num_kv_heads, head_size, BLOCK_SIZE, dtype, gen,
                              self.isa, fill=0.0)
        self.qsl = query_start_loc(QUERY_LENS)
        num_tokens = int(self.qsl[-1])
        self.query = torch.randn(num_tokens, num_heads, head_size, generator=gen).to(dtype)
        # the new tokens' K/V, as the layer hands them over: the cache's last rows
        self.key = torch.empty(num_tokens, num_kv_heads, head_size, dtype=dtype)
        self.value = torch.empty_like(self.key)
        for r, (p, q) in enumerate(zip(PREFIX_LENS, QUERY_LENS, strict=True)):
            pos = torch.arange(p, p + q)
            blocks = self.case.block_table[r, pos // BLOCK_SIZE].long()
            span = slice(int(self.qsl[r]), int(self.qsl[r + 1]))
            self.key[span] = self.case.keys[blocks, :, pos % BLOCK_SIZE]
            self.value[span] = self.case.values[blocks, :, pos % BLOCK_SIZE]
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        self.dtype, self.num_heads = dtype, num_heads
        self.num_kv_heads, self.head_size = num_kv_heads, head_size

    def common_metadata(self):
        from vllm.v1.attention.backend import CommonAttentionMetadata

        return CommonAttentionMetadata(
            query_start_loc=self.qsl, query_start_loc_cpu=self.qsl, seq_lens=self.seq_lens,
            num_reqs=len(QUERY_LENS), num_actual_tokens=int(self.qsl[-1]),
            max_query_len=max(QUERY_LENS), max_seq_len=int(self.seq_lens.max()),
            block_table_tensor=self.case.block_table,
            slot_mapping=torch.zeros(int(self.qsl[-1]), dtype=torch.int64))

    def builder(self, cls):
        builder = cls.__new__(cls)
        builder.num_heads, builder.num_kv_heads = self.num_heads, self.num_kv_heads
        builder.head_dim, builder.dtype, builder.block_size = (
            self.head_size, self.dtype, BLOCK_SIZE)
        builder.window_size, builder.kv_cache_dtype, builder.isa = -1, "auto", self.isa
        builder.is_cross_attention = builder.is_encoder_only_attention = False
        builder.layer_names = ["model.layers.0.self_attn.attn"]
        return builder

    def impl(self, cls, monkeypatch):
        from vllm.v1.attention.backends import cpu_attn

        config = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=self.dtype))
        monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: config)
        return cls(self.num_heads, self.head_size, self.head_size**-0.5,
                   self.num_kv_heads, None, None, "auto")

    def run(self, builder_cls, impl_cls, monkeypatch):
        metadata = self.builder(builder_cls).build(0, self.common_metadata())
        layer = types.SimpleNamespace(isa=self.isa, _k_scale_float=1.0, _v_scale_float=1.0)
        output = nan_like(self.query)
        self.impl(impl_cls, monkeypatch).forward(
            layer, self.query, self.key, self.value, self.case.kv_cache, metadata, output)
        return output, metadata

    def dense_tree_attention(self, row, mask):
        """float64 softmax over the row's committed prefix and its visible new tokens."""
        p, q = PREFIX_LENS[row], QUERY_LENS[row]
        blocks = self.case.block_table[row, : -(-(p + q) // BLOCK_SIZE)].long()
        group = self.num_heads // self.num_kv_heads
        keys = self.case.keys[blocks].transpose(1, 2).reshape(-1, self.num_kv_heads,
                                                              self.head_size)[: p + q]
        values = self.case.values[blocks].transpose(1, 2).reshape(
            -1, self.num_kv_heads, self.head_size)[: p + q]
        visible = torch.cat([torch.ones(q, p, dtype=torch.bool), mask], dim=1)
        span = slice(int(self.qsl[row]), int(self.qsl[row + 1]))
        scores = torch.einsum("qhd,khd->hqk", self.query[span].double(),
                              keys.double().repeat_interleave(group, 1))
        probs = (scores * self.head_size**-0.5).masked_fill(~visible, float("-inf"))
        return torch.einsum("hqk,khd->qhd", probs.softmax(-1),
                            values.double().repeat_interleave(group, 1))


def _classes():
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackendImpl,
        CPUAttentionMetadataBuilder,
    )

    from vllm_longspec.attention.backend import (
        HybridCPUAttentionImpl,
        HybridCPUAttentionMetadataBuilder,
    )

    return ((CPUAttentionMetadataBuilder, CPUAttentionBackendImpl),
            (HybridCPUAttentionMetadataBuilder, HybridCPUAttentionImpl))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_size", [(9, 3, 64), (8, 1, 128)])
def test_chain_verification_matches_stock_backend(monkeypatch, dtype, num_heads,
                                                  num_kv_heads, head_size):
    batch = Batch(dtype, num_heads, num_kv_heads, head_size, seed=num_heads)
    stock, hybrid = _classes()
    expected, _ = batch.run(*stock, monkeypatch)
    # No tree set: the stock implementation, bit for bit.
    got, metadata = batch.run(*hybrid, monkeypatch)
    assert metadata.hybrid_plan is None
    assert torch.equal(got, expected)
    # Every short multi-token row through prefix + causal part + merge.
    monkeypatch.setenv(HYBRID_CHAINS_ENV, "1")
    got, metadata = batch.run(*hybrid, monkeypatch)
    assert metadata.hybrid_plan.tree.rows == [2, 3, 4]
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_rows_follow_their_masks(monkeypatch, dtype):
    batch = Batch(dtype, 9, 3, 64, seed=5)
    stock, hybrid = _classes()
    expected, _ = batch.run(*stock, monkeypatch)
    rng = random.Random(5)
    parents = {row: [-1] + [rng.randrange(i) for i in range(1, min(QUERY_LENS[row] + 2, 128))]
               for row in (2, 3, 4)}  # one spare draft: the scheduler may send fewer
    with spec_trees(SpecTreeBatch.from_request_ids(
            ["a", "b", "c", "d", "e"], {"abcde"[r]: p for r, p in parents.items()})):
        got, metadata = batch.run(*hybrid, monkeypatch)
    assert metadata.hybrid_plan.stock is not None
    for row in (0, 1):  # prefill and plain decode: vLLM's kernel
        span = slice(int(batch.qsl[row]), int(batch.qsl[row + 1]))
        assert_close(got[span], expected[span], dtype)
    for row, tree in parents.items():
        span = slice(int(batch.qsl[row]), int(batch.qsl[row + 1]))
        mask = ancestor_mask(tree[: QUERY_LENS[row]])
        assert_close(got[span], batch.dense_tree_attention(row, mask), dtype)


def test_plan_is_reused_across_kv_cache_groups_with_their_block_tables(monkeypatch):
    """One step builds metadata once per KV-cache group (per target layer next to
    a draft): the rows are planned once, the block tables are each group's."""
    import dataclasses

    _, (builder_cls, _) = _classes()
    monkeypatch.setenv(HYBRID_CHAINS_ENV, "1")
    batch = Batch(torch.float32, 4, 2, 64, seed=8)
    builder = batch.builder(builder_cls)
    common = batch.common_metadata()
    first = builder.build(0, common).hybrid_plan
    other_blocks = batch.case.block_table.flip(1).contiguous()  # another group's
    second = builder.build(0, dataclasses.replace(
        common, block_table_tensor=other_blocks)).hybrid_plan
    assert second.tree.token_index is first.tree.token_index  # planned once
    assert torch.equal(second.tree.block_table, other_blocks[second.tree.rows])
    assert torch.equal(second.stock.block_table, other_blocks[second.stock.rows])
    assert torch.equal(first.tree.block_table, batch.case.block_table[first.tree.rows])
    # the next step (one more token each) is planned again
    third = builder.build(0, dataclasses.replace(
        common, seq_lens=common.seq_lens + 1, max_seq_len=common.max_seq_len + 1)).hybrid_plan
    assert third.tree.token_index is not first.tree.token_index
    assert torch.equal(third.tree.prefix_lens, first.tree.prefix_lens + 1)


def test_tree_smaller_than_query_is_an_error(monkeypatch):
    batch = Batch(torch.float32, 4, 2, 64, seed=6)
    _, hybrid = _classes()
    with spec_trees(SpecTreeBatch({3: [-1, 0, 0]})), pytest.raises(ValueError,
                                                                    match="only 3"):
        batch.run(*hybrid, monkeypatch)


def test_trees_apply_to_their_layers_only(monkeypatch):
    """The target's trees do not reach a draft layer's builder (same backend)."""
    batch = Batch(torch.float32, 4, 2, 64, seed=7)
    _, hybrid = _classes()
    draft_only = frozenset({"draft_model.layers.30.self_attn.attn"})
    with spec_trees(SpecTreeBatch({3: [-1, 0, 0]}, layer_names=draft_only)):
        _, metadata = batch.run(*hybrid, monkeypatch)
    assert metadata.hybrid_plan is None


def test_registration_is_opt_in(monkeypatch):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_longspec.attention.backend import ENABLE_ENV, register_attention_backend

    monkeypatch.delenv(ENABLE_ENV, raising=False)
    was_overridden = AttentionBackendEnum.CPU_ATTN.is_overridden()
    assert register_attention_backend() is False
    monkeypatch.setenv(ENABLE_ENV, "1")
    try:
        assert register_attention_backend() is True
        backend = AttentionBackendEnum.CPU_ATTN.get_class()
        assert backend.__name__ == "HybridCPUAttentionBackend"
        assert backend.get_name() == "CPU_ATTN"
    finally:
        if not was_overridden:
            AttentionBackendEnum.CPU_ATTN.clear_override()
