"""Tree speculation is lossless inside a real engine (float32).

Greedy: token-identical to plain vLLM decoding on long prompts (1.1k-7k
tokens, chunked prefill), batched and one at a time, for two tree shapes. The
engines (shared, ``conftest.py``) run the shipped draft; on the prompts'
variants the replaying test proposer (``vllm_longspec/testing.py``) puts the
recorded continuation on one branch of each drafted tree, a non-first one
whenever the tree allows, cut at varying depths: multi-token acceptance along
arbitrary branches, K/V of accepted paths moved in every layer, and rejections
at every depth. (The shipped draft's own trees: ``test_shipped_draft.py``.)

Sampled: the second token's distribution (the first one emitted by tree
verification) matches the target's exact marginal, as in
``test_lossless_sampling.py``, on the narrow tree (two first-level siblings:
the recursive rejection rule runs through both), temperature 0.7 with top-k.
"""

from __future__ import annotations

import json

import pytest

from .conftest import (
    PREEMPT_PROMPTS,
    PREEMPT_TOKENS,
    TREE_REJECTIONS,
    TREES,
    assert_identical,
    replay_env,
    replayed,
    run_engine_job,
    single,
)
from .distribution import assert_phase_keeps_distribution


@pytest.mark.parametrize("shape", TREES)
def test_greedy_replayed_branches_batched_and_single(shipped_tree_run, plain_run,
                                                     variant_prompts, shape):
    tree = TREES[shape]
    result = shipped_tree_run(shape)
    reference = plain_run["variants"]["token_ids"]
    for name, want in (("replay_batch", reference), ("replay_single", single(reference))):
        phase = result["phases"][name]
        assert_identical(phase["token_ids"], want)
        counters = phase["counters"]
        drafts = counters["vllm:spec_decode_num_drafts"]
        accepted = counters["vllm:spec_decode_num_accepted_tokens"]
        per_depth = counters["vllm:spec_decode_num_accepted_tokens_per_pos"]
        # One draft per tree node; a round accepts at most one node per depth.
        assert counters["vllm:spec_decode_num_draft_tokens"] == drafts * sum(tree)
        assert all(per_depth[d] > 0 for d in range(len(tree)))
        assert not any(per_depth[len(tree):])
        print(json.dumps({"tree": tree, "phase": name,
                          "mean_accepted_length": 1 + accepted / drafts}))
        assert 1 + accepted / drafts > 2.0
    assert result["hybrid_used"], "the hybrid tree attention never ran"
    # The second pass over the same prompts is served from the prefix cache.
    assert result["phases"]["replay_single"]["counters"]["vllm:prefix_cache_hits"] > sum(
        map(len, single(variant_prompts))) // 2


def test_unsupported_request_refused_alone(shipped_tree_run):
    """Refused by the front end; the engine goes on serving the next phases."""
    phases = shipped_tree_run("narrow")["phases"]
    assert "sets repetition_penalty" in phases["refused"]["error"]
    assert phases["seeded_alone"]["token_ids"][0]


def test_greedy_preemption(tmp_path, target_dir, random_draft_dir, long_prompts,
                           plain_run):
    """A KV cache too small for the batch (as ``test_lossless_greedy``'s
    preemption test): requests holding moved tree paths get preempted, their
    blocks freed, and recomputed; replayed branches keep trees accepted."""
    plain = plain_run["preempt"]
    prompts = long_prompts[:PREEMPT_PROMPTS]
    sequences = replayed(prompts, plain["token_ids"], TREE_REJECTIONS)
    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "prompts": prompts, "max_tokens": PREEMPT_TOKENS,
        "ignore_eos": True, "kv_cache_memory_bytes": 400 << 20,
        "engine_args": {"scheduler_reserve_full_isl": False},
        "speculative_config": {"method": "longspec", "model": str(random_draft_dir),
                               "tree": TREES["narrow"]},
        "env": replay_env(tmp_path / "recorded.json", sequences),
        "phases": [{"name": "batch", "mode": "batch"}],
    })
    batch = result["phases"]["batch"]
    assert batch["counters"]["vllm:num_preemptions"] > 0
    assert_identical(batch["token_ids"], plain["token_ids"])
    assert batch["counters"]["vllm:spec_decode_num_accepted_tokens"] > 0


def test_sampled_second_token_follows_target_distribution(shipped_tree_run, topk_law):
    """The shipped draft's narrow trees at temperature 0.7 with top-k (both the
    acceptance and the rejection branches of the recursive rule run)."""
    assert_phase_keeps_distribution(shipped_tree_run("narrow")["phases"]["t0.7-topk"],
                                    topk_law, min_first_acceptance=0.01)
