"""Training throughput on this machine: ``python -m vllm_longspec.train.bench``.

Times full optimiser steps (target forward, draft forward + backward through
the chunked LM-head loss, AdamW) on random tokens with AOI positions, after
one warm-up step, and prints tokens/s plus the share of the target forward.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vllm_longspec.train.model import new_draft
from vllm_longspec.train.step import make_micro_batch, micro_batch_loss, step_generator
from vllm_longspec.train.target import load_target, read_target_config, run_target


def measure(
    target_path: str, seq_len: int, batch: int, steps: int, autocast: bool,
    distill_weight: float = 0.0, chunk_rows: int = 256,
) -> dict[str, float]:
    target_config = read_target_config(target_path)
    target = load_target(target_path, torch.bfloat16)
    draft = new_draft(target_config, 512, seed=0)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-4, betas=(0.9, 0.95))
    vocab = target_config["vocab_size"]
    step_seconds, target_seconds = [], []
    for step in range(steps + 1):  # step 0 warms up
        generator = step_generator(0, step)
        input_ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
        micro_batch = make_micro_batch(
            input_ids, torch.ones_like(input_ids, dtype=torch.bool), generator,
            aoi=True, max_positions=target_config["max_position_embeddings"],
            max_anchors=4, noise_shift_range=(1, 4),
        )
        started = time.perf_counter()
        run_target(target, micro_batch.input_ids, micro_batch.position_ids)
        target_only = time.perf_counter() - started
        started = time.perf_counter()
        loss, _ = micro_batch_loss(
            draft, target, micro_batch, batch * (seq_len - 1),
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
        "seq_len": seq_len, "batch": batch, "threads": torch.get_num_threads(),
        "autocast_bf16": autocast, "distill_weight": distill_weight,
        "step_seconds": round(seconds, 3),
        "tokens_per_s": round(batch * seq_len / seconds, 1),
        "target_forward_share": round(sum(target_seconds) / sum(step_seconds), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_longspec.train.bench")
    parser.add_argument("--target", help="target model dir (default: SmolLM2-135M)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-autocast", action="store_true")
    parser.add_argument("--distill-weight", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target = args.target
    if target is None:
        from vllm_longspec.assets import default_target_path

        target = str(default_target_path())
    result = measure(target, args.seq_len, args.batch, args.steps,
                     autocast=not args.no_autocast, distill_weight=args.distill_weight)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
