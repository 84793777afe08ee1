"""What a LongSpec step costs when it speculates nothing, against plain vLLM.

    python -m benchmarks.step_overhead [--batch 8] [--reps 10] [--max-tokens 48]
        [--methods plain longspec] [--policy]

Issue 14's first bar is "never slower than plain decoding": at batch 8 on this
CPU the policy verifies almost nothing (K = 0 for every request), so a
LongSpec step that proposes nothing must cost what a plain step costs. Two
engines of different processes (``benchmarks/time_split.py``) differ by 10-20%
from one start to the next on this VM, far more than the overhead looked for;
so here both engines live in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
and their ``generate`` calls alternate ABBA (plain, LongSpec, LongSpec, plain,
...), ``--reps`` times each. Each call decodes ``--batch`` copies of the
``code-4k-concurrent`` prompt (prefix-cached after the first) for
``--max-tokens`` tokens, greedy, bfloat16.

LongSpec's policy is pinned at K = 0 for every request (``AdaptiveChains.plan``
still runs in full: lookup, statistics, costs; only its answer is replaced),
unless ``--policy``: then the defaults run as users get them, probes included.
Every phase of the engine step is timed by wrapping the runner's and the
scheduler's methods (milliseconds per step, summed over all calls).

Prints and writes ``benchmarks/results/step_overhead/results.{json,md}``: per
method the median wall time of a call and per-phase milliseconds per step,
and the policy's own account of its steps (``VLLM_LONGSPEC_POLICY_TRACE``:
steps that drafted, probes, K per source).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "benchmarks" / "prompts" / "longctx-v2.jsonl"
OUT = ROOT / "benchmarks" / "results" / "step_overhead"

# (module, class, method) timed per step; the first is the whole step
PHASES = [
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "execute_model"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_model_forward"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_prepare_inputs"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_build_attention_metadata"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "sample_tokens"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "propose_draft_token_ids"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "schedule"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output"),
    ("vllm.v1.sample.sampler", "Sampler", "forward"),
    ("vllm.v1.sample.rejection_sampler", "RejectionSampler", "forward"),
    ("vllm_longspec.runner.proposer", "LongSpecProposer", "propose"),
    ("vllm_longspec.runner.proposer", "LongSpecProposer", "_write_window"),
    ("vllm_longspec.runner.adaptive_chains", "AdaptiveChains", "plan"),
    ("vllm_longspec.speculation.policy", "SpeculationPolicy", "plan"),
    ("vllm_longspec.speculation.lookup", "ContextLookup", "sync"),
    ("vllm_longspec.speculation.lookup", "ContextLookup", "propose"),
]


class PhaseTimer:
    """Seconds and calls per (engine label, phase), from wrapped methods."""

    def __init__(self):
        self.label = "warm-up"
        self.seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()

    def wrap(self, module: str, cls: str, name: str) -> None:
        import importlib

        owner = getattr(importlib.import_module(module), cls)
        original, key = getattr(owner, name), f"{cls}.{name}"

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[self.label, key] += time.perf_counter() - start
                self.calls[self.label, key] += 1

        setattr(owner, name, timed)

    def per_step(self, label: str) -> dict[str, float]:
        steps = self.calls[label, "GPUModelRunner.execute_model"]
        return {key: round(seconds * 1e3 / steps, 3)
                for (lab, key), seconds in sorted(self.seconds.items(), key=lambda x: -x[1])
                if lab == label}


def pin_policy_at_zero() -> None:
    """Every request K = 0 after the full plan ran (the plan's own cost stays)."""
    from vllm_longspec.runner import adaptive_chains

    plan = adaptive_chains.AdaptiveChains.plan

    def plan_at_zero(self, *args, **kwargs):
        chosen = plan(self, *args, **kwargs)
        return dataclasses.replace(chosen, num_tokens=(0,) * len(chosen.num_tokens),
                                   draft_steps=0)

    adaptive_chains.AdaptiveChains.plan = plan_at_zero


def engine_config(spec: str) -> dict | None:
    """``NAME`` or ``NAME:K`` (``time_split`` methods) -> its speculative config; a
    bare LongSpec method leaves K to the plugin."""
    from benchmarks.time_split import speculative_config

    name, _, k = spec.partition(":")
    config = speculative_config(name, int(k) if k else 4)
    if config is not None and name.startswith("longspec") and not k:
        config.pop("num_speculative_tokens")
    return config


def make_engines(specs: list[str], warm_up_prompts) -> dict:
    """One in-process bfloat16 engine per spec, each warmed up once."""
    from vllm import LLM, SamplingParams

    from vllm_longspec.assets import ensure_default_target

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # the engines in this process
    model = str(ensure_default_target(progress=False))
    engines = {}
    for spec in specs:
        engines[spec] = LLM(model=model, dtype="bfloat16", max_model_len=8192,
                            enforce_eager=True, kv_cache_memory_bytes=2 << 30, seed=0,
                            speculative_config=engine_config(spec))
        engines[spec].generate(warm_up_prompts, SamplingParams(temperature=0, max_tokens=4),
                               use_tqdm=False)
    return engines


def alternate(engines: dict, prompts, params, reps: int,
              before_call=lambda spec: None) -> dict[str, list[float]]:
    """``reps`` calls of ``generate`` per engine, ABBA; the wall seconds of each."""
    specs = list(engines)
    walls: dict[str, list[float]] = {spec: [] for spec in specs}
    for rep in range(reps):
        for spec in specs if rep % 2 == 0 else specs[::-1]:
            before_call(spec)
            start = time.perf_counter()
            engines[spec].generate(prompts, params, use_tqdm=False)
            walls[spec].append(time.perf_counter() - start)
    return walls


def prompt_tokens(prompt_id: str) -> list[int]:
    for line in PROMPTS.read_text().splitlines():
        record = json.loads(line)
        if record["id"] == prompt_id:
            return record["prompt_token_ids"]
    raise SystemExit(f"no prompt {prompt_id!r} in {PROMPTS}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10, help="generate calls per method")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--methods", nargs=2, default=["plain", "longspec"],
                        metavar="NAME[:K]", help="two benchmarks.time_split methods "
                        "(plain, ngram, longspec, longspec_draft), K optional")
    parser.add_argument("--policy", action="store_true",
                        help="LongSpec's policy as shipped (default: pinned at K = 0)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "policy_trace.jsonl"
    trace.unlink(missing_ok=True)
    os.environ["VLLM_LONGSPEC_POLICY_TRACE"] = str(trace)

    timer = PhaseTimer()
    for phase in PHASES:
        timer.wrap(*phase)
    if not args.policy:
        pin_policy_at_zero()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=prompt_tokens("code-4k-concurrent"))
               ] * args.batch
    engines = make_engines(args.methods, prompts)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    walls = alternate(engines, prompts, params, args.reps,
                      before_call=lambda spec: setattr(timer, "label", spec))

    results = {method: {"wall_s_median": round(statistics.median(walls[method]), 4),
                        "wall_s": [round(w, 4) for w in walls[method]],
                        "steps_per_call": timer.calls[method, "GPUModelRunner.execute_model"]
                        / args.reps,
                        "ms_per_step": timer.per_step(method)} for method in engines}
    base, other = args.methods
    ratio = results[other]["wall_s_median"] / results[base]["wall_s_median"]
    report = {"batch": args.batch, "reps": args.reps, "max_tokens": args.max_tokens,
              "policy": "shipped" if args.policy else "pinned at K = 0",
              "wall_ratio": round(ratio, 4), "results": results}
    from vllm_longspec.runner.adaptive_chains import summarise_trace

    report["policy_trace"] = summarise_trace(str(trace)) if trace.exists() else None
    trace.unlink(missing_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "results.md").write_text(_markdown(report, args))
    print(_markdown(report, args))


