"""The GPU hybrid backend (FlashAttention override), exercised on CPU.

Nothing here runs on a GPU. What runs: the impl's tree path end to end with the
Triton kernels under the interpreter (vLLM's own FlashAttention forward and
build, which need CUDA, are replaced by stand-ins); the two FlashAttention prefix
adapters against fake FlashAttention functions that compute the prefix exactly
(so argument plumbing and LSE layout are checked); the registration switch.
"""

from __future__ import annotations

import random
import sys
import types

import pytest
import torch
from hybrid_cases import (
    PagedCase,
    assert_close,
    dense_hybrid_reference,
    nan_like,
    query_start_loc,
    random_parents,
)

from vllm_longspec.attention import paged_prefix
from vllm_longspec.attention.tree_rows import TreeRows, rows_to_verify
from vllm_longspec.tree.mask import ancestor_mask

pytest.importorskip("vllm")
gpu_backend = pytest.importorskip("vllm_longspec.attention.flash_backend")

BLOCK_SIZE = 16
# rows 0 and 2 carry trees; 1 and 3 are plain decodes (vLLM's kernel)
PREFIX_LENS = [40, 17, 70, 33]
QUERY_LENS = [4, 1, 7, 1]
TREE_ROWS = (0, 2)
LAYERS = ["model.layers.0.self_attn.attn"]
STOCK_MARK = 7.0  # what the stand-in for vLLM's forward writes


class Case:
    def __init__(self, dtype, num_heads, num_kv_heads, head_size, seed, chain):
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        self.paged = PagedCase(PREFIX_LENS, num_kv_heads, head_size, BLOCK_SIZE, dtype, gen)
        self.qsl = query_start_loc(QUERY_LENS)
        n = int(self.qsl[-1])
        self.query = torch.randn(n, num_heads, head_size, generator=gen).to(dtype)
        self.key = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
        self.value = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
        self.parents = {r: random_parents(QUERY_LENS[r], rng, chain) for r in TREE_ROWS}
        # vLLM's FlashAttention cache: forward splits it into
        # [num_blocks, block_size, num_kv_heads, head_size] keys and values.
        self.kv_cache = torch.cat([self.paged.keys, self.paged.values], dim=-1)
        self.seq_lens = torch.tensor(PREFIX_LENS) + torch.tensor(QUERY_LENS)
        self.scale = head_size**-0.5
        self.dims = (num_heads, head_size, num_kv_heads)

    def common_metadata(self):
        from vllm.v1.attention.backend import CommonAttentionMetadata

        return CommonAttentionMetadata(
            query_start_loc=self.qsl, query_start_loc_cpu=self.qsl,
            seq_lens=self.seq_lens.to(torch.int32), num_reqs=len(QUERY_LENS),
            num_actual_tokens=int(self.qsl[-1]), max_query_len=max(QUERY_LENS),
            max_seq_len=int(self.seq_lens.max()), block_table_tensor=self.paged.block_table,
            slot_mapping=torch.zeros(int(self.qsl[-1]), dtype=torch.int64))

    def expected_tree_rows(self):
        """Dense float64 attention of every row as if it carried its tree (rows
        1 and 3 are single tokens: their mask is [[True]])."""
        visible = [ancestor_mask(self.parents[r]) if r in self.parents
                   else torch.ones(1, 1, dtype=torch.bool) for r in range(len(QUERY_LENS))]
        return dense_hybrid_reference(self.paged, self.qsl, self.query, self.key,
                                      self.value, visible, self.scale)

    def tree_masks(self):
        """Row -> ancestor mask of the tree rows, as the runner patch hands them."""
        return rows_to_verify({r: ancestor_mask(p) for r, p in self.parents.items()},
                              QUERY_LENS, chains=False)

    def tree_token_index(self):
        return torch.cat([torch.arange(int(self.qsl[r]), int(self.qsl[r + 1]))
                          for r in TREE_ROWS])


def _stock_build_stand_in(self, common_prefix_len, common, fast_build=False):
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    return FlashAttentionMetadata(
        num_actual_tokens=common.num_actual_tokens, max_query_len=common.max_query_len,
        query_start_loc=common.query_start_loc, max_seq_len=common.max_seq_len,
        seq_lens=common.seq_lens, block_table=common.block_table_tensor,
        slot_mapping=common.slot_mapping)


