"""Run one vLLM engine in its own process and report outputs and counters as JSON.

Usage: python engine_job.py JOB.json RESULT.json

Each end-to-end test starts engines through this script so that every engine
gets a fresh process (its own environment, memory and shutdown) and the tests
only compare results. A job names the engine settings and a list of phases, so
one engine serves every check of its configuration; a phase generates for all
prompts at once ("batch") or one prompt at a time ("single"), greedily (other
modes below), and records the token ids and the change of vLLM's counters
(spec-decode, prefix cache, preemptions) during the phase. A phase may set its
own "prompts", "max_tokens" and "ignore_eos" (else the job's), and
"reset_prefix_cache" to start from an empty prefix cache.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for held_kv

COUNTERS = (
    "vllm:spec_decode_num_drafts",
    "vllm:spec_decode_num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens",
    "vllm:prefix_cache_hits",
    "vllm:num_preemptions",
)


def read_counters(llm) -> dict:
    values: dict = {}
    for metric in llm.get_metrics():
        if metric.name in COUNTERS:
            values[metric.name] = values.get(metric.name, 0) + metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            values[metric.name] = list(metric.values)
    return values


def counter_delta(before: dict, after: dict) -> dict:
    delta = {}
    for name, value in after.items():
        if isinstance(value, list):
            old = before.get(name) or [0] * len(value)
            delta[name] = [a - b for a, b in zip(value, old, strict=True)]
        else:
            delta[name] = value - before.get(name, 0)
    return delta


def kv_bytes_per_group(llm, prompt, params) -> list[dict]:
    """Run one request step by step; after each decode step, the KV blocks and
    bytes it holds in every KV cache group (``kv_probe.held_kv``; needs
    VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    from benchmarks.longctx.kv_probe import held_kv

    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    llm.llm_engine.add_request("kv-probe", prompt, params)
    samples = []
    while llm.llm_engine.has_unfinished_requests():
        outputs = llm.llm_engine.step()
        if not any(o.outputs and o.outputs[0].token_ids for o in outputs):
            continue  # still in prefill
        samples.append(held_kv(scheduler))
    return samples


def start_engine(job: dict):
    from vllm import LLM

    return LLM(
        model=job["model"],
        dtype=job.get("dtype", "float32"),
        max_model_len=job.get("max_model_len", 8192),
        max_num_seqs=job.get("max_num_seqs", 8),
        max_num_batched_tokens=job.get("max_num_batched_tokens", 2048),
        enable_prefix_caching=job.get("enable_prefix_caching", True),
        speculative_config=job.get("speculative_config"),
        kv_cache_memory_bytes=job.get("kv_cache_memory_bytes", 3 << 30),
        enforce_eager=True,
        disable_log_stats=False,
        seed=0,
        **job.get("engine_args", {}),
    )


def run_phase(llm, job: dict, phase: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        temperature=0.0, max_tokens=phase.get("max_tokens", job.get("max_tokens")),
        ignore_eos=phase.get("ignore_eos", job.get("ignore_eos", False)))
    prompts = [TokensPrompt(prompt_token_ids=ids)
               for ids in phase.get("prompts", job.get("prompts", []))]
    if phase.get("reset_prefix_cache"):
        assert llm.reset_prefix_cache(), "prefix cache not reset"
    before = read_counters(llm)
    if phase["mode"] == "batch":
        outputs = llm.generate(prompts, params, use_tqdm=False)
    elif phase["mode"] == "single":
        outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    elif phase["mode"] == "chat":
        outputs = llm.chat(phase["messages"], params, use_tqdm=False)
    elif phase["mode"] == "samples":
        # The same prompt sampled num_samples times (one request each, no seed:
        # seeded requests skip the rejection sampler, ``runner/seeded.py``; the
        # engine's seed makes the run repeatable).
        settings = {key: phase[key] for key in ("temperature", "top_k", "top_p")
                    if key in phase}
        sampled = SamplingParams(max_tokens=phase["max_tokens"], **settings)
        prompt = TokensPrompt(prompt_token_ids=phase["prompt"])
        outputs = llm.generate([prompt] * phase["num_samples"], sampled, use_tqdm=False)
    elif phase["mode"] == "sampled":
        # Each request with its own settings: {"prompt": [...], "params": {...}}.
        requests = phase["requests"]
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=r["prompt"]) for r in requests],
            [SamplingParams(**r["params"]) for r in requests], use_tqdm=False)
    elif phase["mode"] == "kv_bytes":
        return {"samples": [kv_bytes_per_group(llm, p, params) for p in prompts]}
    elif phase["mode"] == "refused":
        # A request with these sampling settings must fail alone.
        from vllm.exceptions import VLLMValidationError

        refused = SamplingParams(max_tokens=4, **phase["sampling"])
        try:
            llm.generate([prompts[0]], refused, use_tqdm=False)
        except VLLMValidationError as error:
            return {"error": str(error)}
        return {"error": None}
    elif phase["mode"] == "text":
        outputs = llm.generate(phase["texts"], params, use_tqdm=False)
    else:
        raise ValueError(phase["mode"])
    return {
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outputs],
        "counters": counter_delta(before, read_counters(llm)),
    }


def run(job: dict) -> dict:
    """The job's phases on one engine; wall seconds of the start-up and of
    every phase (``seconds``) reported with them."""
    start = time.perf_counter()
    llm = start_engine(job)
    result: dict = {"phases": {}, "startup_seconds": time.perf_counter() - start}
    for phase in job["phases"]:
        start = time.perf_counter()
        outcome = run_phase(llm, job, phase)
        outcome["seconds"] = time.perf_counter() - start
        result["phases"][phase["name"]] = outcome
    return result


def main() -> None:
    job_path, result_path = sys.argv[1], sys.argv[2]
    with open(job_path) as f:
        job = json.load(f)
    os.environ.update(job.get("env", {}))
    result = run(job)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
