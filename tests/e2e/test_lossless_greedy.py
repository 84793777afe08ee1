"""Greedy LongSpec chains are token-identical to plain vLLM decoding (float32).

Real engine, real SmolLM2 target, 4 prompts of 1.1k-7k tokens with chunked
prefill (2048-token chunks; ``conftest.py``'s greedy prompts). A random draft is almost never accepted (its
engine's default adaptive chains and context lookup still propose), so the
replaying test proposer (``vllm_longspec/testing.py``) also drives the real
draft through full acceptance and through partial rejections; every check
asserts that drafts were made, so none can pass by not speculating. The
engines are shared (``conftest.py``); preemption needs its own small cache.
"""

from __future__ import annotations

from .conftest import (
    PREEMPT_PROMPTS,
    PREEMPT_TOKENS,
    K,
    assert_identical,
    chain,
    run_engine_job,
    single,
)


def test_random_draft_batched(random_chain_run, plain_outputs):
    batch = random_chain_run["batch"]
    assert_identical(batch["token_ids"], plain_outputs)
    assert batch["counters"]["vllm:spec_decode_num_draft_tokens"] > 0


def test_random_draft_one_at_a_time_after_prefix_hits(random_chain_run, plain_outputs,
                                                      greedy_prompts):
    phase = random_chain_run["single"]
    assert_identical(phase["token_ids"], single(plain_outputs))
    assert phase["counters"]["vllm:spec_decode_num_draft_tokens"] > 0
    # The second pass over the same prompts is served from the prefix cache.
    assert phase["counters"]["vllm:prefix_cache_hits"] > sum(
        map(len, single(greedy_prompts))) // 2


def test_every_draft_accepted(replay_chain_run, plain_outputs):
    batch = replay_chain_run["accepted"]
    assert_identical(batch["token_ids"], plain_outputs)
    counters = batch["counters"]
    drafts = counters["vllm:spec_decode_num_drafts"]
    accepted = counters["vllm:spec_decode_num_accepted_tokens"]
    # Only drafts past the end of the recording (the last step) can miss.
    assert accepted >= 0.9 * counters["vllm:spec_decode_num_draft_tokens"]
    assert 1 + accepted / drafts > K


def test_partial_rejections(replay_chain_run, plain_run):
    batch = replay_chain_run["rejected"]
    assert_identical(batch["token_ids"], plain_run["variants"]["token_ids"])
    counters = batch["counters"]
    per_position = counters["vllm:spec_decode_num_accepted_tokens_per_pos"]
    assert 0 < counters["vllm:spec_decode_num_accepted_tokens"] < counters[
        "vllm:spec_decode_num_draft_tokens"]
    # Every third output is wrong: accepted runs stop before the third position.
    assert per_position[0] > 0 and per_position[1] > 0 and per_position[3] == 0


def test_preemption(tmp_path, target_dir, random_draft_dir, long_prompts, plain_run):
    """A KV cache too small for the batch's growth: vLLM preempts and recomputes.

    Four prompts (9.2k tokens, plus 200 generated each) meet a cache of about
    8.8k tokens (400 MiB at 47.7 KB per token in float32). vLLM admits a request
    only when its whole prompt fits unless `scheduler_reserve_full_isl` is off;
    with it off, requests are admitted chunk by chunk and the running ones run
    out of blocks: they get preempted, their blocks (the draft's window
    included) freed, and later recomputed from scratch.
    """
    plain = plain_run["preempt"]
    assert plain["counters"]["vllm:num_preemptions"] == 0
    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "prompts": long_prompts[:PREEMPT_PROMPTS],
        "max_tokens": PREEMPT_TOKENS, "ignore_eos": True,
        "kv_cache_memory_bytes": 400 << 20,
        "engine_args": {"scheduler_reserve_full_isl": False},
        "speculative_config": chain(random_draft_dir),
        "phases": [{"name": "batch", "mode": "batch"}],
    })
    batch = result["phases"]["batch"]
    assert batch["counters"]["vllm:num_preemptions"] > 0
    assert_identical(batch["token_ids"], plain["token_ids"])
    assert batch["counters"]["vllm:spec_decode_num_draft_tokens"] > 0
