"""Context lookup: propose what followed the latest tokens earlier in the same request.

Prompt lookup (vLLM's ``ngram``) and SuffixDecoding exploit that long contexts
are full of text the model copies. Given one request's tokens ``h[0..e]`` (prompt
and generated, e = the latest), a *match* is an earlier end position p < e whose
preceding tokens equal the latest ones:

    m(p) = the largest m <= max_ngram with h[p - j] == h[e - j] for j < m

The proposal follows the longest match (M = max m(p), at least ``min_ngram``);
among ties the most recent p wins (text generated lately is what is copied
next; ``prefer_recent=False`` takes the earliest, as vLLM's ``ngram`` does). Its continuation reads on from p + 1 in the history extended by the
proposal itself, so a match that runs into the present (a loop of period
e - p < k) repeats its period instead of stopping short:

    proposal[i] = (h + proposal)[p + 1 + i],   i = 0..k-1

Example: h = a b c x a b d y a b, k = 3, max_ngram 4. The suffix "a b" ends at
p = 1 and p = 5 (m = 2; "y a b" does not recur); p = 5 wins: proposal d y a,
with 2 occurrences of which 1 (p = 5) was followed by d.

Besides the tokens, ``LookupProposal`` says how strong the match is (``match_len``
= M), how often the matched n-gram occurred before (``occurrences`` = the ties)
and how many of those were followed by the proposed first token (``agreeing``),
so a rule (``LookupRule``) can decide between the lookup and the draft.

``TokenIndex`` keeps one request's tokens in a growing buffer and a map from
every key n-gram (the last ``key_len`` <= 2 tokens, packed into one int) to the
positions where it ends, appended as tokens arrive: a step costs a dict lookup
and a few vectorised comparisons over the candidates, not a scan of the history.
``ContextLookup`` holds one index per request; call ``remove_request`` when a
request finishes (or is preempted without its tokens) to free it. An index
takes about 40 bytes per token with 1-token keys and 120 with 2-token keys
(tracemalloc, the 7k benchmark prompts).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

_TOKEN_BITS = 31  # token ids are < 2**31; two fit one int64 key exactly
_EMPTY = np.empty(0, dtype=np.int32)


@dataclass(frozen=True)
class LookupProposal:
    tokens: np.ndarray   # [k] int32 proposed continuation; [0] when there is no match
    match_len: int       # M: matched n-gram length, 0 when there is no match
    occurrences: int     # earlier positions matching the last M tokens (ties)
    agreeing: int        # of those, how many were followed by tokens[0]

    @property
    def found(self) -> bool:
        return self.match_len > 0


NO_MATCH = LookupProposal(_EMPTY, 0, 0, 0)


@dataclass(frozen=True)
class LookupRule:
    """Use the lookup proposal for a chain when its match is at least ``min_match`` long.

    The default is measured with the shipped draft (benchmarks/results/lookup_rule.md):
    its lookup beat the draft at every match length; a stronger draft raises it.
    """

    min_match: int = 1

    def accepts(self, match_len: int) -> bool:
        return match_len >= self.min_match

    def use_lookup(self, proposal: LookupProposal) -> bool:
        return self.accepts(proposal.match_len)


class _Positions:
    """A growing int32 array: the end positions of one key n-gram, ascending."""

    __slots__ = ("array", "size")

    def __init__(self, initial: np.ndarray):
        self.array = np.asarray(initial, dtype=np.int32)
        self.size = len(initial)

    def append(self, position: int) -> None:
        if self.size == len(self.array):
            grown = np.empty(max(4, 2 * self.size), dtype=np.int32)
            grown[:self.size] = self.array[:self.size]
            self.array = grown
        self.array[self.size] = position
        self.size += 1

    def view(self) -> np.ndarray:
        return self.array[:self.size]


class TokenIndex:
    """One request's tokens, indexed by key n-gram for ``propose``."""

    def __init__(self, tokens: Sequence[int] | np.ndarray = (), *, min_ngram: int = 1,
                 max_ngram: int = 8, prefer_recent: bool = True):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram ({min_ngram}) <= max_ngram ({max_ngram})")
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        # among equally long matches: the most recent (default) or the earliest
        # (as vLLM's ngram proposer)
        self.prefer_recent = prefer_recent
        self.key_len = min(min_ngram, 2)
        self._buffer = np.empty(max(16, len(tokens)), dtype=np.int32)
        self._size = 0
        self._ends: dict[int, _Positions] = {}
        self._extend_bulk(np.asarray(tokens, dtype=np.int64))

    def __len__(self) -> int:
        return self._size

    @property
    def tokens(self) -> np.ndarray:
        """[T] int32 the request's tokens so far (a view; do not modify)."""
        return self._buffer[:self._size]

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens (a few per step: one dict append each)."""
        tokens = np.fromiter(tokens, dtype=np.int64) if not isinstance(
            tokens, np.ndarray) else tokens.astype(np.int64, copy=False)
        if len(tokens) > 32:
            self._extend_bulk(tokens)
            return
        self._reserve(len(tokens))
        for token in tokens.tolist():
            self._check_token(token)
            self._buffer[self._size] = token
            self._size += 1
            if self._size >= self.key_len:
                self._ends_for(self._key_at(self._size - 1)).append(self._size - 1)

    def propose(self, k: int) -> LookupProposal:
        """The continuation (k tokens) after the longest, most recent match."""
        end = self._size - 1
        if k <= 0 or end < self.key_len:
            return NO_MATCH
        ends = self._ends.get(self._key_at(end))
        # every earlier end of the key n-gram (the last entry is `end` itself)
        candidates = ends.view()[:-1] if ends is not None else ends
        if candidates is None or len(candidates) == 0:
            return NO_MATCH
        history = self._buffer
        # the key's own tokens already match; compare the max_ngram - key_len tokens
        # before them at once: [n, J] h[p - j] == h[end - j] for j = key_len..
        offsets = np.arange(self.key_len, min(self.max_ngram, end + 1))
        if len(offsets):
            before = candidates[:, None] - offsets                       # [n, J]
            equal = ((history[np.maximum(before, 0)] == history[end - offsets])
                     & (before >= 0))
            # [n] match length: the key plus the run of equal tokens right before it
            lengths = self.key_len + np.logical_and.accumulate(equal, axis=1).sum(axis=1)
            match_len = int(lengths.max())
            candidates = candidates[lengths == match_len]
        else:
            match_len = self.key_len
        if match_len < self.min_ngram:
            return NO_MATCH
        start = int(candidates[-1 if self.prefer_recent else 0]) + 1
        proposal = np.empty(k, dtype=np.int32)
        # [known] tokens read from the history; the rest repeat the proposal itself
        known = min(k, self._size - start)
        proposal[:known] = history[start:start + known]
        for i in range(known, k):
            proposal[i] = proposal[i - (self._size - start)]
        agreeing = int(np.count_nonzero(history[candidates + 1] == proposal[0]))
        return LookupProposal(proposal, match_len, len(candidates), agreeing)

    def _key_at(self, end: int) -> int:
        if self.key_len == 1:
            return int(self._buffer[end])
        return (int(self._buffer[end - 1]) << _TOKEN_BITS) | int(self._buffer[end])

    def _ends_for(self, key: int) -> _Positions:
        positions = self._ends.get(key)
        if positions is None:
            positions = self._ends[key] = _Positions(np.empty(0, dtype=np.int32))
        return positions

    def _reserve(self, extra: int) -> None:
        if self._size + extra > len(self._buffer):
            grown = np.empty(max(2 * len(self._buffer), self._size + extra), dtype=np.int32)
            grown[:self._size] = self._buffer[:self._size]
            self._buffer = grown

    @staticmethod
    def _check_token(token: int) -> None:
        if not 0 <= token < 1 << _TOKEN_BITS:
            raise ValueError(f"token id {token} outside [0, 2**31)")

    def _extend_bulk(self, tokens: np.ndarray) -> None:
        """Append many tokens at once (a prompt): the new keys grouped by sort."""
        if len(tokens) == 0:
            return
        if tokens.min() < 0 or tokens.max() >= 1 << _TOKEN_BITS:
            raise ValueError("token ids must lie in [0, 2**31)")
        old = self._size
        self._reserve(len(tokens))
        self._buffer[old:old + len(tokens)] = tokens
        self._size += len(tokens)
        first_end = max(old, self.key_len - 1)
        # [n] end positions of the new key n-grams, and their packed keys
        ends = np.arange(first_end, self._size, dtype=np.int64)
        keys = self._buffer[ends].astype(np.int64)
        if self.key_len == 2:
            keys |= self._buffer[ends - 1].astype(np.int64) << _TOKEN_BITS
        order = np.argsort(keys, kind="stable")  # stable: ends stay ascending per key
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        stops = np.r_[starts[1:], len(order)]
        for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
            key = int(sorted_keys[start])
            group = ends[order[start:stop]]
            positions = self._ends.get(key)
            if positions is None:
                self._ends[key] = _Positions(group)
            else:
                for position in group.tolist():
                    positions.append(position)


class ContextLookup:
    """One ``TokenIndex`` per request: add, keep in step, propose, remove."""

    def __init__(self, *, min_ngram: int = 1, max_ngram: int = 8,
                 prefer_recent: bool = True):
        self.options = {"min_ngram": min_ngram, "max_ngram": max_ngram,
                        "prefer_recent": prefer_recent}
        self._requests: dict[Hashable, TokenIndex] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._requests

    def add_request(self, request_id: Hashable,
                    token_ids: Sequence[int] | np.ndarray) -> None:
        """Start (or restart) a request from its prompt and any generated tokens."""
        self._requests[request_id] = TokenIndex(token_ids, **self.options)

    def extend(self, request_id: Hashable, new_token_ids: Iterable[int]) -> None:
        self._requests[request_id].extend(new_token_ids)

    def sync(self, request_id: Hashable, token_ids: Sequence[int] | np.ndarray,
             tail: Sequence[int] = ()) -> None:
        """Bring a request up to its full token list, ``token_ids`` then ``tail``
        (e.g. a runner's token row, then the tokens this step added to it).

        Appends what is new; restarts the request when the list is shorter than
        what is known or its last known token differs (it was rewound). The
        list is never joined unless the request restarts: a step reads one
        token of the row and appends a few.
        """
        index = self._requests.get(request_id)
        known = len(index) if index is not None else 0
        head = len(token_ids)
        total = head + len(tail)
        if (index is None or total < known or (known and int(
                token_ids[known - 1] if known <= head else tail[known - 1 - head])
                != int(index.tokens[-1]))):
            self.add_request(request_id, np.concatenate(
                [np.asarray(token_ids, dtype=np.int64), np.asarray(tail, dtype=np.int64)]))
        elif total > known:
            index.extend(np.asarray(tail[known - head:], dtype=np.int64) if known >= head
                         else np.concatenate([np.asarray(token_ids[known:], dtype=np.int64),
                                              np.asarray(tail, dtype=np.int64)]))

    def propose(self, request_id: Hashable, k: int) -> LookupProposal:
        return self._requests[request_id].propose(k)

    def remove_request(self, request_id: Hashable) -> None:
        """Free a finished request's index (unknown ids are ignored)."""
        self._requests.pop(request_id, None)
