"""Training throughput on this machine: ``python -m vllm_longspec.train.bench``.

Live (default): times full optimiser steps (target forward, draft forward +
backward through the chunked LM-head loss, AdamW) on random tokens with AOI
positions, after one warm-up step, and prints tokens/s plus the share of the
target forward.

``--cached``: the real trainer on cached epochs. Builds a feature cache of
``--cache-sequences`` random-token sequences with ``features build``'s code
(its tokens/s is reported as ``build_tokens_per_s``), then runs ``Trainer``
from it (stage with ``features``, epochs over the cache) and reports the
training tokens/s of the steps after ``--warmup`` steps, from the trainer's
own ``step_seconds``. ``--write PREFIX`` stores PREFIX.json and PREFIX.md;
``--profile`` adds torch.profiler's top operators of one more step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm_longspec.train.model import new_draft
from vllm_longspec.train.step import (
    live_features,
    make_micro_batch,
    micro_batch_loss,
    step_generator,
)
from vllm_longspec.train.target import (
    lm_head_weight,
    load_target,
    read_target_config,
    run_target,
)
from vllm_longspec.train.vocab_map import VocabMap, read_draft_vocab

SHIPPED_DRAFT = Path(__file__).resolve().parents[1] / "drafts" / "smollm2-135m-instruct"


def _default_target() -> str:
    from vllm_longspec.assets import default_target_path

    return str(default_target_path())


def measure(
    target_path: str, seq_len: int, batch: int, steps: int, autocast: bool,
    distill_weight: float = 0.0, chunk_rows: int = 256, draft_vocab: str | None = None,
) -> dict[str, Any]:
    """Live steps: the target runs in every step."""
    target_config = read_target_config(target_path)
    target = load_target(target_path, torch.bfloat16)
    draft = new_draft(target_config, 512, seed=0)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-4, betas=(0.9, 0.95))
    vocab = VocabMap.build(target_config["vocab_size"],
                           read_draft_vocab(draft_vocab) if draft_vocab else None)
    head = vocab.head(lm_head_weight(target))
    step_seconds, target_seconds = [], []
    for step in range(steps + 1):  # step 0 warms up
        generator = step_generator(0, step)
        input_ids = torch.randint(0, target_config["vocab_size"], (batch, seq_len),
                                  generator=generator)
        micro_batch = make_micro_batch(
            input_ids, torch.ones_like(input_ids, dtype=torch.bool), generator,
            aoi=True, max_positions=target_config["max_position_embeddings"],
            max_anchors=4, noise_shift_range=(1, 4),
        )
        started = time.perf_counter()
        run_target(target, micro_batch.input_ids, micro_batch.position_ids)
        target_only = time.perf_counter() - started
        started = time.perf_counter()
        features = live_features(target, micro_batch,
                                 "full" if distill_weight > 0 else None)
        loss, _ = micro_batch_loss(
            draft, target, micro_batch, features, batch * (seq_len - 1), vocab, head,
            distill_weight=distill_weight, chunk_rows=chunk_rows,
            autocast_dtype=torch.bfloat16 if autocast else None,
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            step_seconds.append(time.perf_counter() - started)
            target_seconds.append(target_only)
    seconds = sum(step_seconds) / len(step_seconds)
    return {
        "mode": "live", "seq_len": seq_len, "batch": batch,
        "threads": torch.get_num_threads(), "autocast_bf16": autocast,
        "distill_weight": distill_weight, "draft_vocab": vocab.size,
        "step_seconds": round(seconds, 3),
        "tokens_per_s": round(batch * seq_len / seconds, 1),
        "target_forward_share": round(sum(target_seconds) / sum(step_seconds), 3),
    }


def _bench_config(root: Path, args: argparse.Namespace, target: str, steps: int):
    from vllm_longspec.train.config import config_from_dict

    stage = {
        "name": "bench", "sources": [{"type": "tokens", "paths": [str(root / "t.npy")]}],
        "seq_len": args.seq_len, "aoi": True, "steps": steps,
        "batch_tokens": args.seq_len * args.batch, "grad_accum": 1,
        "features": str(root / "features"),
    }
    return config_from_dict({
        "target": target, "output_dir": str(root / "run"), "stages": [stage],
        **({"num_threads": args.threads} if args.threads else {}),
        "exclude_list_file": None,
        "draft_vocab": args.draft_vocab or None, "checkpoint_every": 10**9,
        "distill_weight": args.distill_weight,
        "distill_top_k": args.top_k if args.distill_weight > 0 else None,
        "loss_chunk_rows": args.chunk_rows,
    })


def _profile_one_step(trainer, stage) -> str:
    from torch.profiler import ProfilerActivity, profile

    stream = trainer._stream_for(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer._train_step(stage, stream)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20,
                                     max_name_column_width=55)


def measure_cached(args: argparse.Namespace) -> dict[str, Any]:
    """Build a small cache, then time the real trainer's steps from it."""
    from vllm_longspec.train.features_build import build_features
    from vllm_longspec.train.trainer import Trainer

    target = args.target or _default_target()
    vocab_size = read_target_config(target)["vocab_size"]
    steps = args.warmup + args.steps
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="longspec-bench-") as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        pool = (read_draft_vocab(args.draft_vocab) if args.draft_vocab
                else np.arange(vocab_size))
        tokens = pool[rng.integers(0, pool.size, args.cache_sequences * args.seq_len + 1)]
        np.save(root / "t.npy", tokens.astype(np.uint32))
        config = _bench_config(root, args, target, steps)
        started = time.perf_counter()
        build_features(config, "bench", num_sequences=args.cache_sequences,
                       top_k=args.top_k, shard_sequences=args.cache_sequences)
        build_seconds = time.perf_counter() - started
        trainer = Trainer(config)
        trainer.run(max_steps=steps)
        records = trainer.metrics.records()
        timed = [r["step_seconds"] for r in records[args.warmup:steps]]
        profile_table = _profile_one_step(trainer, config.stages[0]) if args.profile else None
    seconds = statistics.mean(timed)
    batch_tokens = args.seq_len * args.batch
    result = {
        "mode": "cached", "seq_len": args.seq_len, "sequences_per_step": args.batch,
        "threads": torch.get_num_threads(), "draft_vocab": trainer.vocab.size,
        "distill_weight": args.distill_weight, "top_k": args.top_k,
        "cache_sequences": args.cache_sequences, "timed_steps": len(timed),
        "epochs_over_cache": round(steps * args.batch / args.cache_sequences, 2),
        "step_seconds": [round(s, 3) for s in timed],
        "tokens_per_s": round(batch_tokens / seconds, 1),
        "tokens_per_s_median": round(batch_tokens / statistics.median(timed), 1),
        "build_tokens_per_s": round(args.cache_sequences * args.seq_len / build_seconds, 1),
        "final_loss": records[-1]["loss"],
        # 1-minute load average: about the other work competing for the cores
        "loadavg_1min_before_after": [round(load_before[0], 2),
                                      round(os.getloadavg()[0], 2)],
    }
    if profile_table:
        result["profile"] = profile_table
    return result


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__}


