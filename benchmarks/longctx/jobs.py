"""Engine jobs of a suite run: which cells each engine process decodes, and running it.

A job is one (setting, method): one engine process (``worker.py``) that decodes
all the job's cells. Cells whose cached record carries the same fingerprint are
not run again. Each process reports progress on stdout (``LONGCTX`` lines);
everything else it prints goes to ``OUT/logs/<job>.log``.
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


def cell_path(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.key.relative_path()


def cached_record(path: Path, cell: Cell) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("fingerprint") == cell.fingerprint else None


def load_cached(jobs: list[Job], out: Path, fresh: bool
                ) -> tuple[dict[CellKey, dict[str, Any]], list[tuple[Job, list[Cell]]]]:
    """Records of cells already measured, and per job the cells still to run."""
    records, pending = {}, []
    for job in jobs:
        todo = []
        for cell in job.cells:
            record = None if fresh else cached_record(cell_path(out, cell), cell)
            if record is None:
                todo.append(cell)
            else:
                records[cell.key] = record
        if todo:
            pending.append((job, todo))
    return records, pending


def job_payload(job: Job, cells: list[Cell], engine: EngineSettings,
                out: Path) -> dict[str, Any]:
    return {
        "engine": asdict(engine), "dtype": job.setting.dtype,
        "speculative_config": job.speculative_config,
        "temperature": job.setting.temperature,
        "cells": [{"key": asdict(cell.key), "label": cell.key.label(),
                   "fingerprint": cell.fingerprint,
                   "path": str(cell_path(out, cell)),
                   "groups": [[asdict(r) for r in group] for group in cell.groups]}
                  for cell in cells]}


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


def run_pending(pending: list[tuple[Job, list[Cell]]], probe: dict[str, Any] | None,
                engine: EngineSettings, out: Path) -> dict[str, str]:
    """Run the pending jobs (and the memory probe); the failures by job name."""
    failures = {}
    total = sum(len(todo) for _, todo in pending)
    total += len(probe["kv_probe"]["prompts"]) if probe else 0
    print(f"{total} cells to run in {len(pending) + bool(probe)} engine processes",
          flush=True)
    with tqdm(total=total, unit="cell", dynamic_ncols=True) as progress:
        for job, todo in pending:
            failure = run_worker(job.name, job_payload(job, todo, engine, out), out,
                                 progress)
            if failure:
                tqdm.write(f"{job.name}: {failure}")
                failures[job.name] = failure
        if probe:
            failure = run_worker("draft-memory", probe, out, progress,
                                 env=draft_memory_env())
            if failure:
                failures["draft-memory"] = failure
    return failures
