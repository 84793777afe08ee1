"""Patch: vLLM's attention backend registry entry ``CPU_ATTN`` (or ``FLASH_ATTN``).

Target: ``vllm.v1.attention.backends.registry.AttentionBackendEnum.CPU_ATTN``
    through vLLM's own ``register_backend`` (``FLASH_ATTN`` on a GPU, only with
    the GPU switch ``VLLM_LONGSPEC_GPU=1``: that backend is untested on GPU).
Why: tree verification needs attention under an arbitrary ancestor mask with
    the cached prefix (``attention/cpu_backend.py``, ``attention/flash_backend.py``);
    chains verify faster with it on CPU (one pass over the cached prefix for all
    of a row's tokens).
How: ``register`` points the entry at the hybrid backend class, whose builder
    and impl are vLLM's except for rows a step plans (every other row, and
    every call without a plan, is vLLM's code). Done in the worker by the
    runner patch in tree mode and for chains with ``hybrid_chains`` (where
    ``available``), before the model is built; in every process by the plugin
    when the user sets ``VLLM_LONGSPEC_HYBRID_ATTENTION=1``. Unlike
    the other patches it has no ``apply`` of its own: it is needed only then.
When it can go: when vLLM's CPU backend accepts an arbitrary per-request mask.
"""

from __future__ import annotations

import os

ENABLE_ENV = "VLLM_LONGSPEC_HYBRID_ATTENTION"
CPU_BACKEND = "vllm_longspec.attention.cpu_backend.HybridCPUAttentionBackend"
FLASH_BACKEND = "vllm_longspec.attention.flash_backend.HybridFlashAttentionBackend"


def requested_by_user() -> bool:
    return os.environ.get(ENABLE_ENV, "0") == "1"


def available() -> bool:
    """Whether ``register`` can serve this platform: the CPU backend, or the
    GPU one behind its switch (it has never run on a GPU)."""
    from vllm.platforms import current_platform

    from vllm_longspec.kernels.tuning import gpu_paths_enabled

    return current_platform.is_cpu() or gpu_paths_enabled()


def register() -> None:
    """Override this process's attention backend with the hybrid one (idempotent)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )

    from vllm_longspec.kernels.tuning import GPU_ENV, gpu_paths_enabled

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
        return
    if not gpu_paths_enabled():
        raise RuntimeError(
            "hybrid tree attention on a GPU uses a FlashAttention backend that has "
            f"never run on a GPU; set {GPU_ENV}=1 to use it anyway, or draft chains")
    register_backend(AttentionBackendEnum.FLASH_ATTN, FLASH_BACKEND)