def write_results(prefix: str, result: dict[str, Any], command: str, goal: float) -> None:
    record = {**result, "command": command, "machine": _machine(), "goal_tokens_per_s": goal}
    profile = record.pop("profile", None)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(record, indent=2) + "\n")
    verdict = "meets" if result["tokens_per_s"] >= goal else "misses"
    lines = [
        "# Training throughput (cached epochs)", "",
        f"`{command}`", "",
        f"{result['tokens_per_s']:.0f} training tokens/s (mean over {result['timed_steps']} "
        f"steps; median-step rate {result['tokens_per_s_median']:.0f}), which {verdict} "
        f"the goal of {goal:.0f}.", "",
        "| field | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in record.items() if k != "command"),
    ]
    if profile:
        lines += ["", "Top operators of one more step (torch.profiler):", "",
                  "```", profile.rstrip(), "```"]
    Path(f"{prefix}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_longspec.train.bench")
    parser.add_argument("--target", help="target model dir (default: SmolLM2-135M)")
    parser.add_argument("--cached", action="store_true",
                        help="the trainer on epochs of a feature cache (see module doc)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (--cached)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-autocast", action="store_true")
    parser.add_argument("--distill-weight", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=32, help="cached teacher logits")
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--draft-vocab", default=None,
                        help="draft dir or .npy (default: full vocabulary live, the "
                        "shipped draft's with --cached; 'none': full)")
    parser.add_argument("--cache-sequences", type=int, default=4)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--write", metavar="PREFIX", help="write PREFIX.json and PREFIX.md")
    parser.add_argument("--goal", type=float, default=1500.0)
    args = parser.parse_args(argv)
    if args.draft_vocab is None and args.cached:
        args.draft_vocab = str(SHIPPED_DRAFT)
    if args.draft_vocab == "none":
        args.draft_vocab = None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cached:
        result = measure_cached(args)
    else:
        result = measure(args.target or _default_target(), args.seq_len, args.batch,
                         args.steps, autocast=not args.no_autocast,
                         distill_weight=args.distill_weight, draft_vocab=args.draft_vocab)
    if args.write:
        command = "python -m vllm_longspec.train.bench " + shlex.join(
            sys.argv[1:] if argv is None else argv)
        write_results(args.write, result, command, args.goal)
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}))
    if "profile" in result:
        print(result["profile"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
