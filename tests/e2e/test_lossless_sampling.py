"""Sampled LongSpec chains keep the target's output distribution.

For a fixed prompt we draw the second generated token N times (one seeded
request each) and compare its empirical distribution with the exact
marginal computed from the target (``distribution.py``: the statistic, its
acceptance bound failing a correct sampler with probability 1e-3, and the
smallest bias it catches with 90% power, asserted <= 0.03).

Two engines (shared, ``conftest.py``), so that both acceptance paths of vLLM's
rejection sampler run often, not only rejections (N = 6000 requests each, the
cost of a 0.03 bias):
- deterministic proposals, temperature 1: the replaying test proposer proposes
  the target's likeliest second token (accepted with probability p(token));
  the acceptance rate must equal the exactly computed one;
- probabilistic drafting with the shipped draft, temperature 0.7 with top-k and
  top-p, every request drafting the full chain every step (accepted with
  probability min(1, p/q), q the draft's distribution at that temperature, p
  the target's after top-k/top-p); at least 1% of its
  first drafts must be accepted (60 of 6000; measured: 2.5% with the shipped
  draft), so the acceptance path runs too, not only rejections.
"""

from __future__ import annotations

from .distribution import assert_phase_keeps_distribution


def test_deterministic_proposals_keep_the_distribution(replay_chain_run, oracle_law):
    assert_phase_keeps_distribution(replay_chain_run["t1.0"], oracle_law, oracle=True)


def test_probabilistic_drafts_keep_the_distribution(shipped_chain_run, topk_topp_law):
    assert_phase_keeps_distribution(shipped_chain_run["t0.7-topk-topp"], topk_topp_law,
                                    min_first_acceptance=0.01)
