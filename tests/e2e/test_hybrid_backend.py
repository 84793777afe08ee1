"""The hybrid tree-attention backend inside a real engine changes no token.

With ``VLLM_LONGSPEC_HYBRID_ATTENTION=1`` the plugin overrides vLLM's CPU_ATTN
backend; ``VLLM_LONGSPEC_HYBRID_CHAINS=1`` routes every multi-token chain row
(verification of the drafts, short prefill chunks) of the target through the
hybrid path (paged prefix with log-sum-exp + masked part + merge) instead of
vLLM's kernel. Greedy float32 output must stay identical to plain decoding.
"""

from __future__ import annotations

import json

import pytest

from .conftest import MAX_TOKENS, run_engine_job

pytestmark = pytest.mark.e2e


def test_hybrid_chain_verification_matches_plain(
        tmp_path, target_dir, random_draft_dir, long_prompts, plain_outputs,
        recorded_continuations):
    marker = tmp_path / "hybrid-used"
    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "prompts": long_prompts[:4],
        "max_tokens": MAX_TOKENS,
        "speculative_config": {"method": "longspec", "model": str(random_draft_dir),
                               "num_speculative_tokens": 4},
        "env": {"VLLM_LONGSPEC_HYBRID_ATTENTION": "1",
                "VLLM_LONGSPEC_HYBRID_CHAINS": "1",
                "VLLM_LONGSPEC_HYBRID_USED_MARKER": str(marker),
                "VLLM_LONGSPEC_TEST_PROPOSER": json.dumps(
                    {"replay": str(recorded_continuations), "corrupt_every": 3})},
        "phases": [{"name": "batch", "mode": "batch"}],
    })
    batch = result["phases"]["batch"]
    assert batch["token_ids"] == plain_outputs[:4]
    assert batch["counters"]["vllm:spec_decode_num_accepted_tokens"] > 0
    assert marker.exists(), "the hybrid path never ran"
