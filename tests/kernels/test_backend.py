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

from vllm_longspec.attention.tree_rows import rows_to_verify
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

    def metadata(self, builder_cls, masks=None):
        """vLLM's build; with ``masks`` (row -> ancestor mask) the plan the
        runner patch adds for them (``patches/attention_metadata.py``)."""
        builder = self.builder(builder_cls)
        metadata = builder.build(0, self.common_metadata())
        if masks is not None:
            plan = builder.plan(masks, self.qsl.tolist(), metadata)
            metadata = builder.with_plan(metadata, plan)
        return metadata

    def run(self, builder_cls, impl_cls, monkeypatch, masks=None):
        metadata = self.metadata(builder_cls, masks)
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

    from vllm_longspec.attention.cpu_backend import (
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
    # No plan: the stock implementation, bit for bit.
    got, metadata = batch.run(*hybrid, monkeypatch)
    assert getattr(metadata, "hybrid_plan", None) is None
    assert torch.equal(got, expected)
    # Every short multi-token row through prefix + causal part + merge.
    chains = rows_to_verify({}, QUERY_LENS, chains=True)
    got, metadata = batch.run(*hybrid, monkeypatch, masks=chains)
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
    masks = rows_to_verify({row: ancestor_mask(p) for row, p in parents.items()},
                           QUERY_LENS, chains=False)
    got, metadata = batch.run(*hybrid, monkeypatch, masks=masks)
    assert metadata.hybrid_plan.stock is not None
    for row in (0, 1):  # prefill and plain decode: vLLM's kernel
        span = slice(int(batch.qsl[row]), int(batch.qsl[row + 1]))
        assert_close(got[span], expected[span], dtype)
    for row, tree in parents.items():
        span = slice(int(batch.qsl[row]), int(batch.qsl[row + 1]))
        mask = ancestor_mask(tree[: QUERY_LENS[row]])
        assert_close(got[span], batch.dense_tree_attention(row, mask), dtype)


def test_one_plan_per_step_serves_every_kv_cache_group(monkeypatch):
    """With a draft next to the target every target layer has its own KV-cache
    group (own block table): the rows are planned once per step, each group's
    metadata gets its own block-table rows, the draft's group is left alone."""
    import dataclasses

    from vllm_longspec.patches.attention_metadata import add_hybrid_plans

    _, (builder_cls, _) = _classes()
    batch = Batch(torch.float32, 4, 2, 64, seed=8)
    builder = batch.builder(builder_cls)
    common = batch.common_metadata()
    other_blocks = batch.case.block_table.flip(1).contiguous()  # another group's
    metadata = {"layers.0": builder.build(0, common),
                "layers.1": builder.build(0, dataclasses.replace(
                    common, block_table_tensor=other_blocks)),
                "draft.layers.2": builder.build(0, common)}
    draft_metadata = metadata["draft.layers.2"]
    groups = [types.SimpleNamespace(layer_names=[name], get_metadata_builder=lambda: builder)
              for name in ("layers.0", "layers.1")]
    masks = {3: ancestor_mask([-1] + list(range(QUERY_LENS[3] - 1)))}
    add_hybrid_plans(metadata, groups, batch.qsl.tolist(), masks, chains=True)
    first, second = metadata["layers.0"].hybrid_plan, metadata["layers.1"].hybrid_plan
    assert first.tree.rows == [2, 3, 4]  # the tree row and the chain rows
    assert second.tree.token_index is first.tree.token_index  # planned once
    assert torch.equal(first.tree.block_table, batch.case.block_table[first.tree.rows])
    assert torch.equal(second.tree.block_table, other_blocks[second.tree.rows])
    assert torch.equal(second.stock.block_table, other_blocks[second.stock.rows])
    assert metadata["draft.layers.2"] is draft_metadata


def test_the_draft_group_is_not_a_target_group():
    from vllm_longspec.patches.attention_metadata import target_attn_groups

    runner = types.SimpleNamespace(attn_groups=[["g0"], ["g1a", "g1b"], ["g2"]])
    proposer = types.SimpleNamespace(kv_cache_gid=1)
    assert target_attn_groups(runner, proposer) == ["g0", "g2"]


def test_tree_smaller_than_query_is_an_error():
    with pytest.raises(ValueError, match="only 3"):
        rows_to_verify({3: ancestor_mask([-1, 0, 0])}, QUERY_LENS, chains=False)


def test_registration_is_opt_in(monkeypatch):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_longspec.patches import attention_backend

    monkeypatch.delenv(attention_backend.ENABLE_ENV, raising=False)
    assert not attention_backend.requested_by_user()
    monkeypatch.setenv(attention_backend.ENABLE_ENV, "1")
    assert attention_backend.requested_by_user()
    was_overridden = AttentionBackendEnum.CPU_ATTN.is_overridden()
    try:
        attention_backend.register()
        backend = AttentionBackendEnum.CPU_ATTN.get_class()
        assert backend.__name__ == "HybridCPUAttentionBackend"
        assert backend.get_name() == "CPU_ATTN"
    finally:
        if not was_overridden:
            AttentionBackendEnum.CPU_ATTN.clear_override()
