"""The hybrid tree-attention backend inside a real engine changes no token.

A LongSpec chain engine (``hybrid_chains``, the default) overrides vLLM's
CPU_ATTN backend in its worker and routes every multi-token chain row
(verification of the drafts, short prefill chunks) of the target through the
hybrid path (paged prefix with log-sum-exp + masked part + merge) instead of
vLLM's kernel. Greedy float32 output must stay identical to plain decoding,
with replayed drafts rejected at every third output (accepted runs of 1-2).
"""

from __future__ import annotations

from .conftest import (
    CHAIN_REJECTIONS,
    MAX_TOKENS,
    chain,
    replay_env,
    replayed,
    run_engine_job,
)

NUM_PROMPTS = 2  # 1.1k and 3.5k tokens, the second prefilled in chunks


def test_hybrid_chain_verification_matches_plain(
        tmp_path, target_dir, random_draft_dir, greedy_prompts, plain_outputs):
    prompts = greedy_prompts[:NUM_PROMPTS]
    marker = tmp_path / "hybrid-used"
    sequences = replayed(prompts, plain_outputs[:NUM_PROMPTS], CHAIN_REJECTIONS)
    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "prompts": prompts, "max_tokens": MAX_TOKENS,
        "speculative_config": chain(random_draft_dir),
        "env": {"VLLM_LONGSPEC_HYBRID_USED_MARKER": str(marker),
                **replay_env(tmp_path / "recorded.json", sequences)},
        "phases": [{"name": "batch", "mode": "batch"}],
    })
    batch = result["phases"]["batch"]
    assert batch["token_ids"] == plain_outputs[:NUM_PROMPTS]
    assert batch["counters"]["vllm:spec_decode_num_accepted_tokens"] > 0
    assert marker.exists(), "the hybrid path never ran"


def test_hybrid_chains_off_keeps_vllms_kernel(
        tmp_path, target_dir, random_draft_dir, greedy_prompts, plain_outputs):
    """``hybrid_chains: false``: the same tokens, and the hybrid path never runs."""
    marker = tmp_path / "hybrid-used"
    sequences = replayed(greedy_prompts[:1], plain_outputs[:1], CHAIN_REJECTIONS)
    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "prompts": greedy_prompts[:1], "max_tokens": MAX_TOKENS,
        "speculative_config": chain(random_draft_dir, hybrid_chains=False),
        "env": {"VLLM_LONGSPEC_HYBRID_USED_MARKER": str(marker),
                **replay_env(tmp_path / "recorded.json", sequences)},
        "phases": [{"name": "batch", "mode": "batch"}],
    })
    batch = result["phases"]["batch"]
    assert batch["token_ids"] == plain_outputs[:1]
    assert batch["counters"]["vllm:spec_decode_num_accepted_tokens"] > 0
    assert not marker.exists(), "hybrid_chains: false still ran the hybrid path"
