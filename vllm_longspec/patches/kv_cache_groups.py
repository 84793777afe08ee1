"""Patch: ``vllm.v1.core.kv_cache_utils.get_kv_cache_groups``.

Target: the split of the model's attention layers into KV cache groups (one
    block table per group), run once when the engine sizes its KV cache.
Why: the draft's self-attention is a sliding window, so vLLM's hybrid KV cache
    manager keeps it in a group of its own and frees the blocks that leave the
    window (constant draft memory per request, as LongSpec promises). But vLLM
    makes every group hold as many layers as the smallest layer type has, so
    one window layer next to L full-attention layers gives L + 1 groups of one
    layer each. Each group costs every engine step a slot mapping, a block
    table commit, attention metadata and scheduler bookkeeping: with
    SmolLM2-135M (30 layers), input preparation, metadata and scheduling took
    2.99 ms per CPU decode step with 31 groups, 1.20 ms with the 6 groups
    below, 0.74 ms with one (measured, docs/benchmarks.md).
How: run the original; when LongSpec drafts and the result is exactly that
    shape (one single-layer group per full-attention target layer, all alike,
    and the draft's window layer alone), regroup the target's layers into
    groups of G layers, G the largest divisor of L not above ceil(sqrt(L))
    (6 for 30 layers: 5 target groups + the draft's). vLLM supports groups
    of unequal size as padding: each block id then reserves G pages, of which
    the draft's group uses one, so the draft's window costs G times its own
    pages, still constant per request (the window plus the speculative
    slots, whatever the context). Any other result is returned unchanged.
When it can go: when vLLM groups layers of different types into groups of
    different sizes without per-layer groups (or prices groups per step less).
"""

from __future__ import annotations

import dataclasses
import functools
import math

_orig_get_kv_cache_groups = None


def group_size(num_layers: int) -> int:
    """Layers per target group: the largest divisor of ``num_layers`` that is at
    most ceil(sqrt(num_layers)) (few groups, little padding in the draft's)."""
    bound = math.isqrt(num_layers - 1) + 1 if num_layers > 1 else 1
    return max(d for d in range(1, bound + 1) if num_layers % d == 0)


def regroup(groups: list, full_attention_type: type, window_type: type) -> list | None:
    """The target's single-layer groups merged G by G, the window group last
    as it was; None when ``groups`` is not one single-layer full-attention
    group per target layer (all with the same spec) plus one window group."""
    window = [g for g in groups if isinstance(g.kv_cache_spec, window_type)]
    full = [g for g in groups if type(g.kv_cache_spec) is full_attention_type]
    if (len(window) != 1 or len(window[0].layer_names) != 1
            or len(full) + 1 != len(groups) or len(full) < 2
            or any(len(g.layer_names) != 1 for g in full)
            or len({g.kv_cache_spec for g in full}) != 1):
        return None
    layers = [g.layer_names[0] for g in full]
    num_groups = len(layers) // group_size(len(layers))
    merged = [dataclasses.replace(full[0], layer_names=layers[i::num_groups])
              for i in range(num_groups)]
    return [*merged, window[0]]


def apply() -> None:
    global _orig_get_kv_cache_groups
    from vllm.v1.core import kv_cache_utils

    if _orig_get_kv_cache_groups is not None:
        return
    _orig_get_kv_cache_groups = kv_cache_utils.get_kv_cache_groups

    @functools.wraps(_orig_get_kv_cache_groups)
    def get_kv_cache_groups(vllm_config, kv_cache_spec):
        from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

        from vllm_longspec.patches.model_runner import is_longspec_speculation

        groups = _orig_get_kv_cache_groups(vllm_config, kv_cache_spec)
        if not is_longspec_speculation(vllm_config):
            return groups
        return regroup(groups, FullAttentionSpec, SlidingWindowSpec) or groups

    kv_cache_utils.get_kv_cache_groups = get_kv_cache_groups