def _stock_forward_stand_in(self, layer, query, key, value, kv_cache, attn_metadata,
                            output, output_scale=None, output_block_scale=None):
    output.fill_(STOCK_MARK)
    return output


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask", ["tree", "chain"])
@pytest.mark.parametrize("heads,kv_heads,head_size", [(6, 2, 64), (4, 4, 128)])
def test_impl_verifies_tree_rows_with_the_triton_prefix(triton_ops, monkeypatch, dtype,
                                                        mask, heads, kv_heads, head_size):
    from vllm.v1.attention.backends import flash_attn

    monkeypatch.setattr(flash_attn.FlashAttentionMetadataBuilder, "build",
                        _stock_build_stand_in)
    monkeypatch.setattr(flash_attn.FlashAttentionImpl, "forward", _stock_forward_stand_in)
    case = Case(dtype, heads, kv_heads, head_size, seed=head_size + heads,
                chain=mask == "chain")
    builder_cls = gpu_backend.HybridFlashAttentionMetadataBuilder
    builder = builder_cls.__new__(builder_cls)
    builder.layer_names = LAYERS
    metadata = builder.build(0, case.common_metadata())
    plan = builder.plan(case.tree_masks(), case.qsl.tolist(), metadata)
    metadata = builder.with_plan(metadata, plan)
    assert metadata.tree_rows.rows == list(TREE_ROWS)
    assert torch.equal(metadata.tree_rows.block_table,
                       case.paged.block_table[list(TREE_ROWS)])
    assert metadata.tree_rows.prefix_lens.tolist() == [PREFIX_LENS[r] for r in TREE_ROWS]
    impl = gpu_backend.HybridFlashAttentionImpl(heads, head_size, case.scale, kv_heads,
                                                None, None, "auto")
    assert gpu_backend.flash_prefix(impl.vllm_flash_attn_version)[0] == "triton"
    output = nan_like(case.query)
    impl.forward(types.SimpleNamespace(), case.query, case.key, case.value, case.kv_cache,
                 metadata, output)
    rows = case.tree_token_index()
    others = torch.ones(len(output), dtype=torch.bool)
    others[rows] = False
    assert torch.all(output[others] == STOCK_MARK), "rows without a tree: vLLM's result"
    assert_close(output[rows], case.expected_tree_rows()[rows], dtype)


def test_builder_without_rows_to_verify_adds_nothing(monkeypatch):
    from vllm.v1.attention.backends import flash_attn

    monkeypatch.setattr(flash_attn.FlashAttentionMetadataBuilder, "build",
                        _stock_build_stand_in)
    case = Case(torch.float32, 4, 2, 64, seed=0, chain=False)
    builder_cls = gpu_backend.HybridFlashAttentionMetadataBuilder
    builder = builder_cls.__new__(builder_cls)
    builder.layer_names = LAYERS
    metadata = builder.build(0, case.common_metadata())
    assert builder.plan({}, case.qsl.tolist(), metadata) is None
    assert builder.with_plan(metadata, None) is metadata


def _fake_flash_prefix(query, k, v, block_table, prefix_lens, cu_seqlens_q, scale):
    """FlashAttention's contract: lse comes back [num_heads, num_tokens]."""
    out, lse = paged_prefix.reference(
        query, k.transpose(1, 2), v.transpose(1, 2), block_table, prefix_lens,
        cu_seqlens_q, scale)
    return out.to(query.dtype), lse.float().t().contiguous()


