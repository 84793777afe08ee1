"""Sampled LongSpec decoding keeps the target's output distribution.

For a fixed prompt we draw the second generated token N times (one seeded
request each) with LongSpec and compare its empirical distribution with the
exact marginal computed from the target (``distribution.py``: the statistic and
its acceptance bound, failing a correct sampler with probability 1e-3).
"""

from __future__ import annotations

import pytest

from .distribution import assert_speculation_keeps_distribution

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("draft_sample_method", ["probabilistic", "greedy"])
def test_second_token_follows_target_distribution(
        tmp_path, target_dir, tokenizer, random_draft_dir, draft_sample_method):
    assert_speculation_keeps_distribution(tmp_path, target_dir, tokenizer, {
        "method": "longspec", "model": str(random_draft_dir),
        "num_speculative_tokens": 3, "draft_sample_method": draft_sample_method})
