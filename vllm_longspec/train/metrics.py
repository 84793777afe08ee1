"""Training metrics: one JSON line per logged step, and a loss-curve PNG.

``metrics.jsonl`` records step, stage, lr, loss, CE, KL, top-1 accuracy, grad
norm, tokens and tokens/s. On resume, lines past the checkpoint's step (logged
after the last checkpoint, before a crash) are dropped so the file matches the
resumed run. ``loss_curve.png`` is redrawn at every checkpoint (matplotlib,
Agg backend; skipped with a warning if matplotlib is missing).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a crash
                continue
        return records

    def truncate_after(self, step: int) -> None:
        if self.path.is_file():
            kept = [r for r in self.records() if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot_loss_curve(records: list[dict[str, Any]], png_path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss curve (pip install matplotlib)")
        return
    if not records:
        return
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for stage in dict.fromkeys(r["stage"] for r in records):
        rows = [r for r in records if r["stage"] == stage]
        axes.plot([r["step"] for r in rows], [r["loss"] for r in rows],
                  label=stage, linewidth=1)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("draft loss (nats/token)")
    axes.set_title("LongSpec draft training")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    tmp_path = png_path.with_name(f".{png_path.name}.tmp.png")
    figure.savefig(tmp_path, dpi=100)
    plt.close(figure)
    tmp_path.replace(png_path)
