"""Time the context lookup per request and step on the benchmark prompts.

    python -m benchmarks.lookup_timing [--steps 256] [--k 4] [--out FILE.json]

For each prompt, index all but its last ``--steps`` tokens (the prefill), then
per step append one token and propose k tokens, as the proposer would. The
same histories go through vLLM's jitted KMP matcher (``ngram`` proposer, min 2,
max 5, which scans the whole history each step) for reference. Pause other work
on the machine first: these are microseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from vllm_longspec.speculation.lookup import TokenIndex


def time_lookup(tokens: list[int], steps: int, k: int, max_ngram: int
                ) -> tuple[float, np.ndarray]:
    """(seconds to index the prefill, [steps] seconds per extend + propose)."""
    began = time.perf_counter()
    index = TokenIndex(tokens[:-steps], min_ngram=1, max_ngram=max_ngram)
    build = time.perf_counter() - began
    seconds = np.empty(steps)
    for i, token in enumerate(tokens[-steps:]):
        began = time.perf_counter()
        index.extend([token])
        index.propose(k)
        seconds[i] = time.perf_counter() - began
    return build, seconds


def time_vllm_kmp(tokens: list[int], steps: int, k: int) -> np.ndarray:
    from vllm.v1.spec_decode.ngram_proposer import (
        _find_longest_matched_ngram_and_propose_tokens as kmp,
    )

    history = np.asarray(tokens, dtype=np.int32)
    kmp(history[:8], 2, 5, 1 << 20, k)  # compile
    seconds = np.empty(steps)
    for i in range(steps):
        end = len(tokens) - steps + i + 1
        began = time.perf_counter()
        kmp(history[:end], 2, 5, 1 << 20, k)
        seconds[i] = time.perf_counter() - began
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="benchmarks/prompts/longctx-v1.jsonl")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-ngram", type=int, default=8)
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM's matcher")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    records = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()
               if line.strip()]
    rows: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        tokens = record["prompt_token_ids"]
        build, seconds = time_lookup(tokens, args.steps, args.k, args.max_ngram)
        row = rows[record["bucket"]]
        row["build_ms"].append(build * 1e3)
        row["lookup_us"].extend((seconds * 1e6).tolist())
        if not args.no_vllm:
            row["vllm_kmp_us"].extend((time_vllm_kmp(tokens, args.steps, args.k)
                                       * 1e6).tolist())
    summary = {}
    print("| bucket | prompts | index build ms (max) | lookup us median / p99 / max "
          "| vLLM KMP us median / p99 |\n|---|---|---|---|---|")
    for bucket, row in sorted(rows.items(), key=lambda item: int(item[0][:-1])):
        lookup = np.array(row["lookup_us"])
        kmp = np.array(row["vllm_kmp_us"]) if row["vllm_kmp_us"] else None
        summary[bucket] = {
            "prompts": len(row["build_ms"]), "build_ms_max": max(row["build_ms"]),
            "lookup_us": {"median": float(np.median(lookup)),
                          "p99": float(np.percentile(lookup, 99)), "max": float(lookup.max())},
            "vllm_kmp_us": None if kmp is None else {
                "median": float(np.median(kmp)), "p99": float(np.percentile(kmp, 99))}}
        kmp_text = "-" if kmp is None else (
            f"{np.median(kmp):.0f} / {np.percentile(kmp, 99):.0f}")
        print(f"| {bucket} | {len(row['build_ms'])} | {max(row['build_ms']):.1f} | "
              f"{np.median(lookup):.0f} / {np.percentile(lookup, 99):.0f} / "
              f"{lookup.max():.0f} | {kmp_text} |")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"command": "python -m benchmarks.lookup_timing " + " ".join(
                sys.argv[1:] if argv is None else argv),
             "steps": args.steps, "k": args.k, "max_ngram": args.max_ngram,
             "buckets": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
