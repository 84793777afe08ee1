"""Results of a suite run: rows of metrics, ``results.json``, ``results.md``, plots.

One row per (setting, task, context length, batch size, method spec: e.g.
``longspec:2`` and ``longspec_tree:4,4,4,4`` are two methods), plus pooled
rows over all tasks ("all"). Speedups and output comparisons are against
plain decoding in the same (setting, task, context length, batch size).
Methods that could not run appear with the reason. A cell measured in several
rounds (``--rounds``) has one record per round.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.longctx.methods import BASELINE
from benchmarks.longctx.metrics import Record, divergences, round_metrics, speedup
from benchmarks.longctx.plan import CellKey
from benchmarks.longctx.prompt_file import BUCKET_TOKENS

ALL_TASKS = "all"


@dataclass
class Row:
    setting: str
    task: str
    bucket: str
    batch: int
    method: str
    status: str  # "ok" | "unavailable" | "missing"
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    speedup: float | None = None
    speedup_by_round: tuple[float | None, ...] = ()  # --rounds: round r's own ratio
    first_divergence: dict[str, int | None] | None = None  # per "prompt_id#copy"

    @property
    def identical(self) -> tuple[int, int] | None:
        """(requests identical to plain decoding, requests compared)."""
        if self.first_divergence is None:
            return None
        positions = self.first_divergence.values()
        return sum(p is None for p in positions), len(self.first_divergence)


def build_rows(keys: Sequence[CellKey], records: dict[CellKey, list[Record]],
               unavailable: dict[str, str]) -> list[Row]:
    """Rows for the planned cells (``records``: each cell's record per round
    measured); ``unavailable`` says why a method has none."""
    rows = []
    for key in keys:
        if key.method in unavailable:
            status, reason = "unavailable", unavailable[key.method]
        elif key not in records:
            status, reason = "missing", "not measured (engine failed or interrupted)"
        else:
            status, reason = "ok", None
        rows.append(_row(key, [key] if status == "ok" else [], records, status, reason))
    pooled = dict.fromkeys((k.setting, k.bucket, k.batch, k.method) for k in keys)
    tasks = {k.task for k in keys}
    for setting, bucket, batch, method in pooled if len(tasks) > 1 else []:
        group = [k for k in keys if (k.setting, k.bucket, k.batch, k.method)
                 == (setting, bucket, batch, method)]
        if all(k in records for k in group):
            key = CellKey(setting, method, ALL_TASKS, bucket, batch)
            rows.append(_row(key, group, records, "ok", None))
    return sorted(rows, key=_table_order(keys))


def _table_order(keys: Sequence[CellKey]):
    """Sort key: setting, task ("all" last), length, batch, then method, each in
    the order planned, so that the methods of one cell are adjacent."""
    def rank(values) -> dict:
        return {value: i for i, value in enumerate(dict.fromkeys(values))}

    settings, methods = rank(k.setting for k in keys), rank(k.method for k in keys)
    tasks = rank([k.task for k in keys] + [ALL_TASKS])
    buckets = rank(BUCKET_TOKENS)
    return lambda row: (settings[row.setting], tasks[row.task], buckets[row.bucket],
                        row.batch, methods[row.method])


def _baseline(key: CellKey) -> CellKey:
    return CellKey(key.setting, BASELINE, key.task, key.bucket, key.batch)


def _by_round(keys: Sequence[CellKey], records: dict[CellKey, list[Record]]
              ) -> list[list[Record]]:
    """Round r's records of the cells ``keys`` (the rounds all of them have)."""
    rounds = min(len(records[key]) for key in keys)
    return [[records[key][r] for key in keys] for r in range(rounds)]


def _row(key: CellKey, cells: list[CellKey], records: dict[CellKey, list[Record]],
         status: str, reason: str | None) -> Row:
    """The row of ``key``: the cell itself, or ``cells`` pooled (all tasks)."""
    row = Row(key.setting, key.task, key.bucket, key.batch, key.method, status, reason)
    if status != "ok":
        return row
    own = _by_round(cells, records)
    metrics = round_metrics(own)
    row.metrics = asdict(metrics)
    baseline_keys = [_baseline(k) for k in cells]
    if all(k in records for k in baseline_keys):
        baseline = _by_round(baseline_keys, records)
        plain = round_metrics(baseline)
        row.speedup = speedup(metrics.decode_tokens_per_s, plain.decode_tokens_per_s)
        row.speedup_by_round = tuple(
            speedup(mine, theirs) for mine, theirs in zip(
                metrics.decode_tokens_per_s_by_round, plain.decode_tokens_per_s_by_round,
                strict=False))
        if key.method != BASELINE:  # the first round's outputs
            row.first_divergence = divergences(own[0], baseline[0])
    return row


