"""Greedy chain rounds by proposal source: the draft, context lookup, or a hybrid.

Under greedy decoding the tokens a request emits do not depend on what was
proposed, only how many rounds they take. So for every position b where a round
can start (its bonus token at b) we can say how many proposed tokens each source
would get accepted, once, and then walk the rounds of any rule that picks a
source per round:

- ``draft``: the draft's chain of K (from ``hits``, see ``evaluate.simulate_rounds``);
- ``lookup``: ``TokenIndex.propose(K)`` over tokens[:b + 1]; no match proposes nothing;
- ``hybrid`` at threshold t: the lookup when its match is at least t tokens
  long (``LookupRule``), else the draft.

A round emits its accepted tokens plus the target's own. A round that uses the
lookup runs no draft step; one that uses the draft runs K. With r = (time of a
draft step) / (time of a verification round), a round costs 1 + r K or 1 units,
and tokens per cost unit ranks rules by speed at equal verification cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_longspec.speculation.lookup import LookupRule, TokenIndex

DRAFT, LOOKUP, NONE = "draft", "lookup", "none"


@dataclass(frozen=True)
class RoundOptions:
    """What a round whose bonus token is at b gets from each source, b in [start, end)."""

    start: int
    end: int
    draft_accepted: np.ndarray   # [end - start] accepted draft tokens of a K-chain
    lookup_accepted: np.ndarray  # [end - start] accepted lookup tokens (0: no match)
    match_len: np.ndarray        # [end - start] lookup match length (0: no match)
    lookup_seconds: np.ndarray   # [end - start] time to extend the index and propose


@dataclass
class Rounds:
    emitted: list[int] = field(default_factory=list)  # tokens per round, bonus included
    sources: list[str] = field(default_factory=list)  # DRAFT, LOOKUP or NONE per round

    def cost_units(self, k: int, draft_step_ratio: float) -> float:
        return sum(1 + draft_step_ratio * k * (s == DRAFT) for s in self.sources)


def draft_accepted(hits: torch.Tensor, start: int, end: int) -> np.ndarray:
    """[end - start] accepted drafts of a round at each bonus b (hits: [K, T] bool)."""
    hits = hits.numpy()
    num_drafts = hits.shape[0]
    accepted = np.zeros(end - start, dtype=np.int64)
    for bonus in range(start, end):
        count = 0
        while (count < num_drafts and bonus + count + 1 < end
               and hits[count, bonus + count]):
            count += 1
        accepted[bonus - start] = count
    return accepted


def lookup_options(tokens: list[int], start: int, end: int, k: int, max_ngram: int,
                   prefer_recent: bool = True
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([end - start] accepted, match length, seconds) of the lookup at each bonus b.

    The index grows one token per position, as in serving; the time is that of
    one ``extend`` + ``propose``.
    """
    index = TokenIndex(tokens[:start], min_ngram=1, max_ngram=max_ngram,
                       prefer_recent=prefer_recent)
    accepted = np.zeros(end - start, dtype=np.int64)
    match_len = np.zeros(end - start, dtype=np.int64)
    seconds = np.zeros(end - start)
    for bonus in range(start, end):
        began = time.perf_counter()
        index.extend([tokens[bonus]])
        proposal = index.propose(k)
        seconds[bonus - start] = time.perf_counter() - began
        # accepted drafts stop one short of `end` (the round's own token is last)
        room = min(k, end - bonus - 1)
        truth = tokens[bonus + 1:bonus + 1 + room]
        count = 0
        while count < min(room, len(proposal.tokens)) and proposal.tokens[count] == truth[count]:
            count += 1
        accepted[bonus - start] = count
        match_len[bonus - start] = proposal.match_len
    return accepted, match_len, seconds


def walk(options: RoundOptions, source: str, threshold: int = 1) -> Rounds:
    """The rounds of one source (``draft``, ``lookup`` or ``hybrid`` at ``threshold``)."""
    rule = LookupRule(min_match=threshold)
    rounds, bonus = Rounds(), options.start
    while bonus < options.end:
        i = bonus - options.start
        if source != DRAFT and rule.accepts(int(options.match_len[i])):
            used, accepted = LOOKUP, int(options.lookup_accepted[i])
        elif source == LOOKUP:
            used, accepted = NONE, 0
        else:
            used, accepted = DRAFT, int(options.draft_accepted[i])
        rounds.emitted.append(accepted + 1)
        rounds.sources.append(used)
        bonus += accepted + 1
    return rounds


def round_options(tokens: list[int], hits: torch.Tensor, start: int, end: int,
                  k: int, max_ngram: int, prefer_recent: bool = True) -> RoundOptions:
    """Both sources' outcomes at every bonus position of one request."""
    accepted, match_len, seconds = lookup_options(tokens, start, end, k, max_ngram,
                                                  prefer_recent)
    return RoundOptions(start, end, draft_accepted(hits, start, end), accepted,
                        match_len, seconds)


def source_totals(rounds: Rounds) -> dict[str, int]:
    return {"tokens": sum(rounds.emitted), "rounds": len(rounds.emitted),
            "lookup_rounds": rounds.sources.count(LOOKUP),
            "draft_rounds": rounds.sources.count(DRAFT)}


def by_match_length(options: RoundOptions) -> dict[int, dict[str, int]]:
    """Per lookup match length, over every bonus position: how many, and the
    accepted tokens the lookup and the draft would each get there."""
    table: dict[int, dict[str, int]] = {}
    for m, lookup, draft in zip(options.match_len.tolist(), options.lookup_accepted.tolist(),
                                options.draft_accepted.tolist(), strict=True):
        row = table.setdefault(m, {"positions": 0, "lookup_accepted": 0,
                                   "draft_accepted": 0})
        row["positions"] += 1
        row["lookup_accepted"] += lookup
        row["draft_accepted"] += draft
    return table
