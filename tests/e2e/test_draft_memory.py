"""The draft's KV memory per request is bounded by its window, not the context."""

from __future__ import annotations

import pytest

from .conftest import run_engine_job

pytestmark = pytest.mark.e2e

BLOCK = 128  # vLLM's CPU block size
# Same offset inside a block, so window-bounded counts must match exactly.
SHORT, LONG = 8 * BLOCK + 50, 56 * BLOCK + 50  # 1074 and 7218 tokens


def test_draft_kv_bytes_do_not_grow_with_context(tmp_path, target_dir,
                                                 random_draft_dir, long_prompts):
    source = [t for p in long_prompts for t in p]
    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "prompts": [source[:SHORT], source[:LONG]],
        "max_tokens": 24, "ignore_eos": True,
        "speculative_config": {"method": "longspec", "model": str(random_draft_dir),
                               "num_speculative_tokens": 4},
        "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        "phases": [{"name": "kv", "mode": "kv_bytes"}],
    })
    short, long = result["phases"]["kv"]["samples"]
    draft_group = next(name for name in short[0] if "draft_model" in name)
    target_group = next(name for name in short[0] if "layers.29." in name)
    # Steady decoding: the step right after prefill still holds the last
    # prefill chunk's blocks (freed when the next step is scheduled), and the
    # final sample is taken after the request finished and freed everything.
    short, long = short[1:-1], long[1:-1]
    assert len(short) >= 4 and len(long) >= 4

    draft_short = {s[draft_group]["bytes"] for s in short}
    draft_long = {s[draft_group]["bytes"] for s in long}
    assert draft_short == draft_long, (draft_short, draft_long)
    # The window (512 tokens + the query) plus the speculative slots spans at
    # most 6 blocks of 128 tokens, whatever the context.
    assert max(s[draft_group]["blocks"] for s in long) <= 6
    # The target's cache grows with the context, the draft's does not.
    target_short = max(s[target_group]["bytes"] for s in short)
    target_long = min(s[target_group]["bytes"] for s in long)
    assert target_long > 6 * target_short
