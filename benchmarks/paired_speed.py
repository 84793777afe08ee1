"""Two configurations' decoding speed, measured in one process, call by call.

    python -m benchmarks.paired_speed --methods longspec:4 longspec:8 \
        [--prompts code-4k-concurrent qa-4k-logging ...] [--batch 1] [--reps 4]
        [--max-tokens 128] [--out benchmarks/results/paired_speed/NAME]

For choices between two settings of one method (a default K, a policy knob)
whose difference is smaller than the 10-20% by which two engine processes
differ on this VM: both engines live in this process and their ``generate``
calls alternate ABBA per prompt (``benchmarks/step_overhead.py``), bfloat16,
greedy, ``--batch`` copies of each prompt of ``benchmarks/prompts/longctx-v2.jsonl``
(prefix-cached before timing). Methods as ``benchmarks.time_split`` names them,
with ``:K`` for num_speculative_tokens (a bare LongSpec method leaves K to the
plugin). At most two engines share a process (a third trips vLLM's kernel
registration on CPU, and so does ``ngram`` next to ``longspec``: "AttributeError:
'_lib_fn_wrapper' object has no attribute 'get'" in vLLM's triton dispatcher;
compare those with ``benchmarks.longctx_bench``).

Prints and writes ``results.{json,md}``: per prompt the median wall time of a
call for each method and the speed of the second relative to the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.step_overhead import ROOT, alternate, make_engines, prompt_tokens

DEFAULT_PROMPTS = ["code-4k-concurrent", "code-4k-urllib", "qa-4k-logging",
                   "qa-4k-debian-policy"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs=2, required=True, metavar="NAME[:K]")
    parser.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=4, help="calls per method and prompt")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "paired_speed")
    args = parser.parse_args(argv)

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    warm_up = [TokensPrompt(prompt_token_ids=[1, 2, 3] * 40)]
    engines = make_engines(args.methods, warm_up)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    first, second = args.methods
    rows = []
    for prompt_id in args.prompts:
        prompts = [TokensPrompt(prompt_token_ids=prompt_tokens(prompt_id))] * args.batch
        for engine in engines.values():   # the prompt into each prefix cache
            engine.generate(prompts, SamplingParams(temperature=0, max_tokens=1),
                            use_tqdm=False)
        walls = alternate(engines, prompts, params, args.reps)
        medians = {spec: statistics.median(walls[spec]) for spec in engines}
        rows.append({"prompt": prompt_id, "wall_s": walls,
                     "median_s": {s: round(m, 4) for s, m in medians.items()},
                     "speed": round(medians[first] / medians[second], 4)})
        print(f"{prompt_id}: {second} at {rows[-1]['speed']:.2f}x {first}", flush=True)
    report = {"methods": args.methods, "batch": args.batch, "reps": args.reps,
              "max_tokens": args.max_tokens, "prompts": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# {second} against {first}, two engines in one process", "",
             f"Command: `python -m benchmarks.paired_speed --methods {first} {second} "
             f"--prompts {' '.join(args.prompts)} --batch {args.batch} --reps {args.reps} "
             f"--max-tokens {args.max_tokens}` (bfloat16, greedy; ABBA calls).", "",
             f"| prompt | {first} s/call | {second} s/call | speed of {second} |",
             "|---|---|---|---|"]
    lines += [f"| {r['prompt']} | {r['median_s'][first]:.3f} | {r['median_s'][second]:.3f} "
              f"| {r['speed']:.2f}x |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