def _markdown(report: dict, args) -> str:
    base, other = args.methods
    rows = report["results"]
    keys = list(rows[other]["ms_per_step"])
    keys += [k for k in rows[base]["ms_per_step"] if k not in keys]
    lines = [
        "# LongSpec's step against plain decoding's, two engines in one process",
        "",
        f"Command: `python -m benchmarks.step_overhead --batch {args.batch} --reps "
        f"{args.reps} --max-tokens {args.max_tokens} --methods {base} {other}"
        f"{' --policy' if args.policy else ''}` (bfloat16, `code-4k-concurrent`, "
        f"{args.batch} copies; LongSpec's policy {report['policy']}).",
        "",
        f"Median wall time of a call: {base} {rows[base]['wall_s_median']:.3f} s, {other} "
        f"{rows[other]['wall_s_median']:.3f} s: {other} / {base} = "
        f"{report['wall_ratio']:.3f}.",
        "",
        f"Steps per call: {base} {rows[base]['steps_per_call']}, {other} "
        f"{rows[other]['steps_per_call']}. Policy trace (its plans as it made them, "
        f"before any pin; every step of the run, warm-up included): "
        f"{json.dumps(report['policy_trace'])}.",
        "",
        f"| phase (ms per step) | {base} | {other} | difference |",
        "|---|---|---|---|",
    ]
    for key in keys:
        a = rows[base]["ms_per_step"].get(key, 0.0)
        b = rows[other]["ms_per_step"].get(key, 0.0)
        lines.append(f"| `{key}` | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
