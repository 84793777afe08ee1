"""Where an engine step's time goes: target forward, drafting, everything else.

    VLLM_LONGSPEC_TIME_SPLIT=/tmp/split.jsonl vllm serve ...   (or LLM(...))

With the variable set, the plugin wraps three methods of vLLM's model runner
in the worker process and appends one JSON line per engine step:

    {"tokens": scheduled tokens, "requests": n, "forward_ms": target forward,
     "draft_ms": drafting (any speculative method), "step_ms": whole step}

``step_ms`` is ``execute_model`` + ``sample_tokens`` (vLLM V1 splits a step
into the two calls); the rest of a step (input preparation, sampling,
rejection sampling, bookkeeping) is ``step_ms - forward_ms - draft_ms``. Only
meant for measurements: it synchronises nothing, so on a GPU the numbers are
launch times unless ``CUDA_LAUNCH_BLOCKING=1``. ``summarise`` turns a file
into per-decode-step means.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

ENV_VAR = "VLLM_LONGSPEC_TIME_SPLIT"


class StepTimer:
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

    def execute_model(self, method):
        timed = self.timed("execute_ms", method)

        @functools.wraps(method)
        def wrapper(runner, scheduler_output, *args, **kwargs):
            self.current = {
                "tokens": scheduler_output.total_num_scheduled_tokens,
                "requests": len(scheduler_output.num_scheduled_tokens),
            }
            return timed(runner, scheduler_output, *args, **kwargs)
        return wrapper

    def sample_tokens(self, method):
        timed = self.timed("sample_ms", method)

        @functools.wraps(method)
        def wrapper(runner, *args, **kwargs):
            result = timed(runner, *args, **kwargs)
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
            return result
        return wrapper


def install_from_env() -> bool:
    """Wrap the runner's methods if ``VLLM_LONGSPEC_TIME_SPLIT`` is set."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return False
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_longspec_step_timer", None) is not None:
        return True
    timer = StepTimer(path)
    GPUModelRunner._longspec_step_timer = timer
    GPUModelRunner.execute_model = timer.execute_model(GPUModelRunner.execute_model)
    GPUModelRunner.sample_tokens = timer.sample_tokens(GPUModelRunner.sample_tokens)
    GPUModelRunner._model_forward = timer.timed("forward_ms", GPUModelRunner._model_forward)
    GPUModelRunner.propose_draft_token_ids = timer.timed(
        "draft_ms", GPUModelRunner.propose_draft_token_ids)
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
