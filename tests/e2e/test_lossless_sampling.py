"""Sampled LongSpec decoding keeps the target's output distribution.

For a fixed prompt we draw the second generated token N times (one seeded
request each) with LongSpec and compare its empirical distribution with the
exact marginal computed from the target (``distribution.py``: the statistic and
its acceptance bound, failing a correct sampler with probability 1e-3).
"""

from __future__ import annotations

import pytest

from .conftest import run_engine_job
from .distribution import (
    PROMPT,
    TEMPERATURE,
    assert_follows,
    exact_second_token_distribution,
)

pytestmark = pytest.mark.e2e

NUM_SAMPLES = 1500


@pytest.mark.parametrize("draft_sample_method", ["probabilistic", "greedy"])
def test_second_token_follows_target_distribution(
        tmp_path, target_dir, tokenizer, random_draft_dir, draft_sample_method):
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    exact, first_tokens, covered = exact_second_token_distribution(target_dir,
                                                                    prompt_ids)
    assert covered > 0.6, "enumerated first tokens must carry most of the mass"

    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "max_tokens": 2, "max_num_seqs": 128,
        "max_model_len": 512,
        "speculative_config": {"method": "longspec", "model": str(random_draft_dir),
                               "num_speculative_tokens": 3,
                               "draft_sample_method": draft_sample_method},
        "phases": [{"name": "s", "mode": "seeded", "prompt": prompt_ids,
                    "num_samples": NUM_SAMPLES, "temperature": TEMPERATURE,
                    "max_tokens": 2}],
    })
    phase = result["phases"]["s"]
    assert phase["counters"]["vllm:spec_decode_num_draft_tokens"] > 0
    assert_follows(phase["token_ids"], exact, first_tokens, NUM_SAMPLES)
