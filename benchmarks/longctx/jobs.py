"""Engine jobs of a suite run: which cells each engine process decodes, and running it.

A job is one (setting, method): one engine process (``worker.py``) that decodes
all the job's cells, once per round (``--rounds``: each round starts fresh
engines, in rotation). Cells whose cached record of that round carries the
same fingerprint are not run again. Each process reports progress on stdout
(``LONGCTX`` lines); everything else it prints goes to ``OUT/logs/<job>.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.longctx.kv_probe import draft_memory_env
from benchmarks.longctx.machine import REPOSITORY
from benchmarks.longctx.methods import MethodOptions, parse_spec, spec_slug
from benchmarks.longctx.plan import (
    Cell,
    CellKey,
    EngineSettings,
    Setting,
    fingerprint,
    request_groups,
)
from benchmarks.longctx.prompt_file import PROMPT_SET, PromptRecord
from benchmarks.longctx.worker import PROGRESS_PREFIX

Buckets = dict[tuple[str, str], list[PromptRecord]]  # (task, length) -> prompts


def method_options(args: argparse.Namespace, draft: dict[str, Any] | None
                   ) -> MethodOptions:
    return MethodOptions(draft["path"] if draft else None, args.k, tuple(args.tree))


@dataclass(frozen=True)
class Job:
    """One engine process: a method under a setting, and the cells it must run."""

    setting: Setting
    method: str  # canonical method spec
    speculative_config: dict[str, Any] | None
    cells: tuple[Cell, ...]

    @property
    def name(self) -> str:
        return f"{self.setting.name}-{spec_slug(self.method)}"


def plan(args: argparse.Namespace, engine: EngineSettings,
         prompts: Buckets, methods: list[str],
         draft: dict[str, Any] | None, vllm_version: str | None) -> list[Job]:
    options = method_options(args, draft)
    jobs = []
    for sampling in args.samplings:
        setting = Setting(sampling, args.dtype)
        for method in methods:
            config = parse_spec(method).config(options)
            # The draft's content, not its path, identifies the experiment.
            identity = (dict(config, model=draft["sha256"])
                        if config and config.get("model") else config)
            cells = []
            for (task, bucket), records in prompts.items():
                for batch in args.batch_sizes:
                    groups = request_groups(records, batch, token_cap(args, batch))
                    cells.append(Cell(
                        CellKey(setting.name, method, task, bucket, batch), groups,
                        fingerprint(prompt_set=PROMPT_SET, engine=engine,
                                    setting=setting, speculative_config=identity,
                                    groups=groups, vllm=vllm_version)))
            jobs.append(Job(setting, method, config, tuple(cells)))
    return jobs


def token_cap(args: argparse.Namespace, batch: int) -> int | None:
    """The cap on max_tokens for the requests of a cell of this batch size."""
    caps = [args.max_tokens] + ([args.batched_max_tokens] if batch > 1 else [])
    caps = [cap for cap in caps if cap]
    return min(caps) if caps else None


def cell_path(out: Path, cell: Cell, round_: int = 1) -> Path:
    return out / "cells" / cell.key.relative_path(round_)


def cached_record(path: Path, cell: Cell) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("fingerprint") == cell.fingerprint else None


@dataclass(frozen=True)
class Pending:
    """Cells one engine process still has to measure in one round."""

    job: Job
    round: int
    cells: tuple[Cell, ...]

    @property
    def name(self) -> str:
        return self.job.name if self.round == 1 else f"{self.job.name}.r{self.round}"


def load_cached(jobs: list[Job], out: Path, fresh: bool, rounds: int = 1
                ) -> tuple[dict[CellKey, list[dict[str, Any]]], list[Pending]]:
    """The records of every cell, one per round measured, and what is still to
    run: round by round, the jobs in rotation (round r starts at job r - 1), so
    that each method's engines are spread over the run rather than adjacent."""
    records: dict[CellKey, list[dict[str, Any]]] = {}
    pending = []
    for round_ in range(1, rounds + 1):
        shift = (round_ - 1) % len(jobs) if jobs else 0
        for job in jobs[shift:] + jobs[:shift]:
            todo = []
            for cell in job.cells:
                record = None if fresh else cached_record(cell_path(out, cell, round_),
                                                          cell)
                if record is None:
                    todo.append(cell)
                else:
                    records.setdefault(cell.key, []).append(record)
            if todo:
                pending.append(Pending(job, round_, tuple(todo)))
    return records, pending


def job_payload(pending: Pending, engine: EngineSettings, out: Path) -> dict[str, Any]:
    job = pending.job
    return {
        "engine": asdict(engine), "dtype": job.setting.dtype,
        "speculative_config": job.speculative_config,
        "temperature": job.setting.temperature,
        "cells": [{"key": asdict(cell.key), "label": cell.key.label(),
                   "fingerprint": cell.fingerprint,
                   "path": str(cell_path(out, cell, pending.round)),
                   "groups": [[asdict(r) for r in group] for group in cell.groups]}
                  for cell in pending.cells]}


def run_worker(name: str, payload: dict[str, Any], out: Path, progress: tqdm,
               env: dict[str, str] | None = None) -> str | None:
    """Run one engine process on ``payload``; None, or why it failed."""
    job_file, log_file = out / "jobs" / f"{name}.json", out / "logs" / f"{name}.log"
    job_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(json.dumps(payload))
    progress.set_postfix_str(f"{name}: starting engine")
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.longctx.worker", str(job_file)],
            cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=log, text=True,
            env={**os.environ, **(env or {})})
        for line in process.stdout:
            if not line.startswith(PROGRESS_PREFIX):
                log.write(line)
                continue
            event = json.loads(line[len(PROGRESS_PREFIX):])
            if event["event"] == "engine_ready":
                started = f"engine up in {event['start_s']:.0f} s"
                progress.set_postfix_str(f"{name}: {started}")
            else:  # a cell or a probe is done
                progress.set_postfix_str(f"{name}: {event['label']}")
                progress.update()
    if process.wait() != 0:
        return f"engine process exited with {process.returncode}; see {log_file}"
    return None


def run_pending(pending: list[Pending], probe: dict[str, Any] | None,
                engine: EngineSettings, out: Path) -> dict[str, str]:
    """Run the pending jobs in order (and the memory probe); the failures by
    job name."""
    failures = {}
    total = sum(len(todo.cells) for todo in pending)
    total += len(probe["kv_probe"]["prompts"]) if probe else 0
    print(f"{total} cells to run in {len(pending) + bool(probe)} engine processes",
          flush=True)
    with tqdm(total=total, unit="cell", dynamic_ncols=True) as progress:
        for todo in pending:
            failure = run_worker(todo.name, job_payload(todo, engine, out), out, progress)
            if failure:
                tqdm.write(f"{todo.name}: {failure}")
                failures[todo.name] = failure
        if probe:
            failure = run_worker("draft-memory", probe, out, progress,
                                 env=draft_memory_env())
            if failure:
                failures["draft-memory"] = failure
    return failures
