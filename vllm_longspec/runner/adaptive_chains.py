"""Chain mode's per-step choice: context lookup or the draft, and how many tokens.

``AdaptiveChains`` sits between vLLM's runner and the pure algorithms of
``vllm_longspec.speculation``. Once per step, before the draft runs, it

1. rebuilds each decoding request's token history as it stands after this
   step's verification: the runner's committed tokens
   (``input_batch.token_ids_cpu[row, :num_tokens_no_spec[row]]``, not yet
   holding this step's tokens: LongSpec drafts before vLLM's bookkeeping), the
   drafts this step accepted (the request's last proposal minus
   ``num_rejected``) and the new bonus token; for example a request whose row
   holds ``a b c``, that proposed ``d e f`` and had 1 of them rejected, with
   bonus ``g``, has history ``a b c d e g``;
2. learns from that verification (acceptance per request, source and chain
   position; the measured time of the step) and keeps the context lookup in
   step with the history;
3. asks the policy for each request's K in 0..K_max and its source: the
   lookup's continuation when its match is long enough (``LookupRule``), else
   the draft's chain; ``draft_steps`` = the longest draft chain (0: no draft
   forward; the proposer only writes the step's self-attention K/V into the
   draft's window, ``LongSpecProposer._write_window``).

After drafting, ``compose`` builds vLLM's per-request proposal lists (a
request may get fewer tokens than another, or none) and, when the draft
sampled probabilistically, the draft distributions the rejection sampler reads
for each proposed token: the draft's own rows, and for lookup tokens a one-hot
row (a deterministic proposal: accepted with probability p(token), the
residual is p without it; exactly how vLLM treats proposals that come without
draft probabilities, so the output distribution is unchanged).

``VLLM_LONGSPEC_POLICY_TRACE=/tmp/policy.jsonl`` (profiling) appends one JSON
line per step the policy planned: the batch, mean context, each decoding
row's K, source, lookup length and match length, the draft steps, the plan's
expected tokens and ms, plain decoding's predicted ms, whether it was a probe,
and the measured ms of the previous step's verification with its predicted ms
and how many of each row's proposed tokens it accepted
(``summarise_trace`` turns a file into counts per K and source).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from vllm_longspec.speculation.lookup import ContextLookup, LookupRule
from vllm_longspec.speculation.policy import (
    DRAFT,
    LOOKUP,
    PolicyConfig,
    Request,
    SpeculationPolicy,
    StepPlan,
)

TRACE_ENV_VAR = "VLLM_LONGSPEC_POLICY_TRACE"


@dataclass(frozen=True)
class ChainPlan:
    """One step's proposals before the draft runs (rows in runner order)."""

    req_ids: tuple[str, ...]
    num_tokens: tuple[int, ...]          # K_r (0: no speculation for row r)
    sources: tuple[str, ...]             # DRAFT or LOOKUP per row
    lookup_tokens: tuple[tuple[int, ...], ...]  # the lookup's tokens per row (maybe ())
    draft_steps: int                     # D: the draft's chain length this step
    lookup_match: tuple[int, ...]        # the lookup's match length per row (0: none)


@dataclass
class _Proposed:
    source: str
    tokens: tuple[int, ...]
    match_len: int = 0   # the lookup match a LOOKUP proposal followed


@dataclass(frozen=True)
class _StepRecord:
    """What the next step needs to time this one's verification."""

    ended: float              # perf_counter() when drafting finished
    req_ids: tuple[str, ...]
    verified: int             # tokens the next target forward verifies: sum(1 + K_r)
    mean_context: float
    draft_steps: int
    drafting_ms: float
    predicted_ms: float | None   # the policy's prediction of this step (None: no policy)


