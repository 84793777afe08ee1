"""Patch (profiling only): where an engine step's time goes.

Target: ``GPUModelRunner.execute_model``, ``sample_tokens``, ``_model_forward``
    and ``propose_draft_token_ids`` (``vllm/v1/worker/gpu_model_runner.py``,
    inherited by ``CPUModelRunner``).
Why: to split a step into target forward, drafting and everything else.
How: with ``VLLM_LONGSPEC_TIME_SPLIT=/tmp/split.jsonl`` set (``vllm serve ...``
    or ``LLM(...)``), ``apply`` wraps the four methods in the worker process;
    each wrapper times the original and, at the end of ``sample_tokens`` (vLLM
    V1 splits a step into ``execute_model`` + ``sample_tokens``), appends one
    JSON line per engine step::

        {"tokens": scheduled tokens, "requests": n, "forward_ms": target forward,
         "draft_ms": drafting (any speculative method), "step_ms": whole step}

    The rest of a step (input preparation, sampling, rejection sampling,
    bookkeeping) is ``step_ms - forward_ms - draft_ms``. It synchronises
    nothing, so on a GPU the numbers are launch times unless
    ``CUDA_LAUNCH_BLOCKING=1``. ``summarise`` turns a file into per-decode-step
    means (``benchmarks/time_split.py``).
When it can go: when vLLM reports these times itself.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

ENV_VAR = "VLLM_LONGSPEC_TIME_SPLIT"

_orig_execute_model = None
_orig_sample_tokens = None
_orig__model_forward = None
_orig_propose_draft_token_ids = None


class StepTimer:
    """The current step's times, written to ``path`` when the step ends."""

    def __init__(self, path: str):
        self.sink = open(path, "a")  # stays open as long as the worker runs
        self.current: dict[str, float] = {}

    def timed(self, key: str, method):
        @functools.wraps(method)
        def wrapper(runner, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(runner, *args, **kwargs)
            finally:
                elapsed = (time.perf_counter() - start) * 1e3
                self.current[key] = self.current.get(key, 0.0) + elapsed
        return wrapper

    def begin(self, scheduler_output) -> None:
        self.current = {
            "tokens": scheduler_output.total_num_scheduled_tokens,
            "requests": len(scheduler_output.num_scheduled_tokens),
        }

    def end(self) -> None:
        record = self.current
        if "tokens" in record:
            step = record.pop("execute_ms", 0.0) + record.pop("sample_ms", 0.0)
            record = {"tokens": record["tokens"], "requests": record["requests"],
                      "forward_ms": round(record.get("forward_ms", 0.0), 3),
                      "draft_ms": round(record.get("draft_ms", 0.0), 3),
                      "step_ms": round(step, 3)}
            self.sink.write(json.dumps(record) + "\n")
            self.sink.flush()
        self.current = {}


def apply() -> bool:
    """Wrap the runner's methods if ``VLLM_LONGSPEC_TIME_SPLIT`` is set."""
    global _orig_execute_model, _orig_sample_tokens, _orig__model_forward
    global _orig_propose_draft_token_ids
    path = os.environ.get(ENV_VAR)
    if not path:
        return False
    if _orig_execute_model is not None:
        return True
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    timer = StepTimer(path)
    _orig_execute_model = GPUModelRunner.execute_model
    _orig_sample_tokens = GPUModelRunner.sample_tokens
    _orig__model_forward = GPUModelRunner._model_forward
    _orig_propose_draft_token_ids = GPUModelRunner.propose_draft_token_ids
    timed_execute = timer.timed("execute_ms", _orig_execute_model)
    timed_sample = timer.timed("sample_ms", _orig_sample_tokens)

    @functools.wraps(_orig_execute_model)
    def execute_model(self, scheduler_output, *args, **kwargs):
        timer.begin(scheduler_output)
        return timed_execute(self, scheduler_output, *args, **kwargs)

    @functools.wraps(_orig_sample_tokens)
    def sample_tokens(self, *args, **kwargs):
        result = timed_sample(self, *args, **kwargs)
        timer.end()
        return result

    GPUModelRunner.execute_model = execute_model
    GPUModelRunner.sample_tokens = sample_tokens
    GPUModelRunner._model_forward = timer.timed("forward_ms", _orig__model_forward)
    GPUModelRunner.propose_draft_token_ids = timer.timed(
        "draft_ms", _orig_propose_draft_token_ids)
    return True


def summarise(path: str | Path, max_tokens_per_request: int) -> dict[str, float]:
    """Mean milliseconds per decode step (steps with at most
    ``max_tokens_per_request`` scheduled tokens per request, i.e. no prefill)."""
    steps = [json.loads(line) for line in Path(path).read_text().splitlines()]
    decode = [s for s in steps
              if s["requests"] and s["tokens"] <= max_tokens_per_request * s["requests"]]
    if not decode:
        return {"decode_steps": 0}
    mean = {key: sum(s[key] for s in decode) / len(decode)
            for key in ("forward_ms", "draft_ms", "step_ms")}
    mean["other_ms"] = mean["step_ms"] - mean["forward_ms"] - mean["draft_ms"]
    return {"decode_steps": len(decode), **{k: round(v, 2) for k, v in mean.items()}}
