"""The shipped draft: it serves losslessly (chains and trees), it is accepted,
and the offline accepted-length simulation (``vllm-longspec evaluate``) agrees
with vLLM.

The simulation walks greedy chain rounds over the target's continuation using
the training-side draft; vLLM counts rounds (``spec_decode_num_drafts``) and
accepted draft tokens. On the same continuation both must agree, up to the
last round of each request (vLLM may draft past max_tokens and then truncate).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import MAX_TOKENS, run_engine_job

SHIPPED = Path(__file__).parents[2] / "vllm_longspec" / "drafts" / "smollm2-135m-instruct"
K = 4


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory, target_dir, long_prompts):
    prompts = long_prompts[:2]  # code continuation 1.1k, chat 1.9k
    result = run_engine_job(tmp_path_factory.mktemp("shipped"), {
        "model": str(target_dir), "prompts": prompts, "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "speculative_config": {"method": "longspec", "model": str(SHIPPED),
                               "num_speculative_tokens": K},
        "phases": [{"name": "single", "mode": "single"}],
    })
    return prompts, result["phases"]["single"]


def test_shipped_draft_is_lossless_and_accepted(shipped_run, plain_outputs):
    prompts, phase = shipped_run
    for i, tokens in enumerate(phase["token_ids"]):
        # plain_outputs stop at EOS; this run ignores it: compare the common part
        assert tokens[:len(plain_outputs[i])] == plain_outputs[i]
    counters = phase["counters"]
    accepted = counters["vllm:spec_decode_num_accepted_tokens"]
    # An untrained draft is accepted ~never; the shipped one measurably is.
    assert accepted > 0.05 * counters["vllm:spec_decode_num_drafts"]


def test_simulated_accepted_length_matches_vllm(shipped_run, target_dir):
    from vllm_longspec.train.evaluate import DraftEvaluator

    prompts, phase = shipped_run
    evaluator = DraftEvaluator(SHIPPED, target_dir)
    rounds = [evaluator.accepted_lengths(p, o, K)
              for p, o in zip(prompts, phase["token_ids"], strict=True)]
    counters = phase["counters"]
    simulated_rounds = sum(len(r) for r in rounds)
    simulated_accepted = sum(n - 1 for r in rounds for n in r)
    assert abs(counters["vllm:spec_decode_num_drafts"] - simulated_rounds) <= len(prompts)
    assert (abs(counters["vllm:spec_decode_num_accepted_tokens"] - simulated_accepted)
            <= K * len(prompts))


@pytest.mark.parametrize("tree", [[2, 2, 2], [4, 4, 4, 4]], ids=["narrow", "wide"])
def test_shipped_draft_drafts_lossless_trees(tmp_path, target_dir, long_prompts,
                                             plain_outputs, tree):
    """The trained draft's own trees (no replayed branches) on the 8 long
    prompts, batched and one at a time: token-identical to plain decoding."""
    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "prompts": long_prompts, "max_tokens": MAX_TOKENS,
        "speculative_config": {"method": "longspec", "model": str(SHIPPED),
                               "tree": tree},
        "phases": [{"name": "batch", "mode": "batch"},
                   {"name": "single", "mode": "single"}],
    })
    for name in ("batch", "single"):
        phase = result["phases"][name]
        assert phase["token_ids"] == plain_outputs
        counters = phase["counters"]
        assert counters["vllm:spec_decode_num_draft_tokens"] == (
            sum(tree) * counters["vllm:spec_decode_num_drafts"])
        assert counters["vllm:spec_decode_num_accepted_tokens"] > (
            0.05 * counters["vllm:spec_decode_num_drafts"])