def write_json(path: Path, header: dict[str, Any], rows: list[Row]) -> None:
    rows_data = [asdict(row) | {"identical": row.identical} for row in rows]
    path.write_text(json.dumps(header | {"rows": rows_data}, indent=1) + "\n")


def _number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _speedup(row: Row) -> str:
    """The speedup, and with several rounds the range of the rounds' own."""
    rounds = [s for s in row.speedup_by_round if s is not None]
    if len(rounds) < 2:
        return _number(row.speedup)
    return f"{_number(row.speedup)} ({min(rounds):.2f}-{max(rounds):.2f})"


def _comparison(row: Row, greedy: bool) -> str:
    if row.method == BASELINE:
        return "reference"
    if row.identical is None:
        return "—"
    same, total = row.identical
    if not greedy:
        return "— (sampled)"
    if same == total:
        return f"identical {same}/{total}"
    earliest = min(p for p in row.first_divergence.values() if p is not None)
    return f"identical {same}/{total}, first diff at token {earliest}"


def markdown(header: dict[str, Any], rows: list[Row]) -> str:
    machine, software = header["machine"], header["software"]
    commit = (software["vllm_longspec_commit"] or "unknown")[:10]
    lines = [
        f"# Long-context benchmark ({header['prompt_set']})",
        "",
        f"Machine: {machine['cpu_model']}, {machine['usable_cores']} usable cores, "
        f"{machine['memory_gib']} GiB RAM; load average at start "
        f"{', '.join(f'{x:.1f}' for x in machine['loadavg_at_start'])}.",
        f"Software: vLLM {software['vllm']}, torch {software['torch']}, "
        f"vllm-longspec {commit}"
        f"{' (uncommitted changes)' if software['vllm_longspec_dirty'] else ''}; "
        f"LD_PRELOAD {software['ld_preload'] or 'unset'}.",
        f"Command: `{header['command']}` ({header['suite_wall_s'] / 60:.1f} min).",
    ]
    if measured := header.get("measurement"):
        lines.append(
            f"{measured['cells']} cells measured from {measured['first_cell_started']} "
            f"to {measured['last_cell_started']} (UTC starts; "
            f"{measured['cells_wall_s'] / 60:.1f} min inside cells); 1-minute load "
            f"average during cells: mean {measured['loadavg_1min_mean']:.1f}, "
            f"max {measured['loadavg_1min_max']:.1f}.")
    lines += ["", "Methods (the same engine settings for all):"]
    for name, info in header["methods"].items():
        if info["unavailable"]:
            lines.append(f"- `{name}`: {info['summary']} — **unavailable**: "
                         f"{info['unavailable']}")
        else:
            config = json.dumps(info["speculative_config"])
            lines.append(f"- `{name}`: {info['summary']}; `speculative_config={config}`")
    for job, failure in header["failures"].items():
        lines.append(f"- **engine failure** `{job}`: {failure}")
    if header.get("draft"):
        draft = header["draft"]
        lines.append(f"- LongSpec draft: `{draft['path']}`"
                     + (" (**untrained**, random weights)" if draft["untrained"] else ""))
    lines += ["", "Definitions of every column: docs/benchmarks.md.", ""]
    for setting in dict.fromkeys(row.setting for row in rows):
        greedy = setting.startswith("greedy")
        lines += [f"## {setting}", "",
                  "| task | context | batch | method | decode tok/s | speedup | "
                  "tokens/step | accepted length | acceptance by position | "
                  "TPOT p50 / p99 ms | output vs plain |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            if row.setting != setting:
                continue
            if row.status == "unavailable":
                continue  # listed with the reason under "Methods"
            prefix = f"| {row.task} | {row.bucket} | {row.batch} | {row.method} |"
            if row.status != "ok":
                lines.append(f"{prefix} {row.status} | | | | | | |")
                continue
            m = row.metrics
            depth = _draft_depth(header["methods"][row.method]["speculative_config"])
            by_position = " ".join(f"{a:.2f}"
                                   for a in m["acceptance_by_position"][:depth])
            lines.append(
                f"{prefix} {_number(m['decode_tokens_per_s'], 1)} | "
                f"{_speedup(row)} | {_number(m['tokens_per_step'])} | "
                f"{_number(m['mean_accepted_length'])} | {by_position or '—'} | "
                f"{_number(m['time_per_token_p50_ms'], 1)} / "
                f"{_number(m['time_per_token_p99_ms'], 1)} | "
                f"{_comparison(row, greedy)} |")
        lines.append("")
    if header.get("draft_memory"):
        lines += _draft_memory_table(header["draft_memory"])
    return "\n".join(lines)


def _draft_memory_table(by_context: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## KV memory of one decoding LongSpec request", "",
             "| context | prompt tokens | target KV MiB | draft KV MiB |",
             "|---|---|---|---|"]
    for bucket, probe in by_context.items():
        lines.append(f"| {bucket} | {probe['num_prompt_tokens']} | "
                     f"{probe['target_kv_bytes'] / 2**20:.1f} | "
                     f"{probe['draft_kv_bytes'] / 2**20:.2f} |")
    return lines + [""]


def _draft_depth(config: dict[str, Any] | None) -> int | None:
    """Positions worth showing for one method spec (each variant has its own
    config): a tree's depth (vLLM sizes the per-position counter by its node
    count, but counts accepted tokens per depth), a chain's K, else all."""
    if not config:
        return None
    if config.get("tree"):
        return len(config["tree"])
    return config.get("num_speculative_tokens")


def plot(rows: list[Row], out_dir: Path) -> list[Path]:
    """Speedup and accepted length vs context length, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    settings = dict.fromkeys(row.setting for row in rows if row.status == "ok")
    for setting in settings:
        for metric, label, file_stem in (
                ("speedup", "speedup over plain decoding", "speedup"),
                ("mean_accepted_length", "mean accepted length", "accepted_length")):
            path = out_dir / f"{file_stem}_{setting}.png"
            if _plot_metric(plt, rows, setting, metric, label, path):
                written.append(path)
    return written


def _plot_metric(plt, rows: list[Row], setting: str, metric: str, label: str,
                 path: Path) -> bool:
    def value(row: Row) -> float | None:
        return row.speedup if metric == "speedup" else row.metrics.get(metric)

    selected = [row for row in rows if row.setting == setting and row.status == "ok"
                and row.method != BASELINE and value(row) is not None]
    if not selected:
        return False
    tasks = list(dict.fromkeys(row.task for row in selected))
    columns = min(len(tasks), 3)
    figure, axes = plt.subplots((len(tasks) + columns - 1) // columns, columns,
                                figsize=(4.2 * columns, 3.4 * -(-len(tasks) // columns)),
                                squeeze=False, sharey=True, layout="constrained")
    colours = {method: f"C{i}" for i, method in
               enumerate(dict.fromkeys(row.method for row in selected))}
    for axis, task in zip(axes.flat, tasks, strict=False):
        for method, batch in dict.fromkeys((r.method, r.batch) for r in selected):
            points = sorted((BUCKET_TOKENS[r.bucket], value(r)) for r in selected
                            if (r.task, r.method, r.batch) == (task, method, batch))
            if not points:
                continue
            axis.plot(*zip(*points, strict=True), marker="o", color=colours[method],
                      linestyle="-" if batch == 1 else "--",
                      label=f"{method}, batch {batch}")
        if metric == "speedup":
            axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_title(task)
        axis.set_xticks(list(BUCKET_TOKENS.values()), list(BUCKET_TOKENS))
        axis.set_xlabel("context length (target tokens)")
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(tasks):]:
        axis.set_visible(False)
    for row_axes in axes:
        row_axes[0].set_ylabel(label)
    legend = {}
    for axis in axes.flat:
        for handle, name in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(name, handle)
    figure.legend(legend.values(), legend.keys(), loc="outside lower center",
                  ncols=min(len(legend), 4), fontsize="small")
    figure.suptitle(f"{label} ({setting})")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
