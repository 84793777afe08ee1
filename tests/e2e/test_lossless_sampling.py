"""Sampled LongSpec chains keep the target's output distribution.

For a fixed prompt we draw the second generated token N times (one seeded
request each) and compare its empirical distribution with the exact
marginal computed from the target (``distribution.py``: the statistic, its
acceptance bound failing a correct sampler with probability 1e-3, and the
smallest bias it catches with 90% power, asserted <= 0.03).

Two engines, so that both acceptance paths of vLLM's rejection sampler run
often, not only rejections (N = 6000 requests each, the cost of a 0.03 bias):
- deterministic proposals, temperature 1: the replaying test proposer proposes
  the target's likeliest second token (accepted with probability p(token));
  the acceptance rate must equal the exactly computed one;
- probabilistic drafting with the shipped draft, temperature 0.7 with top-k and
  top-p (accepted with probability min(1, p/q), q the draft's distribution at
  that temperature, p the target's after top-k/top-p); it must accept a
  substantial share of its first drafts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .distribution import assert_speculation_keeps_distribution

pytestmark = pytest.mark.e2e

SHIPPED = Path(__file__).parents[2] / "vllm_longspec" / "drafts" / "smollm2-135m-instruct"
NUM_SAMPLES = 6000


def test_deterministic_proposals_keep_the_distribution(
        tmp_path, target_dir, tokenizer, random_draft_dir):
    assert_speculation_keeps_distribution(tmp_path, target_dir, tokenizer, {
        "method": "longspec", "model": str(random_draft_dir),
        "num_speculative_tokens": 3}, NUM_SAMPLES, settings=("t1.0",), oracle=True)


def test_probabilistic_drafts_keep_the_distribution(tmp_path, target_dir, tokenizer):
    assert_speculation_keeps_distribution(tmp_path, target_dir, tokenizer, {
        "method": "longspec", "model": str(SHIPPED), "num_speculative_tokens": 3,
        "draft_sample_method": "probabilistic",
        # every request drafts the full chain every step (the path under test)
        "adaptive": False, "context_lookup": False}, NUM_SAMPLES,
        settings=("t0.7-topk-topp",), min_first_acceptance=0.15)
