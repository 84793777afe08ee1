"""The memory probe's thread (see ``sitecustomize.py`` here)."""

from __future__ import annotations

import collections
import gc
import json
import os
import sys
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

FRAMES = 8
TOP = 40
POLL_S = 0.5


def start(directory: str) -> None:
    """Start the watching thread; tracemalloc starts at the first request (it
    would slow the server's start-up many times over)."""
    threading.Thread(target=_watch, args=(Path(directory),), daemon=True,
                     name="memprobe").start()
    os.register_at_fork(after_in_child=lambda: start(directory))


def _watch(directory: Path) -> None:
    request = directory / "request"
    seen = request.read_text() if request.exists() else None
    baseline = None
    while True:
        time.sleep(POLL_S)
        try:
            label = request.read_text()
        except OSError:
            continue
        if label == seen or not label:
            continue
        seen = label
        if not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)])
        if baseline is None:
            baseline = snapshot
        report = {"label": label, "pid": os.getpid(), "title": _title(),
                  "rss_mib": _rss_mib(), "objects": _objects(), "tensors": _tensors(),
                  "traced_mib": tracemalloc.get_traced_memory()[0] / 2**20,
                  "grown": _grown(snapshot, baseline)}
        target = directory / f"{label}-{os.getpid()}.json"
        target.with_suffix(".tmp").write_text(json.dumps(report, indent=1))
        target.with_suffix(".tmp").rename(target)


def _title() -> str:
    try:
        return Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return sys.argv[0]


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return -1.0


def _objects() -> dict[str, int]:
    counts = collections.Counter(type(o).__name__ for o in gc.get_objects())
    return dict(counts.most_common(TOP))


def _tensors() -> dict:
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    shapes = collections.Counter()
    count = nbytes = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [o for o in objects if _is_tensor(o, torch)]
    for obj in tensors:
        try:
            count += 1
            nbytes += obj.element_size() * obj.nelement()
            shapes[f"{tuple(obj.shape)} {obj.dtype}"] += 1
        except Exception:  # noqa: BLE001 - half-built objects during gc
            continue
    return {"count": count, "mib": nbytes / 2**20, "shapes": dict(shapes.most_common(TOP))}


def _is_tensor(obj, torch) -> bool:
    try:
        return isinstance(obj, torch.Tensor)
    except Exception:  # noqa: BLE001 - objects whose __class__ lookup fails
        return False


def _grown(snapshot, baseline) -> list[dict]:
    stats = snapshot.compare_to(baseline, "traceback")
    out = []
    for stat in stats[:TOP]:
        out.append({"size_diff_kib": stat.size_diff / 1024, "count_diff": stat.count_diff,
                    "size_kib": stat.size / 1024,
                    "where": [f"{f.filename}:{f.lineno}" for f in stat.traceback][-FRAMES:]})
    return out
