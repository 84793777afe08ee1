"""Greedy LongSpec decoding is token-identical to plain vLLM decoding (float32).

Real engine, real SmolLM2 target, 8 prompts of 1.1k-7k tokens with chunked
prefill (2048-token chunks). A random draft is almost never accepted, so the
replaying test proposer (``vllm_longspec.testing``) also drives the real draft
through full acceptance and through partial rejections; every run asserts that
drafts were made, so no test can pass by not speculating.
"""

from __future__ import annotations

import json

import pytest

from .conftest import MAX_TOKENS, run_engine_job

pytestmark = pytest.mark.e2e


def _longspec(draft_dir, k=4):
    return {"method": "longspec", "model": str(draft_dir), "num_speculative_tokens": k}


def _first_difference(got: list[int], want: list[int]) -> int:
    common = min(len(got), len(want))
    return next((j for j in range(common) if got[j] != want[j]), common)


def _assert_identical(outputs, reference):
    for i, (got, want) in enumerate(zip(outputs, reference, strict=True)):
        assert got == want, f"prompt {i}: first difference at token " + str(
            _first_difference(got, want))


def test_random_draft_batched_single_and_prefix_hit(
        tmp_path, target_dir, random_draft_dir, long_prompts, plain_outputs):
    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "prompts": long_prompts, "max_tokens": MAX_TOKENS,
        "speculative_config": _longspec(random_draft_dir),
        "phases": [{"name": "batch", "mode": "batch"},
                   {"name": "single", "mode": "single"}],
    })
    batch, single = result["phases"]["batch"], result["phases"]["single"]
    _assert_identical(batch["token_ids"], plain_outputs)
    _assert_identical(single["token_ids"], plain_outputs)
    assert batch["counters"]["vllm:spec_decode_num_draft_tokens"] > 0
    assert single["counters"]["vllm:spec_decode_num_draft_tokens"] > 0
    # The second pass over the same prompts is served from the prefix cache.
    assert single["counters"]["vllm:prefix_cache_hits"] > sum(map(len, long_prompts)) // 2


def test_every_draft_accepted(tmp_path, target_dir, random_draft_dir, long_prompts,
                              plain_outputs, recorded_continuations):
    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "prompts": long_prompts, "max_tokens": MAX_TOKENS,
        "speculative_config": _longspec(random_draft_dir),
        "env": {"VLLM_LONGSPEC_TEST_PROPOSER": json.dumps(
            {"replay": str(recorded_continuations)})},
        "phases": [{"name": "batch", "mode": "batch"}],
    })
    batch = result["phases"]["batch"]
    _assert_identical(batch["token_ids"], plain_outputs)
    counters = batch["counters"]
    drafts = counters["vllm:spec_decode_num_drafts"]
    accepted = counters["vllm:spec_decode_num_accepted_tokens"]
    # Only drafts past the end of the recording (the last step) can miss.
    assert accepted >= 0.9 * counters["vllm:spec_decode_num_draft_tokens"]
    assert 1 + accepted / drafts > 4.0


def test_partial_rejections(tmp_path, target_dir, random_draft_dir, long_prompts,
                            plain_outputs, recorded_continuations):
    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "prompts": long_prompts, "max_tokens": MAX_TOKENS,
        "speculative_config": _longspec(random_draft_dir),
        "env": {"VLLM_LONGSPEC_TEST_PROPOSER": json.dumps(
            {"replay": str(recorded_continuations), "corrupt_every": 3})},
        "phases": [{"name": "batch", "mode": "batch"}],
    })
    batch = result["phases"]["batch"]
    _assert_identical(batch["token_ids"], plain_outputs)
    counters = batch["counters"]
    per_position = counters["vllm:spec_decode_num_accepted_tokens_per_pos"]
    assert 0 < counters["vllm:spec_decode_num_accepted_tokens"] < counters[
        "vllm:spec_decode_num_draft_tokens"]
    # Rejections land at every chain position, never beyond the third.
    assert per_position[0] > 0 and per_position[1] > 0 and per_position[3] == 0


def test_preemption(tmp_path, target_dir, random_draft_dir, long_prompts):
    """A KV cache too small for the batch's growth: vLLM preempts and recomputes.

    Four prompts (9.2k tokens, plus 200 generated each) meet a cache of about
    8.8k tokens (400 MiB at 47.7 KB per token in float32). vLLM admits a request
    only when its whole prompt fits unless `scheduler_reserve_full_isl` is off;
    with it off, requests are admitted chunk by chunk and the running ones run
    out of blocks: they get preempted, their blocks (the draft's window
    included) freed, and later recomputed from scratch.
    """
    prompts = long_prompts[:4]
    job = {"model": str(target_dir), "prompts": prompts, "max_tokens": 200,
           "ignore_eos": True, "phases": [{"name": "batch", "mode": "batch"}]}
    plain = run_engine_job(tmp_path / "plain", job)["phases"]["batch"]
    assert plain["counters"]["vllm:num_preemptions"] == 0

    result = run_engine_job(tmp_path / "longspec", {
        **job, "kv_cache_memory_bytes": 400 << 20,
        "engine_args": {"scheduler_reserve_full_isl": False},
        "speculative_config": _longspec(random_draft_dir),
    })
    batch = result["phases"]["batch"]
    assert batch["counters"]["vllm:num_preemptions"] > 0
    _assert_identical(batch["token_ids"], plain["token_ids"])
    assert batch["counters"]["vllm:spec_decode_num_draft_tokens"] > 0
