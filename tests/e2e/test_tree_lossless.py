"""Tree speculation is lossless inside a real engine (float32).

Greedy: token-identical to plain vLLM decoding on the 8 long prompts (1.1k-7k
tokens, chunked prefill), batched and one at a time, for two tree shapes. The
random draft drafts real beam trees every round (its window, its levels, the
hybrid tree attention of the target, the verification), but is almost never
right; the replaying test proposer (``vllm_longspec.testing``) then puts the
recorded continuation on one branch of each tree, a non-first one whenever the
tree allows, cut at varying depths: multi-token acceptance along arbitrary
branches, K/V of accepted paths moved in every layer, and rejections at every
depth.

Sampled: the second token's distribution (the first one emitted by tree
verification) matches the target's exact marginal, as in
``test_lossless_sampling.py``.
"""

from __future__ import annotations

import json

import pytest

from .conftest import MAX_TOKENS, run_engine_job
from .distribution import assert_speculation_keeps_distribution
from .test_lossless_greedy import _assert_identical
from .test_lossless_sampling import NUM_SAMPLES, SHIPPED

pytestmark = pytest.mark.e2e

TREES = {"narrow": [2, 2, 2], "wide": [4, 4, 4, 4]}
CORRUPT_EVERY = 5  # the replayed path ends at every output index multiple of 5


def _longspec(draft_dir, tree):
    return {"method": "longspec", "model": str(draft_dir), "tree": tree}


@pytest.mark.parametrize("shape", TREES)
def test_greedy_replayed_branches_batched_and_single(
        tmp_path, target_dir, random_draft_dir, long_prompts, plain_outputs,
        recorded_continuations, shape):
    tree = TREES[shape]
    marker = tmp_path / "hybrid-used"
    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "prompts": long_prompts, "max_tokens": MAX_TOKENS,
        "speculative_config": _longspec(random_draft_dir, tree),
        "env": {"VLLM_LONGSPEC_HYBRID_USED_MARKER": str(marker),
                "VLLM_LONGSPEC_TEST_PROPOSER": json.dumps(
                    {"replay": str(recorded_continuations),
                     "corrupt_every": CORRUPT_EVERY})},
        "phases": [{"name": "refused", "mode": "refused",
                    "sampling": {"repetition_penalty": 1.1}},
                   {"name": "batch", "mode": "batch"},
                   {"name": "single", "mode": "single"}],
    })
    # Refused by the front end; the engine goes on serving the next phases.
    assert "sets repetition_penalty" in result["phases"]["refused"]["error"]
    for name in ("batch", "single"):
        phase = result["phases"][name]
        _assert_identical(phase["token_ids"], plain_outputs)
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
    assert marker.exists(), "the hybrid tree attention never ran"
    # The second pass over the same prompts is served from the prefix cache.
    assert result["phases"]["single"]["counters"]["vllm:prefix_cache_hits"] > sum(
        map(len, long_prompts)) // 2


def test_greedy_preemption(tmp_path, target_dir, random_draft_dir, long_prompts):
    """A KV cache too small for the batch (as ``test_lossless_greedy``'s
    preemption test): requests holding moved tree paths get preempted, their
    blocks freed, and recomputed; replayed branches keep trees accepted."""
    prompts = long_prompts[:4]
    job = {"model": str(target_dir), "prompts": prompts, "max_tokens": 200,
           "ignore_eos": True, "phases": [{"name": "batch", "mode": "batch"}]}
    plain = run_engine_job(tmp_path / "plain", job)["phases"]["batch"]
    replay = tmp_path / "recorded.json"
    replay.write_text(json.dumps({"sequences": [
        {"prompt_token_ids": p, "output_token_ids": o}
        for p, o in zip(prompts, plain["token_ids"], strict=True)]}))

    result = run_engine_job(tmp_path / "tree", {
        **job, "kv_cache_memory_bytes": 400 << 20,
        "engine_args": {"scheduler_reserve_full_isl": False},
        "speculative_config": _longspec(random_draft_dir, TREES["narrow"]),
        "env": {"VLLM_LONGSPEC_TEST_PROPOSER": json.dumps(
            {"replay": str(replay), "corrupt_every": CORRUPT_EVERY})},
    })
    batch = result["phases"]["batch"]
    assert batch["counters"]["vllm:num_preemptions"] > 0
    _assert_identical(batch["token_ids"], plain["token_ids"])
    assert batch["counters"]["vllm:spec_decode_num_accepted_tokens"] > 0


def test_sampled_second_token_follows_target_distribution(tmp_path, target_dir, tokenizer):
    """The shipped draft's trees (accepted often: both the acceptance and the
    rejection branches of the recursive rule run)."""
    assert_speculation_keeps_distribution(tmp_path, target_dir, tokenizer,
                                          _longspec(SHIPPED, [3, 2]), NUM_SAMPLES,
                                          settings=("t0.7-topk-topp",),
                                          min_first_acceptance=0.15)
