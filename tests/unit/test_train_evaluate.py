"""The simulated accepted length of greedy chain drafting."""

from __future__ import annotations

import torch

from vllm_longspec.train.evaluate import simulate_rounds


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
