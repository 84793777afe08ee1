"""How many tokens to speculate per request and step, so that speculation pays.

Each step, every request r proposes K_r in 0..K_max tokens from one source s_r:
the context lookup when the lookup rule took its match (``LookupRule``; free,
at most as many tokens as the lookup proposed), else the draft (one draft
forward per chain position, shared by the batch).

**Acceptance.** a_r(i) = P(position i accepted | positions < i accepted), per
request, source and chain position, from exponentially decayed counts
(``decay`` per observation). A request's estimate is shrunk towards the
population's rate for that source and position, and the population's towards
``draft_prior`` / ``lookup_priors``, each with a weight in pseudo-observations:

    rate = (accepted + w * parent) / (tried + w),   w > 0: never 0 / 0

Lookup statistics are kept per match-length class (``LOOKUP_MATCH_CLASSES``:
1, 2, 3, 4-7, >= 8 matched tokens), because how long the match is says more
about a proposal than which request made it: on the target's own answers a
1-token match's first token is accepted 3 times in 10, an 8-token match's 9 in
10 (``benchmarks/results/lookup_priors.md``, which the default priors come
from). A population pooled over classes carried one prompt's matches into the
next: after code prompts (long, reliable matches), document QA requests kept
verifying short matches that lost.

Proposing K tokens then emits in expectation E_r(K) = 1 + sum_{i<=K} g_r(i)
tokens, with gains g_r(i) = a_r(1) ... a_r(i), non-increasing in i.

**Cost.** ``cost.CostModel``: a step that verifies N = sum_r (1 + K_r) tokens for
b requests (mean context c) after D = max K_r over drafting requests draft
steps takes T = target_ms(N, b, c) + D * draft_step_ms(b_d), b_d the number of
requests drafting.

**Choice.** Maximise tokens per millisecond, sum_r E_r(K_r) / T. For each D in
0..K_max, the candidate tokens are the lookup positions i <= K_r^lookup and the
draft positions i <= D; since every request's gains fall with i, the best set
of n tokens is the n largest gains (taken in order within each request), so
scanning n over the sorted gains finds the best plan for that D. The best plan
over all D is used when it beats plain decoding, b / target_ms(b, b, c), by
``enter_margin`` (``stay_margin`` once speculating: hysteresis); otherwise
every K_r = 0, and with D = 0 no draft forward runs.

**Exploration.** Statistics of a request at K = 0 never change, so after
``probe_interval`` plain steps in a row the best speculative plan runs anyway
(a probe: it refreshes acceptance and the cost table for its N); each probe
that does not lead to speculation doubles the interval, up to
``max_probe_interval``; speculating resets it. Likewise, in a step that drafts,
a request left at K = 0 for its own interval gets K = 1.

**Worked example** (batch 1, 4k context, the default prior from issue 14's
bf16 split: target_ms(N) = 42.15 + 2.25 N, a draft step 3.25 ms). Plain:
1 token per 44.4 ms = 22.5 tok/s. Draft acceptance 0.7 at every position:
gains 0.7, 0.49, 0.343, 0.240; D = 4 gives 2.773 tokens in 53.4 + 13.0 =
66.4 ms = 41.8 tok/s (D = 3: 2.533 / 60.9 ms = 41.6), so K = 4. At acceptance
0.1: D = 1 gives 1.1 tokens in 46.65 + 3.25 = 49.9 ms = 22.0 tok/s < 22.5, so
K = 0 and no draft runs. A lookup proposal of 4 tokens accepted at 0.7 costs
no draft step: 2.773 / 53.4 ms = 51.9 tok/s. (``tests/unit/test_policy.py``
recomputes these numbers.)

**vLLM's dynamic speculative decoding** (0.32: ``num_speculative_tokens_per_
batch_size``, ``vllm/v1/spec_decode/dynamic/utils.py``) is a schedule fixed at
start-up: inclusive batch-size ranges -> K, expanded into a dense table; the
scheduler looks up K = table[batch size] every step and hands that one K to the
drafter for every request. It can: back off to fewer tokens at large batches
with no runtime cost, and it keeps vLLM's own scheduling (slots, padding)
consistent with the K used. It cannot: react to acceptance (per request, per
position, drifting over a generation) or to lookup matches, to the context
length, or to measured step times (dtype, machine load); give requests
different K; or skip the draft at K = 0 (vLLM's proposers still run the first
draft forward to keep the draft's KV cache in sync). So it fits only as a
static upper bound: ``static_schedule`` turns our cost model and population
acceptance into that format, and this policy picks each request's K below it.
Per-request K needs no vLLM change: the runner already takes a shorter or
empty draft per request (vLLM's ``ngram`` proposer returns them).
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from vllm_longspec.speculation.cost import CostModel

DRAFT, LOOKUP = "draft", "lookup"
# Lower bounds of the lookup's match-length classes; class 0: length not given.
LOOKUP_MATCH_CLASSES = (0, 1, 2, 3, 4, 8)
# Per class, the acceptance of chain position 1 and of the later positions on the
# target's own answers (benchmarks/results/lookup_priors.md); class 0: neutral.
LOOKUP_PRIORS = ((0.5, 0.5), (0.25, 0.75), (0.5, 0.8), (0.57, 0.8), (0.81, 0.89),
                 (0.97, 0.97))


def lookup_match_class(match_len: int) -> int:
    """The class (index into LOOKUP_MATCH_CLASSES) of a lookup match's length."""
    return bisect.bisect_right(LOOKUP_MATCH_CLASSES, max(0, match_len)) - 1


