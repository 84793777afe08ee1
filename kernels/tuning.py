"""Launch settings of the Triton kernels, and the one switch for GPU code paths.

``VLLM_LONGSPEC_GPU=1`` turns on what this project has never run on a GPU:
larger tiles, more warps and pipelining stages for these kernels, and the hybrid
FlashAttention backend for tree verification (``attention/flash_backend.py``).
UNTESTED ON GPU: the kernels have only run under ``TRITON_INTERPRET=1`` on CPU,
where the small defaults keep the interpreter fast. Correctness does not depend
on the tile sizes (they only change the iteration order).
"""

from __future__ import annotations

import os

GPU_ENV = "VLLM_LONGSPEC_GPU"


def gpu_paths_enabled() -> bool:
    return os.environ.get(GPU_ENV, "0") == "1"


def prefix_tiles() -> dict:
    """BLOCK_M query rows x BLOCK_N cache tokens per step of the split kernel."""
    if gpu_paths_enabled():
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 16, "BLOCK_N": 32}


def masked_launch() -> dict:
    return {"num_warps": 8, "num_stages": 1} if gpu_paths_enabled() else {}


def merge_launch() -> dict:
    return {"num_warps": 4} if gpu_paths_enabled() else {}


def default_num_splits(max_prefix_len: int, parallel_programs: int) -> int:
    """FlashDecoding splits: enough programs to fill the device, >= 256 tokens each."""
    target = 132 * 4 if gpu_paths_enabled() else 4  # H100/H200 have 132 SMs
    by_length = max(1, max_prefix_len // 256)
    by_occupancy = max(1, -(-target // max(1, parallel_programs)))
    return int(min(by_length, by_occupancy, 64))
