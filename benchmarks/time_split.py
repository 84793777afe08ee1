"""Where a decode step's time goes, per method: target forward, drafting, the rest.

    python -m benchmarks.time_split [--prompt-id ID] [--max-tokens N] [--k K] [--batch B]
        [--methods plain ngram longspec longspec_fixed longspec_draft longspec_tree]
        [--tree W1 W2 ...] [--dtype bfloat16] [--rounds R] [--against REV ...]

Decodes one prompt of ``benchmarks/prompts/longctx-v2.jsonl`` (greedy; with
``--batch B``, B copies of it at once, as the long-context benchmark's batched
cells do) with plain vLLM, ``ngram`` and LongSpec (the shipped draft), each in its
own engine process with ``VLLM_LONGSPEC_TIME_SPLIT`` set
(``vllm_longspec/patches/step_timer.py``), and prints the mean milliseconds per decode
step of the target forward, the drafting and everything else, plus tokens per
step. With ``--rounds R`` the methods run R times in rotation (plain, ngram,
longspec, plain, ...) and each figure is the median over its R runs: on a
shared VM one engine's forward can run 10-20% slower than the next one's, and
rotating keeps that drift from landing on one method. ``--against REV ...`` also
runs every method with the plugin as it was at each git revision REV
(``name@REV`` in the output, in the same rotation): the check that a change
kept the speed.
Writes
``benchmarks/results/time_split.json`` (the medians, and every run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "benchmarks" / "prompts" / "longctx-v2.jsonl"
SHIPPED = ROOT / "vllm_longspec" / "drafts" / "smollm2-135m-instruct"


def speculative_config(method: str, k: int, tree: list[int] | None = None) -> dict | None:
    if method == "plain":
        return None
    if method == "longspec_tree":
        return {"method": "longspec", "model": str(SHIPPED), "tree": tree}
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k,
                "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    switches = {"longspec": {},  # the plugin's defaults
                "longspec_fixed": {"adaptive": False, "context_lookup": False},
                "longspec_draft": {"context_lookup": False}}[method]
    return {"method": "longspec", "model": str(SHIPPED), "num_speculative_tokens": k,
            **switches}


def worker(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = json.loads(Path(args.prompt_file).read_text())
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=8192, enforce_eager=True,
              kv_cache_memory_bytes=2 << 30, seed=0, disable_log_stats=False,
              speculative_config=speculative_config(args.method, args.k, args.tree))
    outputs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * args.batch,
                           SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
                           use_tqdm=False)
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    print("TOKENS " + json.dumps(tokens), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-id", default="code-4k-concurrent")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="copies of the prompt")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="bfloat16 (what users serve in) for speed")
    parser.add_argument("--methods", nargs="+", default=["plain", "ngram", "longspec"],
                        choices=["plain", "ngram", "longspec", "longspec_fixed", "longspec_draft",
                                 "longspec_tree"],
                        help="longspec: the plugin's defaults; longspec_fixed: the full "
                        "chain of K drafts every step (no adaptive chains, no context "
                        "lookup); longspec_draft: adaptive chains of the draft alone")
    parser.add_argument("--tree", type=int, nargs="+", default=[2, 2, 2],
                        help="level widths for the longspec_tree method")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the methods this many times in rotation; report medians")
    parser.add_argument("--against", metavar="REV", nargs="+", default=[],
                        help="also run each method with vllm_longspec at these git revisions")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/time_split.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    from vllm_longspec.assets import ensure_default_target


    model = str(ensure_default_target(progress=False))
    record = next(r for r in map(json.loads, PROMPTS.read_text().splitlines())
                  if r["id"] == args.prompt_id)
    workdir = Path(tempfile.mkdtemp(prefix="time-split-"))
    prompt_file = workdir / "prompt.json"
    prompt_file.write_text(json.dumps(record["prompt_token_ids"]))
    # variant name -> the directory the worker runs in (its vllm_longspec)
    checkouts = {rev: _checkout(rev, workdir / f"at-{rev}") for rev in args.against}
    variants = {}
    for method in args.methods:
        variants[method] = ROOT
        variants.update({f"{method}@{rev}": root for rev, root in checkouts.items()})
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, root in variants.items():
            split_file = workdir / f"{name}-{round_index}.jsonl"
            summary = _run_method(args, name.split("@")[0], model, prompt_file, split_file,
                                  root)
            runs[name].append(summary)
            print(f"{name:9s} " + "  ".join(f"{k}={v}" for k, v in summary.items()),
                  flush=True)
    results = {method: _median(summaries) for method, summaries in runs.items()}
    if args.rounds > 1:
        for method, summary in results.items():
            print(f"median {method:9s} " + "  ".join(f"{k}={v}" for k, v in summary.items()))
    Path(args.out).write_text(json.dumps({
        "prompt_id": args.prompt_id, "prompt_tokens": len(record["prompt_token_ids"]),
        "max_tokens": args.max_tokens, "k": args.k, "tree": args.tree, "batch": args.batch,
        "dtype": args.dtype, "rounds": args.rounds, "against": args.against,
        "results": results, "runs": runs}, indent=1) + "\n")


def _checkout(revision: str, directory: Path) -> Path:
    """``vllm_longspec`` as it was at ``revision`` next to this ``benchmarks``
    package: a worker started there imports that plugin (``python -m`` puts
    its working directory first on the path, and vLLM's engine process
    inherits the path)."""
    import io
    import shutil
    import tarfile

    archive = subprocess.run(["git", "archive", revision, "vllm_longspec"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    directory.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    shutil.copytree(ROOT / "benchmarks", directory / "benchmarks")
    return directory


def _run_method(args, method: str, model: str, prompt_file: Path, split_file: Path,
                root: Path = ROOT) -> dict:
    """One engine process decoding with ``method`` and the plugin found in
    ``root``; its per-decode-step means."""
    from vllm_longspec.patches.step_timer import ENV_VAR, summarise

    command = [sys.executable, "-m", "benchmarks.time_split", "--worker",
               "--method", method, "--model", model, "--prompt-file", str(prompt_file),
               "--max-tokens", str(args.max_tokens), "--k", str(args.k),
               "--batch", str(args.batch), "--dtype", args.dtype,
               "--tree", *map(str, args.tree)]
    env = {**os.environ, ENV_VAR: str(split_file), "VLLM_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    if proc.returncode != 0:
        sys.exit(f"{method} failed:\n{proc.stderr[-4000:]}")
    tokens = int(proc.stdout.split("TOKENS ")[-1].split()[0])
    per_request = (sum(args.tree) if method == "longspec_tree" else args.k) + 1
    summary = summarise(split_file, max_tokens_per_request=per_request)
    # Each request's first output token comes from prefill, the others from
    # decode steps; tokens per step counts all requests of a step.
    summary["tokens_per_step"] = round(
        (tokens - args.batch) / max(summary["decode_steps"], 1), 2)
    summary["ms_per_token"] = round(summary["step_ms"] / summary["tokens_per_step"], 2)
    return summary


def _median(summaries: list[dict]) -> dict:
    """Each figure's median over the runs (one run: that run)."""
    return {key: round(statistics.median(s[key] for s in summaries), 2)
            for key in summaries[0]}


if __name__ == "__main__":
    main()