def acceptance_key(source: str, match_len: int) -> tuple[str, int]:
    """Whose statistics a proposal counts in: the draft's, or its lookup class's."""
    return (LOOKUP, lookup_match_class(match_len)) if source == LOOKUP else (DRAFT, 0)


@dataclass(frozen=True)
class PolicyConfig:
    k_max: int = 4
    decay: float = 0.9              # per observation, a request's counts
    population_decay: float = 0.99  # per observation, the population's counts
    draft_prior: float = 0.5        # acceptance assumed before any observation
    # per LOOKUP_MATCH_CLASSES: (position 1, later positions)
    lookup_priors: tuple[tuple[float, float], ...] = LOOKUP_PRIORS
    prior_weight: float = 4.0       # population rate's weight in a request's rate
    population_prior_weight: float = 8.0
    enter_margin: float = 0.05      # speculate when it beats plain decoding by this
    stay_margin: float = 0.0        # keep speculating while it beats plain by this
    probe_interval: int = 8         # plain steps before a probe (doubles per failed probe)
    max_probe_interval: int = 256

    def __post_init__(self):
        if self.k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {self.k_max}")
        if min(self.prior_weight, self.population_prior_weight) <= 0:
            raise ValueError("prior weights must be > 0")
        if not (0 < self.decay <= 1 and 0 < self.population_decay <= 1):
            raise ValueError("decays must lie in (0, 1]")
        if not 1 <= self.probe_interval <= self.max_probe_interval:
            raise ValueError("need 1 <= probe_interval <= max_probe_interval")
        if len(self.lookup_priors) != len(LOOKUP_MATCH_CLASSES):
            raise ValueError(f"lookup_priors needs one value per match class "
                             f"{LOOKUP_MATCH_CLASSES}, got {self.lookup_priors}")


@dataclass(frozen=True)
class Request:
    request_id: Hashable
    context_len: int
    lookup_tokens: int = 0   # > 0: the lookup proposes this many tokens; 0: the draft
    lookup_match: int = 0    # the lookup's match length (0: not given)


