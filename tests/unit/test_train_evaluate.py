"""The simulated accepted length of greedy chain rounds: draft, lookup, hybrid."""

from __future__ import annotations

import numpy as np
import torch

from vllm_longspec.train.evaluate import simulate_rounds
from vllm_longspec.train.lookup_report import PromptResult, Summary
from vllm_longspec.train.round_sources import RoundOptions, round_options, walk


def _hits(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows])


def test_rounds_follow_the_first_miss():
    # K=2 over positions 0..9; bonus tokens at 2, then wherever rounds end.
    hits = _hits(["0011011111",   # step 0 of a round whose bonus is at t
                  "0000100111"])  # step 1 of a round whose bonus is at t-1
    # bonus 2: step0 hit at 2, step1 at 3? no -> emits 2, next bonus 4
    # bonus 4: step0 at 4? no -> emits 1, next bonus 5
    # bonus 5: step0 at 5 hit, step1 at 6? no -> emits 2, next bonus 7
    # bonus 7: step0 at 7 hit; step1 would pass the end (9) -> emits 2
    rounds = simulate_rounds(hits, start=2, end=9)
    assert rounds == [2, 1, 2, 2]
    assert sum(rounds) == 9 - 2  # every token after the first bonus, once


def test_nothing_is_accepted_past_the_end():
    hits = torch.ones(4, 10, dtype=torch.bool)
    # bonus 1, end 5: four tokens remain, so 3 drafts + the target's token
    assert simulate_rounds(hits, start=1, end=5) == [4]
    assert simulate_rounds(hits, start=1, end=9) == [5, 3]
    assert simulate_rounds(torch.zeros(3, 6, dtype=torch.bool), 0, 5) == [1] * 5


def _options(tokens, hits, start, end, k=2, max_ngram=4):
    return round_options(tokens, hits, start, end, k, max_ngram)


def test_draft_walk_equals_simulate_rounds():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        hits = torch.rand(3, 40, generator=generator) < 0.3 + 0.03 * trial
        tokens = torch.randint(0, 5, (40,), generator=generator).tolist()
        options = _options(tokens, hits, 3, 39, k=3)
        assert walk(options, "draft").emitted == simulate_rounds(hits, 3, 39)
        assert set(walk(options, "draft").sources) == {"draft"}


def test_lookup_accepted_matches_the_reference_proposal():
    from tests.unit.test_context_lookup import reference

    generator = torch.Generator().manual_seed(1)
    base = torch.randint(0, 50, (30,), generator=generator).tolist()
    tokens = base + base[5:25] + [7, 7, 7, 7] + base[:15]
    start, end, k = 30, len(tokens) - 1, 3
    options = _options(tokens, torch.zeros(k, len(tokens), dtype=torch.bool), start, end, k)
    for bonus in range(start, end):
        proposed, match_len, _, _ = reference(tokens[:bonus + 1], k, 1, 4)
        truth = tokens[bonus + 1:min(bonus + 1 + k, end)]
        accepted = 0
        while (accepted < min(len(truth), len(proposed))
               and proposed[accepted] == truth[accepted]):
            accepted += 1
        assert options.lookup_accepted[bonus - start] == accepted, bonus
        assert options.match_len[bonus - start] == match_len
    # the copied span is predicted: most rounds accept something
    assert (options.lookup_accepted > 0).mean() > 0.5


def test_hybrid_picks_the_source_per_round_by_match_length():
    options = RoundOptions(
        start=0, end=9,
        draft_accepted=np.array([1, 0, 0, 2, 0, 0, 0, 0, 0]),
        lookup_accepted=np.array([3, 0, 0, 0, 2, 0, 0, 0, 0]),
        match_len=np.array([1, 0, 0, 3, 5, 0, 0, 2, 0]),
        lookup_seconds=np.zeros(9))
    # threshold 3: b=0 draft (1+1), b=2 draft (1), b=3 lookup (0+1), b=4 lookup (2+1),
    # b=7 draft (1), b=8 draft (1)
    rounds = walk(options, "hybrid", threshold=3)
    assert rounds.emitted == [2, 1, 1, 3, 1, 1]
    assert rounds.sources == ["draft", "draft", "lookup", "lookup", "draft", "draft"]
    # lookup alone (b = 0, 4, 7, 8): no match proposes nothing and runs no draft
    rounds = walk(options, "lookup")
    assert rounds.emitted == [4, 3, 1, 1]
    assert rounds.sources == ["lookup", "lookup", "lookup", "none"]
    for threshold in (1, 3, 6):
        assert sum(walk(options, "hybrid", threshold).emitted) == 9


