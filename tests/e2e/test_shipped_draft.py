"""The shipped draft: it serves losslessly (chains and trees), it is accepted,
and the offline accepted-length simulation (``vllm-longspec evaluate``) agrees
with vLLM.

The simulation walks greedy chain rounds over the target's continuation using
the training-side draft; vLLM (the shared shipped-chain engine, every request
the full chain every step) counts rounds (``spec_decode_num_drafts``) and
accepted draft tokens. On the same continuation both must agree, up to the
last round of each request (vLLM may draft past max_tokens and then truncate).
"""

from __future__ import annotations

import pytest

from .conftest import SHIPPED, TREES, K, assert_identical, single


def test_shipped_draft_is_lossless_and_accepted(shipped_chain_run, plain_outputs):
    phase = shipped_chain_run["single"]
    for i, tokens in enumerate(phase["token_ids"]):
        # plain_outputs stop at EOS; this run ignores it: compare the common part
        assert tokens[:len(plain_outputs[i])] == plain_outputs[i]
    counters = phase["counters"]
    accepted = counters["vllm:spec_decode_num_accepted_tokens"]
    # An untrained draft is accepted ~never; the shipped one measurably is.
    assert accepted > 0.05 * counters["vllm:spec_decode_num_drafts"]


def test_simulated_accepted_length_matches_vllm(shipped_chain_run, target_dir):
    from vllm_longspec.train.evaluate import DraftEvaluator

    phase = shipped_chain_run["single"]
    prompts = phase["prompt_token_ids"]
    evaluator = DraftEvaluator(SHIPPED, target_dir)
    rounds = [evaluator.accepted_lengths(p, o, K)
              for p, o in zip(prompts, phase["token_ids"], strict=True)]
    counters = phase["counters"]
    simulated_rounds = sum(len(r) for r in rounds)
    simulated_accepted = sum(n - 1 for r in rounds for n in r)
    assert abs(counters["vllm:spec_decode_num_drafts"] - simulated_rounds) <= len(prompts)
    assert (abs(counters["vllm:spec_decode_num_accepted_tokens"] - simulated_accepted)
            <= K * len(prompts))


@pytest.mark.parametrize("shape", TREES)
def test_shipped_draft_drafts_lossless_trees(shipped_tree_run, plain_outputs, shape):
    """The trained draft's own trees (no replayed branches) on the greedy
    prompts, batched and one at a time: token-identical to plain decoding."""
    tree = TREES[shape]
    phases = shipped_tree_run(shape)["phases"]
    for name, want in (("own_batch", plain_outputs), ("own_single", single(plain_outputs))):
        phase = phases[name]
        assert_identical(phase["token_ids"], want)
        counters = phase["counters"]
        assert counters["vllm:spec_decode_num_draft_tokens"] == (
            sum(tree) * counters["vllm:spec_decode_num_drafts"])
        assert counters["vllm:spec_decode_num_accepted_tokens"] > (
            0.05 * counters["vllm:spec_decode_num_drafts"])
