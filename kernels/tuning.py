"""Launch settings of the Triton kernels, and the one switch for GPU tuning.

``GPU_TUNING`` (env ``VLLM_LONGSPEC_TRITON_GPU_TUNING=1``) picks larger tiles,
more warps and pipelining stages meant for a real GPU. UNTESTED ON GPU: this
project has only run these kernels under ``TRITON_INTERPRET=1`` on CPU, where
the small defaults keep the interpreter fast. Correctness does not depend on
the switch (tile sizes only change the iteration order).
"""

from __future__ import annotations

import os

GPU_TUNING_ENV = "VLLM_LONGSPEC_TRITON_GPU_TUNING"
GPU_TUNING = os.environ.get(GPU_TUNING_ENV, "0") == "1"


def prefix_tiles() -> dict:
    """BLOCK_M query rows x BLOCK_N cache tokens per step of the split kernel."""
    if GPU_TUNING:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 16, "BLOCK_N": 32}


def masked_launch() -> dict:
    return {"num_warps": 8, "num_stages": 1} if GPU_TUNING else {}


def merge_launch() -> dict:
    return {"num_warps": 4} if GPU_TUNING else {}


def default_num_splits(max_prefix_len: int, parallel_programs: int) -> int:
    """FlashDecoding splits: enough programs to fill the device, >= 256 tokens each."""
    target = 132 * 4 if GPU_TUNING else 4  # H100/H200 have 132 SMs
    by_length = max(1, max_prefix_len // 256)
    by_occupancy = max(1, -(-target // max(1, parallel_programs)))
    return int(min(by_length, by_occupancy, 64))