@dataclass(frozen=True)
class StepPlan:
    num_tokens: tuple[int, ...]   # K_r per request, in the order given
    sources: tuple[str, ...]      # DRAFT or LOOKUP per request
    draft_steps: int              # D: draft forwards to run; 0: none
    expected_tokens: float        # sum_r E_r(K_r)
    expected_ms: float
    plain_ms: float               # the same batch without speculation
    probe: bool = False

    @property
    def speculates(self) -> bool:
        return any(self.num_tokens)


class Acceptance:
    """Exponentially decayed [tried, accepted] counts per chain position."""

    def __init__(self, k_max: int):
        self.tried = np.zeros(k_max)
        self.accepted = np.zeros(k_max)

    def observe(self, proposed: int, accepted: int, decay: float) -> None:
        """Positions 1..min(accepted + 1, proposed) were tried, 1..accepted accepted."""
        self.tried *= decay
        self.accepted *= decay
        self.tried[:min(accepted + 1, proposed)] += 1
        self.accepted[:accepted] += 1

    def rates(self, parent: np.ndarray, weight: float) -> np.ndarray:
        return (self.accepted + weight * parent) / (self.tried + weight)


@dataclass
class _RequestState:
    acceptance: dict[tuple[str, int], Acceptance]  # by _key, made when first observed
    zero_streak: int = 0
    probe_interval: int = 1


@dataclass
class _Candidate:
    """One assignment of K_r: the tokens it is expected to emit and what it costs."""

    num_tokens: list[int]
    draft_steps: int
    tokens: float
    ms: float


