"""One vLLM engine in its own process: decode the cells of one job, record raw timings.

    python -m benchmarks.longctx.worker JOB.json

A job is one (method, setting): the engine arguments, the speculative config
and the cells to run (``longctx_bench.py`` writes it); or a KV-memory probe
(``kv_probe.py``) instead of cells. The engine starts once,
decodes a short warm-up, then runs every cell and writes its raw record to the
cell's path as soon as the cell is done (so an interrupted suite resumes from
there). Progress goes to stdout as ``LONGCTX {json}`` lines; anything else on
stdout or stderr is vLLM's log.

Requests are streamed through ``LLMEngine.step``. For every step the record
keeps the time it returned (seconds since the group's requests were added),
how many of the group's unfinished requests had no token yet when it began
(``prefilling``), and how many tokens each request received. ``metrics.py``
turns this into decode throughput and time per output token with prefill
excluded. vLLM's counters (spec-decode drafts and acceptances, preemptions)
are read before and after each cell; the record keeps the difference.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PROGRESS_PREFIX = "LONGCTX "
WARM_UP_PROMPT_TOKENS, WARM_UP_MAX_TOKENS = 128, 8

COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
    "vllm:num_preemptions": "preemptions",
}
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


def read_counters(llm) -> dict[str, Any]:
    """vLLM's cumulative counters this suite uses, summed over label sets."""
    values: dict[str, Any] = {name: 0 for name in COUNTERS.values()}
    values["accepted_per_position"] = []
    for metric in llm.get_metrics():
        if metric.name in COUNTERS:
            values[COUNTERS[metric.name]] += metric.value
        elif metric.name == PER_POSITION:
            summed = values["accepted_per_position"]
            summed.extend([0] * (len(metric.values) - len(summed)))
            for position, count in enumerate(metric.values):
                summed[position] += count
    return values


def counter_difference(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    difference = {name: after[name] - before[name] for name in COUNTERS.values()}
    old = before["accepted_per_position"]
    difference["accepted_per_position"] = [
        count - (old[i] if i < len(old) else 0)
        for i, count in enumerate(after["accepted_per_position"])]
    return difference


def sampling_params(request: dict[str, Any], temperature: float):
    from vllm import SamplingParams

    return SamplingParams(temperature=temperature, seed=request["seed"],
                          max_tokens=request["max_tokens"])


def decode_group(engine, group: list[dict[str, Any]], temperature: float,
                 name: str) -> dict[str, Any]:
    """Decode one group of requests concurrently; the raw trace of every step."""
    from vllm.inputs import TokensPrompt

    index_of = {f"{name}/{i}": i for i in range(len(group))}
    start = time.perf_counter()
    for request_id, i in index_of.items():
        engine.add_request(request_id,
                           TokensPrompt(prompt_token_ids=group[i]["prompt_token_ids"]),
                           sampling_params(group[i], temperature))
    token_ids: list[list[int]] = [[] for _ in group]
    finish_reasons: list[str | None] = [None] * len(group)
    steps = []
    while engine.has_unfinished_requests():
        prefilling = sum(1 for i in range(len(group))
                         if finish_reasons[i] is None and not token_ids[i])
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        emitted = [0] * len(group)
        for output in outputs:
            i = index_of[output.request_id]
            completion = output.outputs[0]
            emitted[i] = len(completion.token_ids) - len(token_ids[i])
            token_ids[i] = list(completion.token_ids)
            if output.finished:
                finish_reasons[i] = completion.finish_reason
        steps.append({"t": elapsed, "prefilling": prefilling, "emitted": emitted})
    return {
        "requests": [{"prompt_id": r["prompt_id"], "copy": r["copy"], "seed": r["seed"],
                      "num_prompt_tokens": len(r["prompt_token_ids"]),
                      "token_ids": ids, "finish_reason": reason}
                     for r, ids, reason in zip(group, token_ids, finish_reasons,
                                               strict=True)],
        "steps": steps,
    }


def run_cell(llm, cell: dict[str, Any], temperature: float) -> dict[str, Any]:
    before_counters, before_load = read_counters(llm), os.getloadavg()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    groups = [decode_group(llm.llm_engine, group, temperature, f"{cell['label']}/{g}")
              for g, group in enumerate(cell["groups"])]
    return {
        "key": cell["key"],
        "fingerprint": cell["fingerprint"],
        "started": started,
        "wall_s": time.perf_counter() - start,
        "loadavg_before": before_load,
        "loadavg_after": os.getloadavg(),
        "counters": counter_difference(before_counters, read_counters(llm)),
        "groups": groups,
    }


def warm_up(llm, first_group: list[dict[str, Any]], temperature: float) -> None:
    """Short requests through the same code paths (batched decode, drafting)."""
    group = [dict(request, max_tokens=WARM_UP_MAX_TOKENS,
                  prompt_token_ids=request["prompt_token_ids"][:WARM_UP_PROMPT_TOKENS])
             for request in first_group]
    decode_group(llm.llm_engine, group, temperature, "warm-up")


def build_engine(job: dict[str, Any]):
    from vllm import LLM

    return LLM(**job["engine"], dtype=job["dtype"],
               speculative_config=job["speculative_config"], disable_log_stats=False)


def report(event: dict[str, Any]) -> None:
    print(PROGRESS_PREFIX + json.dumps(event), flush=True)


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data))
    partial.replace(path)


def run_kv_probe(llm, probe: dict[str, Any]) -> None:
    from benchmarks.longctx.kv_probe import probe_request

    results = {}
    for prompt in probe["prompts"]:
        results[prompt["bucket"]] = dict(
            probe_request(llm, prompt["prompt_token_ids"], probe["max_tokens"]),
            prompt_id=prompt["prompt_id"])
        report({"event": "probe_done", "label": prompt["bucket"]})
    write_atomically(Path(probe["path"]), {"fingerprint": probe["fingerprint"],
                                           "by_context": results})


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    start = time.perf_counter()
    llm = build_engine(job)
    engine_start_s = time.perf_counter() - start
    report({"event": "engine_ready", "start_s": engine_start_s})
    if "kv_probe" in job:
        run_kv_probe(llm, job["kv_probe"])
        return
    warm_up(llm, job["cells"][0]["groups"][0], job["temperature"])
    for cell in job["cells"]:
        record = run_cell(llm, cell, job["temperature"])
        record["engine_start_s"] = engine_start_s
        write_atomically(Path(cell["path"]), record)
        report({"event": "cell_done", "label": cell["label"]})


if __name__ == "__main__":
    main()
