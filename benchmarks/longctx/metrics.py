"""From a cell's raw record (``worker.py``) to the metrics the suite reports.

Pure functions of plain data, so that ``tests/unit/test_benchmark_suite.py``
checks them on synthetic traces and results can be recomputed from the cached
cells without rerunning anything.

Definitions (also in docs/benchmarks.md):

- a *decode step* is a step of ``LLMEngine.step`` that began with no request
  of its group waiting for its first token: prefill, and steps that mix
  prefill chunks with decoding, are excluded. Its duration is the time since
  the previous step returned (or since the group's requests were added);
- *decode tokens/s* = tokens received in decode steps / total duration of the
  decode steps, summed over the cell's groups. At batch size 1 this is, per
  request, (output tokens - 1) / (time of last token - time of first token);
  at batch size B it is the aggregate throughput of the B requests;
- *time per output token*: each time a request receives n tokens in a decode
  step, n samples of (time since it last received tokens) / n; p50 and p99
  over all samples of the cell;
- *tokens per step*: tokens a request receives per decode step in which it
  receives any (1 for plain decoding; accepted drafts + 1 with speculation);
- *mean accepted length* = 1 + accepted / drafts from vLLM's counters (the +1
  is the bonus token). vLLM counts a draft only when one was proposed, so a
  method that often proposes nothing (``ngram`` without a match) can show a
  high accepted length and few tokens per step;
- *acceptance by position* i = drafts whose i-th token was accepted / drafts;
- *speedup* = decode tokens/s of a method / that of plain decoding in the same
  (setting, task, context length, batch size); with ``--rounds R`` each
  cell's decode tokens/s is the median of its R rounds' (``round_metrics``),
  and the report also gives each round's own speedup;
- *first divergence*: the first output position where a request's tokens differ
  from plain decoding's for the same prompt, copy and batch size (None: the
  outputs are identical). Greedy float32 decoding must be exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Record = dict[str, Any]


@dataclass(frozen=True)
class SpecCounters:
    drafts: int
    draft_tokens: int
    accepted_tokens: int
    accepted_per_position: tuple[int, ...]

    @classmethod
    def from_counters(cls, counters: Record) -> SpecCounters:
        return cls(counters["drafts"], counters["draft_tokens"],
                   counters["accepted_tokens"],
                   tuple(counters.get("accepted_per_position", ())))

    def __add__(self, other: SpecCounters) -> SpecCounters:
        width = max(len(self.accepted_per_position), len(other.accepted_per_position))
        per_position = tuple(
            _at(self.accepted_per_position, i) + _at(other.accepted_per_position, i)
            for i in range(width))
        return SpecCounters(self.drafts + other.drafts,
                            self.draft_tokens + other.draft_tokens,
                            self.accepted_tokens + other.accepted_tokens, per_position)

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens per drafting step, the bonus token included."""
        return 1 + self.accepted_tokens / self.drafts if self.drafts else None

    @property
    def acceptance_by_position(self) -> tuple[float, ...]:
        if not self.drafts:
            return ()
        return tuple(count / self.drafts for count in self.accepted_per_position)

    @property
    def draft_acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None


def _at(values: Sequence[int], index: int) -> int:
    return values[index] if index < len(values) else 0


@dataclass(frozen=True)
class DecodeTiming:
    tokens: int  # tokens received in decode steps
    seconds: float  # total duration of the decode steps
    emitting_steps: int  # (request, decode step) pairs with at least one token
    token_times: tuple[float, ...]  # seconds per output token, one per token

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None

    @property
    def tokens_per_step(self) -> float | None:
        return self.tokens / self.emitting_steps if self.emitting_steps else None

    def time_per_token(self, percent: float) -> float | None:
        return percentile(self.token_times, percent)


def decode_timing(groups: Iterable[Record]) -> DecodeTiming:
    """Decode-only throughput and per-token times of groups (see module doc)."""
    tokens, seconds, emitting_steps, token_times = 0, 0.0, 0, []
    for group in groups:
        num_requests = len(group["requests"])
        last_received: list[float | None] = [None] * num_requests
        previous_t = 0.0
        for step in group["steps"]:
            is_decode = step["prefilling"] == 0
            if is_decode:
                seconds += step["t"] - previous_t
            for i, count in enumerate(step["emitted"]):
                if count <= 0:
                    continue
                if is_decode:
                    tokens += count
                    emitting_steps += 1
                    if last_received[i] is not None:
                        gap = step["t"] - last_received[i]
                        token_times += [gap / count] * count
                last_received[i] = step["t"]
            previous_t = step["t"]
    return DecodeTiming(tokens, seconds, emitting_steps, tuple(token_times))