class SpeculationPolicy:
    """Chooses K_r per request and step; learns from what was accepted and timed."""

    def __init__(self, config: PolicyConfig | None = None, cost: CostModel | None = None):
        self.config = config or PolicyConfig()
        self.cost = cost or CostModel()
        k = self.config.k_max
        self._priors = {(DRAFT, 0): np.full(k, self.config.draft_prior)} | {
            (LOOKUP, c): np.array([first] + [later] * (k - 1))
            for c, (first, later) in enumerate(self.config.lookup_priors)}
        self._population = {key: Acceptance(k) for key in self._priors}
        self._requests: dict[Hashable, _RequestState] = {}
        self._speculating = False
        self._plain_streak = 0
        self._probe_interval = self.config.probe_interval

    # -- statistics -----------------------------------------------------------------

    def _state(self, request_id: Hashable) -> _RequestState:
        state = self._requests.get(request_id)
        if state is None:
            state = self._requests[request_id] = _RequestState(
                {}, probe_interval=self.config.probe_interval)
        return state

    def rates(self, request_id: Hashable, source: str, match_len: int = 0) -> np.ndarray:
        """[K_max] a_r(i) for one request and source (lookup: of that match length)."""
        return self._rates([request_id], [acceptance_key(source, match_len)])[0]

    def _rates(self, request_ids: Sequence[Hashable],
               keys: Sequence[tuple[str, int]]) -> np.ndarray:
        """[batch, K_max] a_r(i), each request's counts shrunk to the population's."""
        population = {key: self._population[key].rates(
            self._priors[key], self.config.population_prior_weight) for key in set(keys)}
        k = self.config.k_max
        tried, accepted, parent = (np.zeros((len(keys), k)) for _ in range(3))
        for row, (request_id, key) in enumerate(zip(request_ids, keys, strict=True)):
            parent[row] = population[key]
            state = self._requests.get(request_id)
            counts = state.acceptance.get(key) if state is not None else None
            if counts is not None:
                tried[row], accepted[row] = counts.tried, counts.accepted
        weight = self.config.prior_weight
        return (accepted + weight * parent) / (tried + weight)

    def observe(self, request_id: Hashable, source: str, proposed: int,
                accepted: int, match_len: int = 0) -> None:
        """A verified proposal: ``accepted`` of its first ``proposed`` tokens
        (``match_len``: the lookup match it came from)."""
        if proposed <= 0:
            return
        if not 0 <= accepted <= proposed <= self.config.k_max:
            raise ValueError(f"need 0 <= accepted ({accepted}) <= proposed ({proposed}) "
                             f"<= k_max ({self.config.k_max})")
        key = acceptance_key(source, match_len)
        counts = self._state(request_id).acceptance.setdefault(
            key, Acceptance(self.config.k_max))
        counts.observe(proposed, accepted, self.config.decay)
        self._population[key].observe(proposed, accepted, self.config.population_decay)

    def observe_step(self, num_tokens: int, batch_size: int, context_len: float,
                     target_ms: float, draft_batch_size: int = 0,
                     draft_step_ms: float | None = None) -> None:
        """A measured step: target forward + rest (and the mean draft step, if any)."""
        self.cost.observe_target(num_tokens, batch_size, context_len, target_ms)
        if draft_step_ms is not None and draft_batch_size > 0:
            self.cost.observe_draft_step(draft_batch_size, draft_step_ms)

    def remove_request(self, request_id: Hashable) -> None:
        self._requests.pop(request_id, None)

    # -- the choice -------------------------------------------------------------------

    def plan(self, requests: Sequence[Request]) -> StepPlan:
        batch = len(requests)
        sources = tuple(LOOKUP if r.lookup_tokens > 0 else DRAFT for r in requests)
        if batch == 0:
            return StepPlan((), (), 0, 0.0, 0.0, 0.0)
        context = float(np.mean([r.context_len for r in requests]))
        k_max = self.config.k_max
        is_lookup = np.array([s == LOOKUP for s in sources])
        # [batch] how many tokens each request may propose (lookup: what it found)
        limits = np.where(is_lookup, np.minimum([r.lookup_tokens for r in requests], k_max),
                          k_max)
        # [batch, K_max] gains g_r(i) = a_r(1) ... a_r(i); 0 past a request's limit
        keys = [acceptance_key(s, r.lookup_match) for s, r in zip(sources, requests, strict=True)]
        gains = np.cumprod(self._rates([r.request_id for r in requests], keys), axis=1)
        gains[np.arange(k_max) >= limits[:, None]] = 0.0
        drafting = sources.count(DRAFT)
        plain_ms = float(self.cost.target_ms(batch, batch, context))
        best = self._best_speculative(gains, is_lookup, context, drafting)

        margin = self.config.stay_margin if self._speculating else self.config.enter_margin
        probe = False
        if best is not None and best.tokens / best.ms > (1 + margin) * batch / plain_ms:
            chosen = best
            self._speculating, self._plain_streak = True, 0
            self._probe_interval = self.config.probe_interval
        else:
            self._speculating = False
            self._plain_streak += 1
            chosen = _Candidate([0] * batch, 0, float(batch), plain_ms)
            if best is not None and self._plain_streak >= self._probe_interval:
                chosen, probe, self._plain_streak = best, True, 0
                self._probe_interval = min(2 * self._probe_interval,
                                           self.config.max_probe_interval)
        probed = self._probe_starved(requests, chosen) if chosen.draft_steps > 0 else set()
        self._count_streaks(requests, chosen, probed)
        chosen = self._priced(chosen.num_tokens, gains, is_lookup, context, drafting)
        return StepPlan(tuple(chosen.num_tokens), sources, chosen.draft_steps,
                        chosen.tokens, chosen.ms, plain_ms, probe)

    def _best_speculative(self, gains: np.ndarray, is_lookup: np.ndarray, context: float,
                          drafting: int) -> _Candidate | None:
        """The plan with the most tokens per ms among those proposing >= 1 token.

        All depths at once: the positive gains sorted once (stable, so a request's
        positions stay in order among equal gains); depth D allows the lookup
        tokens and the draft tokens at positions < D, and within the sorted list
        the allowed ones are exactly D's candidates in D's own order."""
        batch, k_max = gains.shape
        rows, positions = np.nonzero(gains > 0)                          # [M] row-major
        if len(rows) == 0:
            return None
        order = np.argsort(-gains[rows, positions], kind="stable")
        rows, positions = rows[order], positions[order]
        values = gains[rows, positions]                                  # [M] descending
        depths = np.arange(k_max + 1)[:, None]                           # [D + 1, 1]
        # [D + 1, M] token m may be proposed at depth D
        allowed = is_lookup[rows] | (positions < depths)
        tokens = batch + np.cumsum(np.where(allowed, values, 0.0), axis=1)
        draft_ms = depths * self.cost.draft_step_ms(drafting) if drafting else 0.0
        ms = self.cost.target_ms(batch + np.cumsum(allowed, axis=1), batch,
                                 context) + draft_ms
        # evaluated right after an allowed token; the first maximum (smallest D, n)
        speed = np.where(allowed, tokens / ms, -np.inf)
        depth, last = np.unravel_index(int(np.argmax(speed)), speed.shape)
        taken = rows[:last + 1][allowed[depth, :last + 1]]
        return self._priced(np.bincount(taken, minlength=batch).tolist(), gains,
                            is_lookup, context, drafting)

    def _priced(self, num_tokens: list[int], gains: np.ndarray, is_lookup: np.ndarray,
                context: float, drafting: int) -> _Candidate:
        batch, k_max = gains.shape
        counts = np.array(num_tokens)
        tokens = batch + float(gains[np.arange(k_max) < counts[:, None]].sum())
        depth = int(counts[~is_lookup].max(initial=0))
        ms = float(self.cost.target_ms(batch + int(counts.sum()), batch, context))
        ms += depth * self.cost.draft_step_ms(drafting) if depth else 0.0
        return _Candidate(list(num_tokens), depth, tokens, ms)

    def _probe_starved(self, requests: Sequence[Request], chosen: _Candidate) -> set[int]:
        """In a step that drafts anyway, K = 1 for requests at 0 past their interval."""
        probed = set()
        for i, request in enumerate(requests):
            state = self._state(request.request_id)
            if chosen.num_tokens[i] == 0 and state.zero_streak >= state.probe_interval:
                chosen.num_tokens[i] = 1
                probed.add(i)
                state.probe_interval = min(2 * state.probe_interval,
                                           self.config.max_probe_interval)
        return probed

    def _count_streaks(self, requests: Sequence[Request], chosen: _Candidate,
                       probed: set[int]) -> None:
        for i, (request, k) in enumerate(zip(requests, chosen.num_tokens, strict=True)):
            state = self._state(request.request_id)
            state.zero_streak = state.zero_streak + 1 if k == 0 else 0
            if k > 0 and i not in probed:
                state.probe_interval = self.config.probe_interval


def static_schedule(cost: CostModel, rates: np.ndarray, max_batch_size: int,
                    context_len: float) -> list[tuple[int, int, int]]:
    """vLLM's ``num_speculative_tokens_per_batch_size`` from our model.

    For each batch size b, the K (every request drafting K tokens accepted at
    ``rates`` [K_max]) with the most tokens per ms, 0 unless it beats plain
    decoding; equal neighbours merged into inclusive (first, last, K) ranges.
    """
    gains = np.cumsum(np.cumprod(rates))          # [K_max] sum of gains for K = 1..K_max
    schedule: list[tuple[int, int, int]] = []
    for batch in range(1, max_batch_size + 1):
        best_k, best_speed = 0, batch / float(cost.target_ms(batch, batch, context_len))
        for k in range(1, len(rates) + 1):
            ms = (float(cost.target_ms(batch * (1 + k), batch, context_len))
                  + k * cost.draft_step_ms(batch))
            if batch * (1 + gains[k - 1]) / ms > best_speed:
                best_k, best_speed = k, batch * (1 + gains[k - 1]) / ms
        if schedule and schedule[-1][2] == best_k:
            schedule[-1] = (schedule[-1][0], batch, best_k)
        else:
            schedule.append((batch, batch, best_k))
    return schedule