def test_summary_chooses_the_threshold_with_most_tokens_per_cost():
    # at match length 1 the lookup accepts 0 and the draft 2; at 2 the lookup 4, the
    # draft 0. hybrid@1: rounds of 1 + 5 tokens at cost 2; hybrid@2: 3 + 5 at cost
    # 2 + 0.4; hybrid@3 (draft only): 3 at 1.4
    room = 40 - np.arange(40) - 1
    options = RoundOptions(
        start=0, end=40, draft_accepted=np.minimum(np.array([2, 0] * 20), room),
        lookup_accepted=np.minimum(np.array([0, 4] * 20), room),
        match_len=np.array([1, 2] * 20), lookup_seconds=np.zeros(40))
    record = {"id": "x", "prompt_token_ids": [0] * 10}
    result = PromptResult.measure(record, 41, options, options, k=4, max_ngram=3)
    summary = Summary([result], k=4, max_ngram=3, draft_step_ratio=0.1)
    assert summary.threshold == 2
    best = summary.per_cost(summary.totals["hybrid@2"])
    assert best > summary.per_cost(summary.totals["hybrid@1"])
    assert best > summary.per_cost(summary.totals["hybrid@3"])
    assert "least 2 tokens long" in summary.markdown("cmd", "draft")


def test_summary_counts_the_draft_steps_a_lookup_round_saves():
    # everywhere a 1-token match: the lookup accepts 2, the draft 3; per round the
    # draft wins (4 vs 3 tokens), per cost unit the lookup (3 / 1 vs 4 / 1.4)
    room = 60 - np.arange(60) - 1
    options = RoundOptions(
        start=0, end=60, draft_accepted=np.minimum(3, room),
        lookup_accepted=np.minimum(2, room), match_len=np.ones(60, dtype=np.int64),
        lookup_seconds=np.zeros(60))
    result = PromptResult.measure({"prompt_token_ids": [0]}, 61, options, options,
                                  k=4, max_ngram=2)
    assert Summary([result], k=4, max_ngram=2, draft_step_ratio=0.1).threshold == 1
    assert Summary([result], k=4, max_ngram=2, draft_step_ratio=0.0).threshold == 2


def test_the_evaluator_drafts_with_the_window_the_draft_was_exported_with(tmp_path):
    import json

    from vllm_longspec.model.checkpoint import random_draft_state, save_draft
    from vllm_longspec.train.evaluate import DraftEvaluator
    from vllm_longspec.train.tiny_target import save_tiny_llama

    target = save_tiny_llama(tmp_path / "target")
    config = json.loads((target / "config.json").read_text())
    draft = save_draft(tmp_path / "draft", random_draft_state(config), config,
                       {"sliding_window": 7})
    assert DraftEvaluator(draft, target).draft.sliding_window == 7


def test_the_target_cache_gives_the_hits_of_a_live_target(tmp_path):
    import json

    from vllm_longspec.model.checkpoint import random_draft_state, save_draft
    from vllm_longspec.train.evaluate import DraftEvaluator
    from vllm_longspec.train.tiny_target import save_tiny_llama

    target = save_tiny_llama(tmp_path / "target")
    config = json.loads((target / "config.json").read_text())
    draft = save_draft(tmp_path / "draft", random_draft_state(config), config,
                       {"sliding_window": 7})
    tokens = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    live = DraftEvaluator(draft, target).hits(tokens, 3)
    cached = DraftEvaluator(draft, target, tmp_path / "cache")
    first = cached.hits(tokens, 3)  # computes and stores the target's features
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    cached.target = None  # a second call must not need the target
    assert torch.equal(first, live) and torch.equal(cached.hits(tokens, 3), live)