class AdaptiveChains:
    def __init__(self, k_max: int, *, lookup: bool = True, adaptive: bool = True,
                 min_match: int = LookupRule.min_match):
        self.k_max = k_max
        self.lookup = ContextLookup() if lookup else None
        # Measured: any match beats the shipped draft (benchmarks/results/lookup_rule.md).
        self.rule = LookupRule(min_match)
        self.policy = SpeculationPolicy(PolicyConfig(k_max=k_max)) if adaptive else None
        self._proposed: dict[str, _Proposed] = {}   # req id -> last step's proposal
        self._known: set[str] = set()               # req ids with lookup/policy state
        self._last_step: _StepRecord | None = None
        self._mean_context = 0.0
        self._predicted_ms: float | None = None
        trace = os.environ.get(TRACE_ENV_VAR)
        self._trace = open(trace, "a", buffering=1) if trace else None  # noqa: SIM115
        self._measured: dict | None = None   # the last step's timing, for the trace
        self._accepted: list[int] = []       # the trace's accepted tokens per row

    # ---- before drafting -----------------------------------------------------

    def plan(self, input_batch, num_reqs: int, next_token_ids: torch.Tensor,
             num_rejected: torch.Tensor | None, decoding: np.ndarray) -> ChainPlan:
        """``decoding``: [num_reqs] bool, rows whose bonus token is real (not a
        prompt chunk before the last, whose sample vLLM discards)."""
        now = time.perf_counter()
        req_ids = tuple(input_batch.req_ids[:num_reqs])
        rejected = ([0] * num_reqs if num_rejected is None
                    else num_rejected[:num_reqs].tolist())
        bonus = next_token_ids[:num_reqs].tolist()
        self._observe_step_time(now, req_ids, decoding)
        requests, lookup_tokens = [], []
        self._accepted = []   # per decoding row: the last proposal's accepted tokens
        for row, req_id in enumerate(req_ids):
            proposed = self._proposed.pop(req_id, None)
            if not decoding[row]:
                requests.append(Request(req_id, 0))
                lookup_tokens.append(())
                continue
            num_committed = int(input_batch.num_tokens_no_spec[row])
            accepted = ()
            if proposed is not None and proposed.tokens:
                accepted = proposed.tokens[:max(0, len(proposed.tokens) - rejected[row])]
                if self.policy is not None:
                    self.policy.observe(req_id, proposed.source, len(proposed.tokens),
                                        len(accepted), proposed.match_len)
            if self._trace is not None:
                self._accepted.append(len(accepted))
            tokens, match_len = (), 0
            if self.lookup is not None:
                self.lookup.sync(req_id, input_batch.token_ids_cpu[row, :num_committed],
                                 accepted + (bonus[row],))
                proposal = self.lookup.propose(req_id, self.k_max)
                if self.rule.use_lookup(proposal):
                    tokens, match_len = tuple(proposal.tokens.tolist()), proposal.match_len
            requests.append(Request(req_id, num_committed + len(accepted) + 1, len(tokens),
                                    match_len))
            lookup_tokens.append(tokens)
        self._forget_finished(req_ids)
        contexts = [r.context_len for r, d in zip(requests, decoding, strict=True) if d]
        self._mean_context = float(np.mean(contexts)) if contexts else 0.0
        if self.policy is None:
            num_tokens = tuple(len(t) if t else self.k_max if d else 0
                               for t, d in zip(lookup_tokens, decoding, strict=True))
            sources = tuple(LOOKUP if t else DRAFT for t in lookup_tokens)
        else:
            step = self.policy.plan([r for r, d in zip(requests, decoding, strict=True)
                                     if d])
            num_tokens, sources = _spread(step.num_tokens, step.sources, decoding)
            self._predicted_ms = step.expected_ms
            if self._trace is not None:
                self._write_trace(step, requests, decoding)
        draft_steps = max((k for k, s in zip(num_tokens, sources, strict=True)
                           if s == DRAFT), default=0)
        return ChainPlan(req_ids, num_tokens, sources, tuple(lookup_tokens), draft_steps,
                         tuple(r.lookup_match for r in requests))

    # ---- after drafting ------------------------------------------------------

    def compose(self, plan: ChainPlan, draft_token_ids: torch.Tensor,
                draft_probs: torch.Tensor | None, drafting_ms: float
                ) -> tuple[list[list[int]], torch.Tensor | None]:
        """draft_token_ids: [num_reqs, D]; draft_probs: [num_reqs, D, V] or None.
        Returns the proposal per row and the draft probabilities
        [num_reqs, max K_r, V] (None when the draft sampled none)."""
        drafts = draft_token_ids.tolist()
        proposals: list[list[int]] = []
        for row, (k, source) in enumerate(zip(plan.num_tokens, plan.sources, strict=True)):
            tokens = (plan.lookup_tokens[row] if source == LOOKUP else drafts[row])[:k]
            proposals.append(list(tokens))
            self._proposed[plan.req_ids[row]] = _Proposed(source, tuple(tokens),
                                                          plan.lookup_match[row])
        self._record_step(plan, drafting_ms)
        if draft_probs is None or not any(plan.num_tokens):
            return proposals, None
        width = max(plan.num_tokens)
        # [num_reqs, width, V] the draft's rows, one-hot rows for lookup tokens
        probs = draft_probs.new_zeros(len(proposals), width, draft_probs.shape[-1])
        for row, tokens in enumerate(proposals):
            if plan.sources[row] == DRAFT:
                probs[row, :len(tokens)] = draft_probs[row, :len(tokens)]
            elif tokens:
                probs[row, torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
        return proposals, probs

    # ---- bookkeeping ---------------------------------------------------------

    def _record_step(self, plan: ChainPlan, drafting_ms: float) -> None:
        self._last_step = _StepRecord(
            time.perf_counter(), plan.req_ids, sum(1 + k for k in plan.num_tokens),
            self._mean_context, plan.draft_steps, drafting_ms, self._predicted_ms)
        self._predicted_ms = None

    def _observe_step_time(self, now: float, req_ids: tuple[str, ...],
                           decoding: np.ndarray) -> None:
        """From the end of the last drafting to now ran the rest of that step and
        this step's target forward: the time of verifying what was proposed.
        Observed only when the batch is the same and every row decodes (a prompt
        chunk or a new request would be timed as verification)."""
        last, self._last_step = self._last_step, None
        if self.policy is None or last is None:
            return
        if last.req_ids != req_ids or not bool(np.all(decoding)):
            return
        target_ms = (now - last.ended) * 1e3
        self.policy.observe_step(
            last.verified, len(req_ids), last.mean_context, target_ms,
            len(req_ids) if last.draft_steps else 0,
            last.drafting_ms / last.draft_steps if last.draft_steps else None)
        if self._trace is not None:
            self._measured = {"verified": last.verified, "target_ms": round(target_ms, 2),
                              "drafting_ms": round(last.drafting_ms, 2),
                              "predicted_ms": last.predicted_ms and round(last.predicted_ms, 2)}

    def _write_trace(self, step: StepPlan, requests: list[Request],
                     decoding: np.ndarray) -> None:
        rows = [r for r, d in zip(requests, decoding, strict=True) if d]
        line = {"batch": len(rows),
                "context": round(self._mean_context),
                "k": list(step.num_tokens), "sources": [s[0] for s in step.sources],
                "lookup": [r.lookup_tokens for r in rows],
                "match": [r.lookup_match for r in rows],
                "draft_steps": step.draft_steps,
                "expected_tokens": round(step.expected_tokens, 3),
                "expected_ms": round(step.expected_ms, 2),
                "plain_ms": round(step.plain_ms, 2), "probe": step.probe,
                "last": self._measured, "accepted": self._accepted}
        self._measured = None
        self._trace.write(json.dumps(line) + "\n")

    def _forget_finished(self, req_ids: tuple[str, ...]) -> None:
        """Free the state of requests that left the batch (finished or
        preempted: a preempted request is rebuilt from its tokens later)."""
        live = set(req_ids)
        for req_id in self._known - live:
            self._proposed.pop(req_id, None)
            if self.lookup is not None:
                self.lookup.remove_request(req_id)
            if self.policy is not None:
                self.policy.remove_request(req_id)
        self._known = live


def summarise_trace(path: str) -> dict:
    """Counts of a policy trace: steps, K per source, mean measured / predicted ms."""
    lines = [json.loads(line) for line in open(path) if line.strip()]
    k_by_source = Counter((s, k) for line in lines
                          for s, k in zip(line["sources"], line["k"], strict=True))
    timed = [line["last"] for line in lines if line["last"] and line["last"]["predicted_ms"]]
    return {"steps": len(lines),
            "drafting_steps": sum(1 for line in lines if line["draft_steps"]),
            "probes": sum(1 for line in lines if line["probe"]),
            "k_by_source": {f"{s}{k}": n for (s, k), n in sorted(k_by_source.items())},
            "measured_over_predicted": (
                float(np.mean([t["target_ms"] + t["drafting_ms"] for t in timed])
                      / np.mean([t["predicted_ms"] for t in timed])) if timed else None)}


def _spread(num_tokens, sources, decoding) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The policy's choices for the decoding rows, 0 / DRAFT for the others."""
    chosen = iter(zip(num_tokens, sources, strict=True))
    out = [next(chosen) if d else (0, DRAFT) for d in decoding]
    return tuple(k for k, _ in out), tuple(s for _, s in out)
