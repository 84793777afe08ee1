"""Accepted length against training tokens: the learning curve of one training run.

    python -m benchmarks.learning_curve --config CONFIG --every 16 \
        [--out benchmarks/results/learning_curve/NAME]

Trains CONFIG in stretches of ``--every`` optimiser steps (``vllm-longspec train
--max-steps``, resumed each time), exports the draft as it stands after each
stretch (``vllm-longspec train --export-checkpoint``, to OUTPUT_DIR/curve/step-N)
and scores it with the fixed offline evaluation ``benchmarks.train_ablation``
uses (``vllm-longspec evaluate``: greedy chains of K=4, 128 new tokens, the
first prompt of each task x bucket of the benchmark suite; documents no
training source reads). A run that starts from an exported draft
(``init_from``) gets that draft as its point at 0 tokens. When the run has
finished, its final ``draft/`` is the last point.

Each point goes to OUT/curve.json (step, training tokens, accepted length,
acceptance per position and per task, training seconds so far) and
OUT/curve.{md,png} are redrawn, so an interrupted curve is still a curve.
Resumable: run the same command again; points already scored are kept and the
training resumes from its checkpoint. Pause it (``kill -STOP`` on its process
group) while benchmarks run; it uses one thread (the config's ``num_threads``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.train_ablation import evaluate_draft, run


def load_run(config_file: Path) -> tuple[dict, Path]:
    config = json.loads(config_file.read_text())
    return config, Path(config.get("output_dir", "runs/longspec-draft")).expanduser()


def trained_summary(draft: Path) -> dict:
    return json.loads((draft / "config.json").read_text())["longspec"]["trained"]


def train_seconds(output_dir: Path, step: int) -> float:
    metrics = output_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0.0
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    return sum(r["step_seconds"] for r in records if r["step"] <= step)


def point(name: str, draft: Path, step: int, tokens: int, seconds: float,
          eval_dir: Path) -> dict:
    result = evaluate_draft(name, str(draft), eval_dir)
    return {"step": step, "tokens": tokens, "train_seconds": round(seconds, 3),
            "draft": str(draft),
            "accepted_length": result["sources"]["draft"]["tokens_per_round"],
            "acceptance_per_position": result["acceptance_per_position"]["draft"],
            "by_task": {task: row["draft"] for task, row in result["by_task"].items()},
            "eval_command": result["command"]}


def write(out: Path, points: list[dict], command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    points = sorted(points, key=lambda p: p["step"])
    (out / "curve.json").write_text(json.dumps({"command": command, "points": points},
                                               indent=1) + "\n")
    tasks = sorted(points[0]["by_task"]) if points else []
    lines = ["# Learning curve", "", f"Command: `{command}`", "",
             "Accepted length: tokens per verification round (bonus included), greedy "
             "chains of K=4, draft alone, `vllm-longspec evaluate` on the first prompt "
             "of each task x bucket of the benchmark suite.", "",
             "| step | training tokens | train min | accepted length | pos 1 | pos 2 | "
             "pos 3 | pos 4 | " + " | ".join(tasks) + " |",
             "|---" * (8 + len(tasks)) + "|"]
    for p in points:
        positions = " | ".join(f"{a:.3f}" for a in p["acceptance_per_position"])
        lines.append(f"| {p['step']} | {p['tokens']:,} | {p['train_seconds'] / 60:.0f} | "
                     f"**{p['accepted_length']:.3f}** | {positions} | "
                     + " | ".join(f"{p['by_task'][t]:.3f}" for t in tasks) + " |")
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([p["tokens"] / 1e6 for p in points],
              [p["accepted_length"] for p in points], marker="o", label="all tasks")
    for task in tasks:
        axis.plot([p["tokens"] / 1e6 for p in points], [p["by_task"][task] for p in points],
                  linewidth=0.8, alpha=0.6, label=task)
    axis.set_xlabel("training tokens (millions)")
    axis.set_ylabel("accepted length (K=4, greedy)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "curve.png", dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="training config (JSON)")
    parser.add_argument("--every", type=int, default=16, help="optimiser steps per point")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/"
                        "learning_curve/<config name>")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error("--every must be >= 1")
    config, output_dir = load_run(args.config)
    out = args.out or Path("benchmarks/results/learning_curve") / args.config.stem
    command = "python -m benchmarks.learning_curve " + " ".join(
        sys.argv[1:] if argv is None else argv)
    curve = out / "curve.json"
    points = json.loads(curve.read_text())["points"] if curve.exists() else []
    done = {p["step"] for p in points}
    eval_dir = output_dir / "curve"
    train = [sys.executable, "-m", "vllm_longspec.cli", "train", "--config",
             str(args.config)]
    if 0 not in done and config.get("init_from"):
        points.append(point("step-000000", Path(config["init_from"]), 0, 0, 0.0, eval_dir))
        write(out, points, command)
    while not (output_dir / "draft" / "model.safetensors").exists():
        resume = ["--resume"] if (output_dir / "checkpoint-last.pt").exists() else []
        run(train + resume + ["--max-steps", str(args.every)], output_dir / "train.log")
        if (output_dir / "draft" / "model.safetensors").exists():
            break   # that stretch finished the run
        run(train + ["--export-checkpoint", str(eval_dir / "draft")],
            output_dir / "train.log")
        summary = trained_summary(eval_dir / "draft")
        step = summary["steps"]
        if step not in done:
            points.append(point(f"step-{step:06d}", eval_dir / "draft", step,
                                summary["tokens"], train_seconds(output_dir, step),
                                eval_dir))
            done.add(step)
            write(out, points, command)
    summary = trained_summary(output_dir / "draft")
    if summary["steps"] not in done:
        points.append(point(f"step-{summary['steps']:06d}", output_dir / "draft",
                            summary["steps"], summary["tokens"],
                            train_seconds(output_dir, summary["steps"]), eval_dir))
        write(out, points, command)
    print(f"{len(points)} points: {out / 'curve.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
