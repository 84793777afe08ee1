"""The small C++ CPU kernel (``csrc/hybrid_attention.cpp``): its build and its call.

Built just in time with ``torch.utils.cpp_extension.load`` on first use (about
a minute on 2 cores; then cached under ``~/.cache/torch_extensions``, keyed by
the source and this CPU's instruction-set flags because it is compiled with
``-march=native``). ``load_cpu_extension()`` returns ``None`` when no compiler
is available or ``VLLM_LONGSPEC_CPU_EXTENSION=0``; callers then take their
plain-torch path.

One kernel serves two operations: the paged prefix with its log-sum-exp
(``paged_prefix.cpu``) and, with the new tokens as one more block of the same
online softmax, the whole hybrid attention (``hybrid.hybrid_attention``), so
the CPU needs no separate merge.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EXTENSION_ENV = "VLLM_LONGSPEC_CPU_EXTENSION"
SOURCE = Path(__file__).parent / "csrc" / "hybrid_attention.cpp"
HEAD_SIZES = (64, 128)
# Prefix blocks per work item of the C++ kernel; 0 = its own choice (split long
# prefixes only when several threads would otherwise idle). Tests force splits.
SPLIT_BLOCKS = 0
# bfloat16 through vdpbf16ps where the kernel was compiled for a CPU with
# AVX512_BF16 (``has_bf16_pairs()``); False widens to float32 (tests cover both).
BF16_PAIRS = True
_NO_TENSOR = torch.empty(0)
_NO_BITS = torch.empty(0, 0, dtype=torch.int32)


def _cpu_flags_digest() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = "unknown"
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


@functools.cache
def load_cpu_extension():
    if os.environ.get(EXTENSION_ENV, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=f"longspec_cpu_attention_{_cpu_flags_digest()}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-std=c++17"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, unsupported platform
        logger.warning("LongSpec CPU attention extension unavailable (%s); using the "
                       "plain-torch path", error)
        return None


def takes(query, keys, values, cpu_isa) -> bool:
    """Whether the kernel serves these inputs (built, head size, cache packing)."""
    return (load_cpu_extension() is not None and query.shape[2] in HEAD_SIZES
            and (cpu_isa == "amx" or (keys.stride(2) == 1 and values.stride(3) == 1)))


def run(query, key, value, keys, values, block_table, prefix_lens, query_start_loc,
        ancestor_bits, scale, cpu_isa, out, lse_out) -> None:
    """``key``/``value`` empty: the prefix alone (``lse_out`` filled); else the new
    tokens too, under ``ancestor_bits`` (None: causal). The kernel writes float32
    or the query dtype; other outputs via a copy."""
    result = out if out.dtype in (torch.float32, query.dtype) else torch.empty_like(query)
    load_cpu_extension().hybrid_attention(
        query, key, value, keys, values, block_table, prefix_lens.contiguous(),
        query_start_loc.contiguous(), _NO_BITS if ancestor_bits is None else ancestor_bits,
        float(scale), SPLIT_BLOCKS, cpu_isa == "amx", BF16_PAIRS, result,
        _NO_TENSOR if lse_out is None else lse_out)
    if result is not out:
        out.copy_(result)


def no_tensor() -> torch.Tensor:
    """The kernel's "absent" argument (the new tokens of a prefix-only call)."""
    return _NO_TENSOR
