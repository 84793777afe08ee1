"""Context lookup against a brute-force reference, step by step as tokens arrive."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_longspec.speculation.lookup import ContextLookup, LookupRule, TokenIndex


def reference(history: list[int], k: int, min_ngram: int, max_ngram: int,
              prefer_recent: bool = True):
    """(tokens, match_len, occurrences, agreeing) by trying every earlier end p."""
    end = len(history) - 1
    lengths = {}
    for p in range(end):
        m = 0
        while m < max_ngram and p - m >= 0 and history[p - m] == history[end - m]:
            m += 1
        lengths[p] = m
    best = max(lengths.values(), default=0)
    if best < min_ngram or k <= 0:
        return [], 0, 0, 0
    ties = [p for p, m in lengths.items() if m == best]
    extended = list(history)
    for i in range(k):
        extended.append(extended[(max if prefer_recent else min)(ties) + 1 + i])
    tokens = extended[len(history):]
    agreeing = sum(history[p + 1] == tokens[0] for p in ties)
    return tokens, best, len(ties), agreeing


def sequences():
    rng = np.random.default_rng(0)
    yield "random-small-vocab", rng.integers(0, 4, 300).tolist()
    yield "random-large-vocab", rng.integers(0, 50_000, 300).tolist()
    yield "constant", [7] * 60
    yield "period-3", [1, 2, 3] * 40
    # copied spans with edits: the case lookup is for
    base = rng.integers(0, 30, 80).tolist()
    noisy = base + base[10:50] + [99] + base[20:70] + base[:30]
    yield "copied-spans", noisy
    yield "big-ids", [2**31 - 1, 0, 2**31 - 1, 0, 5, 2**31 - 1, 0]


@pytest.mark.parametrize("min_ngram,max_ngram,recent", [
    (1, 8, True), (2, 5, True), (3, 3, True), (1, 1, True), (2, 5, False)])
@pytest.mark.parametrize("name,tokens", list(sequences()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_step_matches_the_reference(name, tokens, min_ngram, max_ngram, recent):
    index = TokenIndex(tokens[:5], min_ngram=min_ngram, max_ngram=max_ngram,
                       prefer_recent=recent)
    position = 5
    step = 0
    while position <= len(tokens):
        for k in (1, 4):
            got = index.propose(k)
            want = reference(tokens[:position], k, min_ngram, max_ngram, recent)
            assert (got.tokens.tolist(), got.match_len, got.occurrences,
                    got.agreeing) == want, (name, position, k)
        # grow by 1..3 tokens per step, sometimes a bulk chunk
        grow = 40 if step % 17 == 16 else 1 + step % 3
        index.extend(tokens[position:position + grow])
        position += grow
        step += 1
    assert index.tokens.tolist() == tokens


def test_the_docstring_example():
    a, b, c, x, y = 1, 2, 3, 4, 5
    d = 6
    proposal = TokenIndex([a, b, c, x, a, b, d, y, a, b], max_ngram=4).propose(3)
    assert proposal.tokens.tolist() == [d, y, a]
    assert (proposal.match_len, proposal.occurrences, proposal.agreeing) == (2, 2, 1)


def test_bulk_build_equals_incremental_build():
    tokens = np.random.default_rng(1).integers(0, 6, 500)
    bulk = TokenIndex(tokens, min_ngram=2)
    grown = TokenIndex(min_ngram=2)
    for token in tokens.tolist():
        grown.extend([token])
    for k in range(1, 6):
        assert bulk.propose(k).tokens.tolist() == grown.propose(k).tokens.tolist()
    assert bulk._ends.keys() == grown._ends.keys()
    for key, positions in bulk._ends.items():
        assert positions.view().tolist() == grown._ends[key].view().tolist()


def test_requests_are_separate_synced_and_freed():
    lookup = ContextLookup(max_ngram=4)
    lookup.add_request("a", [1, 2, 3, 1, 2])
    lookup.add_request("b", [1, 2, 9, 1, 2])
    assert lookup.propose("a", 2).tokens.tolist() == [3, 1]
    assert lookup.propose("b", 2).tokens.tolist() == [9, 1]
    lookup.sync("a", [1, 2, 3, 1, 2, 3, 4, 1, 2])          # appends 3 4 1 2
    assert lookup.propose("a", 2).tokens.tolist() == [3, 4]
    lookup.sync("a", [1, 2, 8, 1, 2])                      # rewound: rebuilt
    assert lookup.propose("a", 2).tokens.tolist() == [8, 1]
    lookup.remove_request("a")
    assert "a" not in lookup and len(lookup) == 1
    lookup.remove_request("a")  # idempotent
    with pytest.raises(KeyError):
        lookup.propose("a", 2)


def test_sync_with_a_tail_is_sync_of_the_joined_list():
    """``sync(id, row, tail)`` (the runner's row, then this step's tokens) keeps
    the index exactly as ``sync(id, row + tail)``: appending at every split of
    old and new tokens between row and tail, and restarting on a rewind."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        history = rng.integers(0, 5, size=int(rng.integers(1, 30))).tolist()
        joined, split = ContextLookup(max_ngram=4), ContextLookup(max_ngram=4)
        known = int(rng.integers(0, len(history) + 1))
        if known:
            joined.add_request("r", history[:known])
            split.add_request("r", history[:known])
        if rng.random() < 0.3 and len(history) > 1:   # rewound: the last token changed
            history[-1] += 5
        cut = int(rng.integers(0, len(history) + 1))
        joined.sync("r", history)
        split.sync("r", np.asarray(history[:cut]), tuple(history[cut:]))
        assert split._requests["r"].tokens.tolist() == history
        for k in (1, 3):
            assert (split.propose("r", k).tokens.tolist()
                    == joined.propose("r", k).tokens.tolist())


def test_no_match_and_rule():
    index = TokenIndex([5, 6, 7], min_ngram=2)
    assert not index.propose(4).found and len(index.propose(4).tokens) == 0
    index.extend([5, 6])
    proposal = index.propose(3)
    assert proposal.found and proposal.tokens.tolist() == [7, 5, 6]
    assert LookupRule(min_match=2).use_lookup(proposal)
    assert LookupRule(min_match=2).accepts(2) and not LookupRule(min_match=2).accepts(1)
    assert not LookupRule(min_match=3).use_lookup(proposal)
    with pytest.raises(ValueError):
        TokenIndex([-1])
    with pytest.raises(ValueError):
        TokenIndex(min_ngram=3, max_ngram=2)