@pytest.mark.parametrize("source", ["flash-attn", "vllm-flash-attn"])
def test_flash_attention_prefix_adapters(triton_ops, monkeypatch, source):
    from vllm.v1.attention.backends import fa_utils

    case = Case(torch.float16, 6, 2, 64, seed=5, chain=False)
    plan = TreeRows.build(case.tree_masks(), case.qsl.tolist(),
                          case.seq_lens.to(torch.int32), int(case.seq_lens.max())
                          ).with_block_table(case.paged.block_table)
    calls = []

    def package_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       softmax_scale, causal, block_table, return_attn_probs):
        assert causal is False and return_attn_probs is True
        assert max_seqlen_q == max(QUERY_LENS[r] for r in TREE_ROWS)
        assert max_seqlen_k >= max(PREFIX_LENS[r] for r in TREE_ROWS)
        calls.append(source)
        prefix_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
        out, lse = _fake_flash_prefix(q, k, v, block_table, prefix_lens, cu_seqlens_q,
                                      softmax_scale)
        return out, lse, None

    def vllm_varlen(*, q, k, v, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k,
                    softmax_scale, causal, block_table, return_softmax_lse, fa_version):
        assert causal is False and return_softmax_lse is True and fa_version == 3
        calls.append(source)
        return _fake_flash_prefix(q, k, v, block_table, seqused_k, cu_seqlens_q,
                                  softmax_scale)

    if source == "flash-attn":
        monkeypatch.setitem(sys.modules, "flash_attn",
                            types.SimpleNamespace(flash_attn_varlen_func=package_varlen))
    else:
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails
        monkeypatch.setattr(fa_utils, "is_flash_attn_varlen_func_available", lambda: True)
        monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", vllm_varlen, raising=False)
    gpu_backend.flash_prefix.cache_clear()
    try:
        name, prefix = gpu_backend.flash_prefix(3)
    finally:
        gpu_backend.flash_prefix.cache_clear()
    assert name == source
    rows = plan.token_index
    key_cache, value_cache = case.kv_cache.transpose(1, 2).split(64, dim=-1)
    got = gpu_backend.verify_tree_rows(case.query[rows], case.key[rows], case.value[rows],
                                       key_cache, value_cache, plan, case.scale, prefix)
    assert calls == [source]
    assert_close(got, case.expected_tree_rows()[rows], torch.float16)


def test_backend_classes():
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    backend = gpu_backend.HybridFlashAttentionBackend
    assert backend.get_name() == "FLASH_ATTN"
    assert backend.get_impl_cls() is gpu_backend.HybridFlashAttentionImpl
    assert backend.get_builder_cls() is gpu_backend.HybridFlashAttentionMetadataBuilder
    assert (backend.get_builder_cls().get_cudagraph_support(None, None)
            == AttentionCGSupport.NEVER)
    fields = set(gpu_backend.HybridFlashAttentionMetadata.__dataclass_fields__)
    assert set(FlashAttentionMetadata.__dataclass_fields__) | {"tree_rows"} == fields


def test_gpu_registration_needs_the_gpu_switch(monkeypatch):
    import importlib

    from vllm.platforms import current_platform
    from vllm.v1.attention.backends import registry

    from vllm_longspec.kernels.tuning import GPU_ENV
    from vllm_longspec.patches.attention_backend import FLASH_BACKEND, register

    registered = []
    monkeypatch.setattr(registry, "register_backend",
                        lambda which, path: registered.append((which.name, path)))
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.delenv(GPU_ENV, raising=False)
    with pytest.raises(RuntimeError, match=GPU_ENV):
        register()
    monkeypatch.setenv(GPU_ENV, "1")
    register()
    assert registered == [("FLASH_ATTN", FLASH_BACKEND)]
    module, name = FLASH_BACKEND.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is gpu_backend.HybridFlashAttentionBackend


def test_unsupported_layers_are_named():
    impl = gpu_backend.HybridFlashAttentionImpl(
        4, 64, 0.125, 2, alibi_slopes=[0.5] * 4, sliding_window=64, kv_cache_dtype="auto",
        logits_soft_cap=30.0)
    impl.kv_cache_dtype = "fp8"  # FlashAttention refuses it on CPU at construction
    with pytest.raises(NotImplementedError) as error:
        impl._check_tree_support(None)
    for feature in ("KV-sharing", "ALiBi", "soft-capping", "sliding window",
                    "kv_cache_dtype=fp8"):
        assert feature in str(error.value)
    plain = gpu_backend.HybridFlashAttentionImpl(4, 64, 0.125, 2, None, None, "auto")
    plain._check_tree_support(torch.zeros(1))  # nothing to refuse