def percentile(values: Sequence[float], percent: float) -> float | None:
    """Linear-interpolation percentile (numpy's default); None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), percent))


def speedup(tokens_per_s: float | None, baseline: float | None) -> float | None:
    """Ratio of decode throughputs; None when either is unknown (or zero)."""
    if tokens_per_s is None or not baseline:
        return None
    return tokens_per_s / baseline


def first_divergence(tokens: Sequence[int], reference: Sequence[int]) -> int | None:
    """First position where two outputs differ (a length difference counts)."""
    for position, (token, expected) in enumerate(zip(tokens, reference, strict=False)):
        if token != expected:
            return position
    if len(tokens) != len(reference):
        return min(len(tokens), len(reference))
    return None


def outputs_by_request(records: Iterable[Record]) -> dict[tuple[str, int], list[int]]:
    """Output tokens of every request of the records, keyed by (prompt id, copy)."""
    return {(request["prompt_id"], request["copy"]): request["token_ids"]
            for record in records for group in record["groups"]
            for request in group["requests"]}


def divergences(records: Iterable[Record], baseline_records: Iterable[Record]
                ) -> dict[str, int | None]:
    """First divergence from the baseline per request ("prompt_id#copy")."""
    baseline = outputs_by_request(baseline_records)
    return {f"{prompt_id}#{copy}": first_divergence(tokens, baseline[prompt_id, copy])
            for (prompt_id, copy), tokens in outputs_by_request(records).items()}


@dataclass(frozen=True)
class CellMetrics:
    requests: int
    output_tokens: int
    decode_tokens_per_s: float | None
    tokens_per_step: float | None
    time_per_token_p50_ms: float | None
    time_per_token_p99_ms: float | None
    mean_accepted_length: float | None
    acceptance_by_position: tuple[float, ...]
    draft_acceptance_rate: float | None
    preemptions: int
    # --rounds: each round's decode tokens/s (decode_tokens_per_s is their median)
    decode_tokens_per_s_by_round: tuple[float | None, ...] = ()


def round_metrics(rounds: Sequence[Sequence[Record]]) -> CellMetrics:
    """Metrics of a cell measured in several rounds (``--rounds``), each round
    a list of records (one cell's, or several pooled): everything pooled over
    the rounds except decode tokens/s, the median of the rounds' values. Each
    round runs its own engines, and on a shared VM one engine can run tens of
    percent slower than the next: the median keeps one slow engine out."""
    pooled = cell_metrics([record for records in rounds for record in records])
    by_round = tuple(cell_metrics(records).decode_tokens_per_s for records in rounds)
    known = [value for value in by_round if value is not None]
    return dataclasses.replace(pooled, decode_tokens_per_s_by_round=by_round,
                               decode_tokens_per_s=float(np.median(known)) if known
                               else None)


def cell_metrics(records: Sequence[Record]) -> CellMetrics:
    """Metrics of one cell, or of several cells pooled (e.g. all tasks)."""
    groups = [group for record in records for group in record["groups"]]
    timing = decode_timing(groups)
    counters = SpecCounters(0, 0, 0, ())
    for record in records:
        counters = counters + SpecCounters.from_counters(record["counters"])
    requests = [request for group in groups for request in group["requests"]]
    return CellMetrics(
        requests=len(requests),
        output_tokens=sum(len(request["token_ids"]) for request in requests),
        decode_tokens_per_s=timing.tokens_per_s,
        tokens_per_step=timing.tokens_per_step,
        time_per_token_p50_ms=_ms(timing.time_per_token(50)),
        time_per_token_p99_ms=_ms(timing.time_per_token(99)),
        mean_accepted_length=counters.mean_accepted_length,
        acceptance_by_position=counters.acceptance_by_position,
        draft_acceptance_rate=counters.draft_acceptance_rate,
        preemptions=sum(record["counters"]["preemptions"] for record in records),
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds
