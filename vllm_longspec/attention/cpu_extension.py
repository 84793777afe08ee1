"""Just-in-time build of the small C++ CPU kernel (``csrc/``), cached per CPU.

Built with ``torch.utils.cpp_extension.load`` on first use (about a minute on
2 cores; then cached under ``~/.cache/torch_extensions``, keyed by the source and
this CPU's instruction-set flags because it is compiled with ``-march=native``).
``load_cpu_extension()`` returns ``None`` when no compiler is available or
``VLLM_LONGSPEC_CPU_EXTENSION=0``; callers then take the plain-torch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

EXTENSION_ENV = "VLLM_LONGSPEC_CPU_EXTENSION"
SOURCE = Path(__file__).parent / "csrc" / "hybrid_attention.cpp"


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
