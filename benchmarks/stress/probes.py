"""What a running ``vllm serve`` looks like from outside: its processes' memory,
its ``/metrics``, its health and its log."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

# vLLM names its engine processes (``setproctitle``); the server is the root.
ROLES = {"VLLM::EngineCore": "engine_core", "VLLM::Worker": "worker"}
MiB = 1 << 20


def server_processes(port: int) -> dict[str, psutil.Process]:
    """Role -> process of the ``vllm serve`` listening on ``port``, started by
    this process: the API server and every process below it."""
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if "serve" in cmdline and "--port" in cmdline and str(port) in cmdline:
            return _roles(child)
    raise LookupError(f"no vllm serve on port {port} below this process")


def _roles(root: psutil.Process) -> dict[str, psutil.Process]:
    roles = {"api_server": root}
    for proc in root.children(recursive=True):
        try:
            name = proc.name()
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        role = next((r for t, r in ROLES.items() if t in title or t in name), None)
        if role is None:
            continue  # multiprocessing's resource tracker and the like
        roles[role if role not in roles else f"{role}_{proc.pid}"] = proc
    return roles


def memory_mib(processes: dict[str, psutil.Process]) -> dict[str, dict[str, float]]:
    """Role -> {"rss": MiB, "uss": MiB} (USS: pages only that process holds)."""
    out = {}
    for role, proc in processes.items():
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            out[role] = {"rss": None, "uss": None}
            continue
        out[role] = {"rss": round(info.rss / MiB, 1), "uss": round(info.uss / MiB, 1)}
    return out


def alive(processes: dict[str, psutil.Process]) -> bool:
    return all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
               for p in processes.values())


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=30) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


_SAMPLE = re.compile(r"^(vllm:[A-Za-z0-9_:]+?)(\{[^}]*\})? (\S+)$")


def metrics(base: str) -> dict[str, float]:
    """``/metrics`` of vLLM, one number per metric (summed over labels;
    histogram buckets left out, their ``_sum`` and ``_count`` kept)."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1).endswith("_bucket"):
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        out[match.group(1)] = out.get(match.group(1), 0.0) + value
    return out


@dataclass
class LogWatch:
    """Reads what the server wrote to its log since the last call."""

    path: Path
    offset: int = 0

    def new_problems(self) -> dict:
        with open(self.path, errors="replace") as log:
            log.seek(self.offset)
            text = log.read()
            self.offset = log.tell()
        lines = text.splitlines()
        tracebacks = [_traceback_summary(lines, i) for i, line in enumerate(lines)
                      if line.startswith("Traceback")]
        return {
            "tracebacks": tracebacks,
            "error_lines": [line[-300:] for line in lines if " ERROR " in line][:50],
            "engine_dead": sum("EngineDeadError" in line for line in lines),
        }


def _traceback_summary(lines: list[str], start: int) -> str:
    """The traceback's last line (the exception) and the frame above it."""
    end = start + 1
    while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end]):
        end += 1
    exception = lines[end] if end < len(lines) else lines[-1]
    frame = next((line.strip() for line in reversed(lines[start:end])
                  if line.strip().startswith("File ")), "")
    return f"{exception.strip()[:300]} (at {frame[:200]})"
