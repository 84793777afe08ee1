"""The README's first command: LongSpec on the default model, on a long real document.

    python -m vllm_longspec.demo [--draft DIR] [--max-tokens N] [--dtype float32]

Runs the default target (SmolLM2-135M-Instruct) twice on the same long prompt
(a real Python standard-library module the draft was not trained on, plus a
question about it), once plainly and once with LongSpec, each in its own
process; streams the LongSpec answer; then prints decode tokens/s of both (prefill excluded), the mean accepted
length, and whether the two answers are token-identical. The default dtype is
float32, where greedy speculative decoding must be exact (in bfloat16 verifying
several tokens at once rounds differently and flips near-ties; see README).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHIPPED_DRAFT = Path(__file__).parent / "drafts" / "smollm2-135m-instruct"
# A benchmark document (benchmarks/sources.txt): the shipped draft never saw it.
DOCUMENT_MODULE = "logging"
QUESTION = "\n\nExplain what the Python module above does and how its main classes fit together."


def build_prompt(tokenizer, context_tokens: int) -> list[int]:
    source_ids = tokenizer(inspect.getsource(__import__(DOCUMENT_MODULE)))["input_ids"]
    document = tokenizer.decode(source_ids[:context_tokens])
    return list(tokenizer.apply_chat_template(
        [{"role": "user", "content": document + QUESTION}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def _spec_counters(llm) -> tuple[float, float]:
    drafts = accepted = 0.0
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_drafts":
            drafts += metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens":
            accepted += metric.value
    return drafts, accepted


def worker(args) -> None:
    """One engine: generate greedily, stream if asked, print a JSON result line."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = json.loads(Path(args.prompt_file).read_text())
    speculative_config = None
    if args.draft:
        speculative_config = {"method": "longspec", "model": args.draft}
        if args.k is not None:  # else the draft's recommendation
            speculative_config["num_speculative_tokens"] = args.k
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=8192,
              enforce_eager=True, kv_cache_memory_bytes=2 << 30,
              speculative_config=speculative_config, disable_log_stats=False, seed=0)
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    engine = llm.llm_engine
    engine.add_request("demo", TokensPrompt(prompt_token_ids=prompt), params)
    token_ids: list[int] = []
    first_token_time = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            new = list(output.outputs[0].token_ids)[len(token_ids):]
            if new and first_token_time is None:
                first_token_time = time.perf_counter()
            if args.stream and new:
                print(tokenizer.decode(new), end="", flush=True)
            token_ids.extend(new)
    end = time.perf_counter()
    if args.stream:
        print(flush=True)
    drafts, accepted = _spec_counters(llm)
    decode_tokens = len(token_ids) - 1  # the first token comes from prefill
    result = {
        "token_ids": token_ids,
        "decode_tokens_per_s": decode_tokens / max(end - first_token_time, 1e-9),
        "mean_accepted_length": 1 + accepted / drafts if drafts else None,
        "num_speculative_tokens": (
            llm.llm_engine.vllm_config.speculative_config.num_speculative_tokens
            if speculative_config else None),
    }
    print("RESULT " + json.dumps(result), flush=True)


def _run_worker(args, prompt_file: Path, draft: str | None, stream: bool) -> dict:
    command = [sys.executable, "-m", "vllm_longspec.demo", "--worker",
               "--prompt-file", str(prompt_file), "--model", args.model,
               "--dtype", args.dtype, "--max-tokens", str(args.max_tokens)]
    if args.k is not None:
        command += ["--k", str(args.k)]
    if draft:
        command += ["--draft", draft]
    if stream:
        command.append("--stream")
    # vLLM logs to stdout; keep the streamed answer readable.
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif stream:
            print(line, end="", flush=True)
    stderr = proc.stderr.read()
    if proc.wait() != 0 or result is None:
        sys.exit(f"engine failed:\n{stderr[-4000:]}")
    return result


def _untrained_draft(model: str) -> str:
    from vllm_longspec.model.checkpoint import random_draft_state, save_draft

    target_config = json.loads((Path(model) / "config.json").read_text())
    directory = Path(tempfile.mkdtemp(prefix="longspec-untrained-draft-"))
    save_draft(directory, random_draft_state(target_config), target_config, {})
    return str(directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", help="LongSpec draft directory "
                        "(default: the draft shipped in the package)")
    parser.add_argument("--model", help="target model directory (default: SmolLM2)")
    parser.add_argument("--context-tokens", type=int, default=4000)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--k", type=int, help="num_speculative_tokens (default: the "
                        "draft's recommended value, else 4)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    from transformers import AutoTokenizer

    from vllm_longspec.assets import ensure_default_target

    args.model = args.model or str(ensure_default_target())
    draft = args.draft
    if draft is None and (SHIPPED_DRAFT / "config.json").exists():
        draft = str(SHIPPED_DRAFT)
    elif draft is None:
        draft = _untrained_draft(args.model)
        print("NOTE: no trained draft ships with this version yet, so this run uses "
              "a randomly initialised draft: it shows the pipeline and that the "
              "output is unchanged, not a speedup (pass --draft DIR for a trained "
              "one).\n")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompt = build_prompt(tokenizer, args.context_tokens)
    prompt_file = Path(tempfile.mkdtemp(prefix="longspec-demo-")) / "prompt.json"
    prompt_file.write_text(json.dumps(prompt))

    print(f"Prompt: the source of Python's `{DOCUMENT_MODULE}` module "
          f"({len(prompt)} tokens) and a question about it.\n")
    print(f"--- LongSpec answer (draft {draft}, {args.dtype}) ---", flush=True)
    spec = _run_worker(args, prompt_file, draft, stream=True)
    print("\n--- plain vLLM decoding, same prompt ---", flush=True)
    plain = _run_worker(args, prompt_file, None, stream=False)

    identical = spec["token_ids"] == plain["token_ids"]
    speedup = spec["decode_tokens_per_s"] / plain["decode_tokens_per_s"]
    print(f"\nplain decoding:     {plain['decode_tokens_per_s']:7.1f} tokens/s")
    print(f"LongSpec decoding:  {spec['decode_tokens_per_s']:7.1f} tokens/s "
          f"({speedup:.2f}x)")
    print(f"mean accepted length (incl. bonus token): {spec['mean_accepted_length']:.2f} "
          f"of at most {spec['num_speculative_tokens'] + 1}")
    print(f"outputs token-identical: {'yes' if identical else 'NO'}")
    if not identical and args.dtype != "float32":
        print("(in bfloat16, verifying several tokens in one forward rounds "
              "differently from one-token decoding and can flip near-ties)")


if __name__ == "__main__":
    main()
