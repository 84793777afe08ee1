"""The empty-batch top-k fix, and the vLLM bug it works around (no engine)."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.sample.ops import topk_topp_sampler

from vllm_longspec.patches import cpu_top_k_empty


def _original():
    return cpu_top_k_empty._orig_apply_top_k_only or topk_topp_sampler.apply_top_k_only


def test_vllm_still_fails_on_an_empty_top_k_batch():
    """When this fails, vLLM accepts 0 rows: drop the patch."""
    with pytest.raises(RuntimeError, match="numel\\(\\) == 0"):
        _original()(torch.empty(0, 10), torch.empty(0, dtype=torch.long))


def test_the_rejection_samplers_top_k_only_path_takes_an_empty_batch():
    cpu_top_k_empty.apply()
    empty = torch.empty(0, 10)
    # the call vLLM's rejection sampler makes on CPU when no request has drafts
    out = topk_topp_sampler.apply_top_k_top_p_pytorch(
        empty, torch.empty(0, dtype=torch.long), None, allow_cpu_sync=True)
    assert out.shape == (0, 10)


def test_other_batches_are_filtered_as_before():
    cpu_top_k_empty.apply()
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    k = torch.tensor([2, 1])
    got = topk_topp_sampler.apply_top_k_only(logits.clone(), k.clone())
    want = _original()(logits.clone(), k.clone())
    assert torch.equal(got, want)
    inf = float("-inf")  # ties with the k-th logit are kept
    assert torch.equal(got, torch.tensor([[3.0, 2.0, 2.0, inf, inf], [inf, inf, inf, inf, 4.0]]))
