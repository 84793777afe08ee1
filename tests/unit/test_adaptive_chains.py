"""Chain mode's per-step choice between the context lookup and the draft (no engine)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from vllm_longspec.runner import adaptive_chains
from vllm_longspec.runner.adaptive_chains import (
    TRACE_ENV_VAR,
    AdaptiveChains,
    summarise_trace,
)
from vllm_longspec.speculation.policy import DRAFT, LOOKUP

VOCAB = 50


def _batch(rows: dict[str, list[int]]):
    """A runner's input batch: committed tokens per request row."""
    width = 64
    token_ids = np.zeros((len(rows), width), dtype=np.int64)
    for row, tokens in enumerate(rows.values()):
        token_ids[row, :len(tokens)] = tokens
    return SimpleNamespace(req_ids=list(rows), token_ids_cpu=token_ids,
                           num_tokens_no_spec=np.array([len(t) for t in rows.values()]))


def test_lookup_proposes_the_repeated_continuation_and_the_draft_the_rest():
    chains = AdaptiveChains(4, lookup=True, adaptive=False, min_match=3)
    repeated = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]   # "1 2 3" seen before: 4 5 6 7 next
    batch = _batch({"a": repeated[:-1], "b": [10, 11, 12]})
    bonus = torch.tensor([3, 13])  # a's bonus completes "1 2 3"
    plan = chains.plan(batch, 2, bonus, None, np.array([True, True]))
    assert plan.sources == (LOOKUP, DRAFT)
    assert plan.lookup_tokens[0] == (4, 5, 6, 7) and plan.lookup_match == (3, 0)
    assert plan.num_tokens == (4, 4) and plan.draft_steps == 4

    drafts = torch.tensor([[40, 41, 42, 43], [20, 21, 22, 23]])
    probs = torch.softmax(torch.randn(2, 4, VOCAB), -1)
    proposals, composed = chains.compose(plan, drafts, probs, drafting_ms=1.0)
    assert proposals == [[4, 5, 6, 7], [20, 21, 22, 23]]
    # lookup tokens are deterministic proposals: one-hot rows; the draft's stay
    assert torch.equal(composed[0], torch.nn.functional.one_hot(
        torch.tensor([4, 5, 6, 7]), VOCAB).float())
    assert torch.equal(composed[1], probs[1])


def test_a_lookup_proposal_is_learnt_in_its_match_length_class():
    chains = AdaptiveChains(4, lookup=True, adaptive=True)
    repeated = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    batch = _batch({"a": repeated[:-1]})
    plan = chains.plan(batch, 1, torch.tensor([3]), None, np.array([True]))
    assert plan.sources == (LOOKUP,) and plan.lookup_match == (3,)
    before = {m: chains.policy.rates("a", LOOKUP, m) for m in (1, 3)}
    chains.compose(plan, torch.zeros(1, plan.draft_steps, dtype=torch.long), None, 0.0)
    chains.plan(batch, 1, torch.tensor([0]), torch.tensor([plan.num_tokens[0]]),
                np.array([True]))   # every proposed token rejected
    assert chains.policy.rates("a", LOOKUP, 3)[0] < before[3][0]
    assert np.array_equal(chains.policy.rates("a", LOOKUP, 1), before[1])


def test_history_includes_the_accepted_drafts_and_the_bonus():
    chains = AdaptiveChains(3, lookup=True, adaptive=False, min_match=2)
    batch = _batch({"a": [7, 8, 9, 1, 2]})
    plan = chains.plan(batch, 1, torch.tensor([5]), None, np.array([True]))
    chains.compose(plan, torch.tensor([[30, 31, 32]]), None, 1.0)  # the draft's chain
    # Next step: 2 of the 3 drafts accepted (1 rejected), bonus 7, the row still
    # holds the committed tokens only: history 7 8 9 1 2 5 30 31 7 -> "7" then 8 9 1
    chains.rule = type(chains.rule)(1)
    plan = chains.plan(batch, 1, torch.tensor([7]), torch.tensor([1]), np.array([True]))
    assert plan.lookup_tokens[0] == (8, 9, 1)


def test_rows_in_prefill_get_no_proposal_and_leavers_are_forgotten():
    chains = AdaptiveChains(2, lookup=True, adaptive=True)
    batch = _batch({"a": [1, 2, 1, 2], "b": [5, 6]})
    plan = chains.plan(batch, 2, torch.tensor([1, 0]), None, np.array([True, False]))
    assert plan.num_tokens[1] == 0
    proposals, _ = chains.compose(plan, torch.zeros(2, plan.draft_steps, dtype=torch.long),
                                  None, 0.5)
    assert proposals[1] == []
    chains.plan(_batch({"b": [5, 6, 7]}), 1, torch.tensor([8]), None, np.array([True]))
    assert "a" not in chains.lookup and "a" not in chains._proposed


def test_the_policy_backs_off_when_nothing_is_accepted(monkeypatch):
    clock = SimpleNamespace(now=0.0)
    # steps as long as a plain one here (44 ms), whatever the test machine does
    monkeypatch.setattr(adaptive_chains, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    chains = AdaptiveChains(4, lookup=False, adaptive=True)
    batch = _batch({"a": list(range(20))})
    zero_steps = 0
    rejected = None  # no previous round before the first step
    for step in range(60):
        clock.now += 0.044
        plan = chains.plan(batch, 1, torch.tensor([20 + step]), rejected, np.array([True]))
        rejected = torch.tensor([plan.num_tokens[0]])
        zero_steps += plan.num_tokens[0] == 0
        chains.compose(plan, torch.full((1, plan.draft_steps), 3), None, 3.0)
    # every draft was rejected: the policy stops speculating, probing now and then
    assert zero_steps > 40


def test_the_policy_trace_records_each_plan_and_the_measured_step(tmp_path, monkeypatch):
    trace = tmp_path / "policy.jsonl"
    monkeypatch.setenv(TRACE_ENV_VAR, str(trace))
    chains = AdaptiveChains(4, lookup=True, adaptive=True)
    repeated = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]
    batch = _batch({"a": repeated})
    rejected = None
    for _ in range(3):
        plan = chains.plan(batch, 1, torch.tensor([3]), rejected, np.array([True]))
        rejected = torch.tensor([plan.num_tokens[0]])
        chains.compose(plan, torch.zeros(1, plan.draft_steps, dtype=torch.long), None, 2.0)
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(lines) == 3
    first, second = lines[0], lines[1]
    assert first["batch"] == 1 and first["sources"] == ["l"] and first["lookup"] == [4]
    assert first["last"] is None   # nothing measured before the first step
    assert second["last"]["verified"] == 1 + first["k"][0]
    assert first["accepted"] == [0] and second["accepted"] == [0]  # all rejected
    assert second["last"]["predicted_ms"] == first["expected_ms"]
    summary = summarise_trace(str(trace))
    assert summary["steps"] == 3 and sum(summary["k_by_source"].values()) == 3
    assert summary["measured_over_predicted"] > 0
