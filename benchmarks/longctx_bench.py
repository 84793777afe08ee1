"""Long-context speculative decoding benchmark: plain vLLM, ngram, suffix, LongSpec.

    python -m benchmarks.longctx_bench            # the default profile
    python -m benchmarks.longctx_bench --quick    # smoke profile (a few minutes)

Decodes prompts of the fixed set ``benchmarks/prompts/longctx-v2.jsonl`` (4
tasks x 3 context lengths x 4 prompts, built by ``benchmarks/build_prompts.py``)
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
prompt per (task, length) (the file has four: ``--prompts-per-bucket 4``
quadruples prefill and batch-1 time), each prompt's own ``max_tokens`` (96-256
by task) at batch size 1, at most 64 new tokens per request at batch size 8
(``--batched-max-tokens``), settings greedy and sampled in bfloat16
(``--dtype float32`` for exactness), methods
plain, ngram, suffix (only if ``arctic_inference`` imports) and LongSpec: 6
engines of roughly 10-13 minutes, mostly prefill of the 7k prompts and
decoding at batch size 8.
``--quick``: 1k only, one prompt per task, 16 tokens, batch size 1, greedy.
Flags given explicitly override the profile's values. ``--rounds R`` measures
every cell R times with fresh engines, the methods in rotation, and reports the
median (speed comparisons on this shared VM need R >= 3).

A ``--methods`` entry may carry parameters, so that one run compares several
LongSpec chain lengths and tree shapes (one engine per entry and setting):

    python -m benchmarks.longctx_bench --methods plain longspec:1 longspec:4 \\
        longspec_tree:4,4,4,4 longspec_tree:2,2,2

``longspec:K`` is a chain of K tokens, ``longspec_tree:W1,W2,...`` a tree with
those level widths; a bare ``longspec`` / ``longspec_tree`` uses ``--k`` /
``--tree``. The entry (canonical: ``longspec:04`` is ``longspec:4``) names the
method in the results; its cells go to ``cells/SETTING/longspec_tree-4-4-4-4/``.

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
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.longctx import report
from benchmarks.longctx.jobs import (
    Buckets,
    load_cached,
    method_options,
    plan,
    run_pending,
)
from benchmarks.longctx.kv_probe import draft_memory_payload, load_draft_memory
from benchmarks.longctx.machine import REPOSITORY, describe_machine, describe_software
from benchmarks.longctx.methods import (
    BASELINE,
    DEFAULT_TREE,
    MethodSpecError,
    chain_length,
    method_syntax,
    parse_spec,
    tree_widths,
)
from benchmarks.longctx.plan import CellKey, EngineSettings, Setting, directory_sha256
from benchmarks.longctx.prompt_file import (
    BUCKET_TOKENS,
    MANIFEST_FILE,
    PROMPT_FILE,
    PROMPT_SET,
    TASKS,
    file_sha256,
    read_prompts,
)

RESULTS_DIR = REPOSITORY / "benchmarks" / "results"
SHIPPED_DRAFT = REPOSITORY / "vllm_longspec" / "drafts" / "smollm2-135m-instruct"
DEFAULT_METHODS = ("plain", "ngram", "suffix", "longspec")


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


def method_spec(text: str) -> str:
    """``--methods`` entry -> its canonical spec (``longspec:04`` -> ``longspec:4``)."""
    try:
        return parse_spec(text).spec
    except MethodSpecError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def k_option(text: str) -> int:
    try:
        return chain_length(text)
    except MethodSpecError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--quick", action="store_true", help="small smoke profile")
    parser.add_argument("--methods", nargs="+", type=method_spec, metavar="METHOD",
                        default=list(DEFAULT_METHODS),
                        help=f"{method_syntax()}: e.g. longspec:2 (a chain of K=2), "
                        "longspec_tree:4,4,4,4 (those level widths); a bare longspec "
                        "/ longspec_tree uses --k / --tree; plain always runs "
                        f"(default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--lengths", nargs="+", choices=list(BUCKET_TOKENS))
    parser.add_argument("--batch-sizes", nargs="+", type=int)
    parser.add_argument("--settings", nargs="+", choices=("greedy", "sampled"),
                        dest="samplings")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                        help="target dtype: bfloat16 (what users serve in) for speed; "
                        "float32 for exactness (greedy outputs are compared with plain "
                        "decoding's; only float32 must be identical)")
    parser.add_argument("--prompts-per-bucket", type=int)
    parser.add_argument("--max-tokens", type=int, help="cap on every prompt's max_tokens")
    parser.add_argument("--batched-max-tokens", type=int,
                        help="cap on max_tokens in batches > 1 (0: none)")
    parser.add_argument("--draft", help="LongSpec draft directory, or 'random' for an "
                        f"untrained one (default: {SHIPPED_DRAFT.relative_to(REPOSITORY)} "
                        "if present)")
    parser.add_argument("--k", type=k_option,
                        help="LongSpec num_speculative_tokens of a bare longspec "
                        "(default: left to the plugin: 8 for adaptive chains, 4 for "
                        "fixed ones)")
    parser.add_argument("--tree", nargs="+", default=list(DEFAULT_TREE),
                        metavar="WIDTH", help="level widths of a bare longspec_tree "
                        f"(default {' '.join(map(str, DEFAULT_TREE))})")
    parser.add_argument("--model", help="target model directory (default: SmolLM2)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--draft-memory", action="store_true",
                        help="also measure the KV memory one LongSpec request holds "
                        "(target vs draft) at each context length (one more engine)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every cell R times, each round with fresh "
                        "engines and the methods in rotation; each cell's decode "
                        "tokens/s is the median of its rounds' (this VM's engines "
                        "differ by up to tens of percent)")
    parser.add_argument("--fresh", action="store_true", help="ignore cached cells")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from cached cells, run nothing")
    args = parser.parse_args(argv)
    try:
        args.tree = list(tree_widths([str(width) for width in args.tree]))
    except MethodSpecError as error:
        parser.error(f"argument --tree: {error}")
    # plain first (the reference), each spec once, in the order given.
    args.methods = list(dict.fromkeys([BASELINE, *args.methods]))
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


def describe_run(args: argparse.Namespace, argv: list[str] | None, start: float,
                 engine: EngineSettings, draft: dict[str, Any] | None,
                 methods: list[str], unavailable: dict[str, str],
                 prompts: Buckets) -> dict[str, Any]:
    """Everything results.json says about how its numbers were obtained."""
    options = method_options(args, draft)
    return {
        "suite": "longctx", "prompt_set": PROMPT_SET,
        "prompt_file_sha256": file_sha256(PROMPT_FILE),
        "command": shlex.join(["python", "-m", "benchmarks.longctx_bench",
                               *(sys.argv[1:] if argv is None else argv)]),
        "suite_wall_s": time.perf_counter() - start,
        "machine": describe_machine(), "software": describe_software(),
        "engine": asdict(engine), "draft": draft, "num_speculative_tokens": args.k,
        "tree": args.tree,
        "methods": {m: {"summary": parse_spec(m).summary(options),
                        "speculative_config": (None if m in unavailable
                                               else parse_spec(m).config(options)),
                        "unavailable": unavailable.get(m)} for m in methods},
        "rounds": args.rounds,
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
    options = method_options(args, draft)
    methods = args.methods  # canonical specs, plain first
    unavailable = {m: reason for m in methods
                   if (reason := parse_spec(m).unavailable(options))}
    runnable = [m for m in methods if m not in unavailable]
    engine = EngineSettings(model=str(model))
    jobs = plan(args, engine, prompts, runnable, draft, describe_software()["vllm"])
    records, pending = load_cached(jobs, args.out, args.fresh, args.rounds)

    probe = draft_memory = None
    longspec_runs = any(parse_spec(m).method.name.startswith("longspec")
                        for m in runnable)
    if args.draft_memory and longspec_runs:
        # The probe measures the draft's KV memory: a chain of --k tokens will do.
        longspec_config = parse_spec("longspec").config(options)
        longspec_config.setdefault("num_speculative_tokens", 4)
        probe = draft_memory_payload(args, engine, prompts, longspec_config,
                                     draft["sha256"])
        if not args.fresh:
            draft_memory = load_draft_memory(args.out / "draft_memory.json", probe)
    failures = {}
    if not args.report_only and (pending or (probe and draft_memory is None)):
        failures = run_pending(pending, None if draft_memory else probe, engine,
                               args.out)
        records = load_cached(jobs, args.out, fresh=False, rounds=args.rounds)[0]
        if probe:
            draft_memory = load_draft_memory(args.out / "draft_memory.json", probe)

    keys = [CellKey(Setting(sampling, args.dtype).name, method, task, bucket, batch)
            for sampling in args.samplings for method in methods
            for task, bucket in prompts for batch in args.batch_sizes]
    rows = report.build_rows(keys, records, unavailable)
    header = describe_run(args, argv, start, engine, draft, methods, unavailable,
                          prompts)
    header |= {"measurement": describe_measurement(
        [record for rounds in records.values() for record in rounds]),
               "failures": failures, "draft_memory": draft_memory}
    report.write_json(args.out / "results.json", header, rows)
    (args.out / "results.md").write_text(report.markdown(header, rows))
    plots = report.plot(rows, args.out)
    print(f"results: {args.out / 'results.md'}, results.json, {len(plots)} plots "
          f"({header['suite_wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
