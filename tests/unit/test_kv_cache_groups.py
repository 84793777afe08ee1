"""The target's layers regrouped next to the draft's window group (no engine).

``patches/kv_cache_groups.py`` takes vLLM's split of a full-attention target
plus the draft's window layer (one group per layer) and merges the target's
groups G by G. These tests run vLLM's own ``get_kv_cache_groups`` on the specs
such an engine has, then the regrouping, and check what the KV cache manager
relies on: every layer in exactly one group, the window layer alone, target
groups of equal size with one spec, and anything else left as vLLM made it.
"""

from __future__ import annotations

import pytest
import torch

from vllm_longspec.patches.kv_cache_groups import group_size, regroup

DRAFT = "draft_model.layers.30.self_attn.attn"


def _specs(num_layers: int, draft_window: int | None = 513):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    specs = {f"model.layers.{i}.self_attn.attn": FullAttentionSpec(
        block_size=128, num_kv_heads=3, head_size=64, dtype=torch.float32)
        for i in range(num_layers)}
    if draft_window is not None:
        specs[DRAFT] = SlidingWindowSpec(block_size=128, num_kv_heads=3, head_size=64,
                                         dtype=torch.float32, sliding_window=draft_window)
    return specs


def _vllm_groups(specs):
    from vllm.v1.core import kv_cache_utils

    from vllm_longspec.patches import kv_cache_groups

    original = kv_cache_groups._orig_get_kv_cache_groups or kv_cache_utils.get_kv_cache_groups
    from vllm.config import VllmConfig

    config = VllmConfig()
    config.scheduler_config.disable_hybrid_kv_cache_manager = False
    config.cache_config.kv_cache_layout = "NHD"  # the engine core resolves it
    return original(config, dict(specs))


def _regroup(groups):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    return regroup(groups, FullAttentionSpec, SlidingWindowSpec)


@pytest.mark.parametrize("num_layers,expected", [
    (1, 1), (2, 2), (7, 1), (12, 4), (16, 4), (30, 6), (32, 4), (36, 6), (80, 8)])
def test_group_size_is_the_largest_divisor_up_to_the_square_root(num_layers, expected):
    assert group_size(num_layers) == expected
    assert num_layers % expected == 0


@pytest.mark.parametrize("num_layers", [2, 12, 30, 32])
def test_one_group_per_layer_becomes_a_few(num_layers):
    specs = _specs(num_layers)
    groups = _vllm_groups(specs)
    assert len(groups) == num_layers + 1  # what vLLM makes: the cost this removes
    merged = _regroup(groups)
    size = group_size(num_layers)
    assert len(merged) == num_layers // size + 1
    assert merged[-1].layer_names == [DRAFT]
    assert merged[-1].kv_cache_spec == specs[DRAFT]
    assert all(len(g.layer_names) == size for g in merged[:-1])
    assert all(g.kv_cache_spec == specs["model.layers.0.self_attn.attn"]
               for g in merged[:-1])
    names = [name for g in merged for name in g.layer_names]
    assert sorted(names) == sorted(specs)  # every layer once


def test_other_layouts_are_left_alone():
    # a target with one group already (no draft window): nothing to merge
    assert _regroup(_vllm_groups(_specs(30, draft_window=None))) is None
    # two window layers (a windowed target): not the draft's shape
    specs = _specs(6)
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    specs["model.layers.6.self_attn.attn"] = SlidingWindowSpec(
        block_size=128, num_kv_heads=3, head_size=64, dtype=torch.float32,
        sliding_window=4096)
    assert _regroup(_vllm_groups(specs)) is None
    # groups that already hold several layers
    groups = _vllm_groups(_specs(30))
    merged = _regroup(groups)
    assert _regroup(merged) is None
