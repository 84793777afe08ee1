"""The driver's side of the memory probe (``stress/memprobe/sitecustomize.py``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil

PROBE_PATH = Path(__file__).with_name("memprobe")
ENV = "VLLM_STRESS_MEMPROBE_DIR"
WAIT_S = 300


def server_env(directory: Path) -> dict[str, str]:
    """Environment for a server that should carry the probe."""
    directory.mkdir(parents=True, exist_ok=True)
    path = os.environ.get("PYTHONPATH")
    return {ENV: str(directory),
            "PYTHONPATH": f"{PROBE_PATH}{os.pathsep}{path}" if path else str(PROBE_PATH)}


def snapshot(directory: Path, label: str, processes: dict[str, psutil.Process]) -> dict:
    """Ask every probed process for a report; role -> its report (or None)."""
    (directory / "request").write_text(label)
    deadline = time.time() + WAIT_S
    out: dict[str, dict | None] = {}
    for role, proc in processes.items():
        path = directory / f"{label}-{proc.pid}.json"
        while not path.exists() and time.time() < deadline:
            time.sleep(1)
        out[role] = json.loads(path.read_text()) if path.exists() else None
    return {role: _summary(report) for role, report in out.items()}


def _summary(report: dict | None) -> dict | None:
    if report is None:
        return None
    return {"rss_mib": round(report["rss_mib"], 1),
            "traced_mib": round(report["traced_mib"], 1),
            "tensors": {"count": report["tensors"].get("count"),
                        "mib": round(report["tensors"].get("mib", 0.0), 1)},
            "top_grown": report["grown"][:5]}
