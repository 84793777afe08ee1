"""How long a step takes: a linear prior, corrected online from measured steps.

A step verifies N = sum over requests of (1 + K_r) tokens for b requests whose
mean context is c tokens, after D draft steps over the b_d requests drafting:

    step_ms(N, b, c, D) = target_ms(N, b, c) + D * draft_step_ms(b_d)

``target_ms`` covers the target forward and the rest of the step (sampling,
bookkeeping), ``draft_step_ms`` one draft forward. The prior is linear,

    target_ms     = fixed_ms + per_token_ms * N + per_kv_token_ms * b * c
    draft_step_ms = draft_fixed_ms + draft_per_request_ms * b_d

(``CostPrior.fit`` fits it by least squares to steps timed at start-up). The
real curve is not linear (memory-bound at small N, compute-bound later, and
the machine may be loaded), so ``CostModel`` keeps a small table of corrections:
per cell (batch bucket, context bucket, tokens per request q = round(N / b)) an
exponentially decayed mean of log(measured / prior). A cell not measured yet
borrows the correction of the nearest measured q of its (batch, context) pair
(plain steps, q = 1, are always measured), else none. Buckets are powers of two
(batch 1, 2, 3-4, 5-8, ...; context up to 1k, 2k, 4k, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostPrior:
    """Milliseconds. Defaults: issue 14's bfloat16 split (SmolLM2-135M, 4k context,
    batch 1, 2-core CPU): a plain step 44.4 ms, a 5-token ngram verification step
    53.4 ms (2.25 ms per extra token), a draft step 3.25 ms. Fit your own."""

    fixed_ms: float = 42.15
    per_token_ms: float = 2.25
    per_kv_token_ms: float = 0.0
    draft_fixed_ms: float = 3.25
    draft_per_request_ms: float = 0.0

    def target_ms(self, num_tokens: np.ndarray | float, batch_size: int,
                  context_len: float) -> np.ndarray | float:
        return (self.fixed_ms + self.per_token_ms * num_tokens
                + self.per_kv_token_ms * batch_size * context_len)

    def draft_step_ms(self, batch_size: int) -> float:
        return self.draft_fixed_ms + self.draft_per_request_ms * batch_size

    @classmethod
    def fit(cls, target_steps: list[tuple[int, int, float, float]],
            draft_steps: list[tuple[int, float]]) -> CostPrior:
        """Least squares (coefficients clipped at 0) from (N, b, c, ms) target steps
        and (b_d, ms) draft steps; needs at least 3 and 2 distinct samples."""
        rows = np.array([[1.0, n, b * c] for n, b, c, _ in target_steps])
        ms = np.array([t for *_, t in target_steps])
        target = np.clip(np.linalg.lstsq(rows, ms, rcond=None)[0], 0.0, None)
        rows = np.array([[1.0, b] for b, _ in draft_steps])
        draft = np.clip(np.linalg.lstsq(rows, np.array([t for _, t in draft_steps]),
                                        rcond=None)[0], 0.0, None)
        return cls(*target.tolist(), *draft.tolist())


def bucket(value: float) -> int:
    """Power-of-two bucket: 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, ..."""
    return max(0, math.ceil(math.log2(max(value, 1.0))))


class CostModel:
    """The prior times learned corrections per (batch, context, q) cell."""

    def __init__(self, prior: CostPrior | None = None, *, decay: float = 0.9,
                 context_unit: int = 1024):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.prior = prior or CostPrior()
        self.decay, self.context_unit = decay, context_unit
        # (batch bucket, context bucket) -> {q: mean log ratio}; batch bucket -> ratio
        self._target: dict[tuple[int, int], dict[int, float]] = {}
        self._draft: dict[int, float] = {}

    def _pair(self, batch_size: int, context_len: float) -> tuple[int, int]:
        return bucket(batch_size), bucket(context_len / self.context_unit)

    def target_ms(self, num_tokens: np.ndarray | float, batch_size: int,
                  context_len: float) -> np.ndarray | float:
        """Predicted target step time for N = num_tokens (a scalar or an array)."""
        corrections = self._target.get(self._pair(batch_size, context_len), {})
        prior = self.prior.target_ms(num_tokens, batch_size, context_len)
        if not corrections:
            return prior
        measured = sorted(corrections)
        q = np.clip(np.rint(np.asarray(num_tokens, dtype=float) / batch_size), 1, None)
        # the correction of the nearest measured q (the lower one on ties)
        nearest = np.abs(q[..., None] - np.array(measured)).argmin(-1)
        log_ratio = np.array([corrections[m] for m in measured])[nearest]
        result = prior * np.exp(log_ratio)
        return float(result) if np.ndim(result) == 0 else result

    def draft_step_ms(self, batch_size: int) -> float:
        return self.prior.draft_step_ms(batch_size) * math.exp(
            self._draft.get(bucket(batch_size), 0.0))

    def observe_target(self, num_tokens: int, batch_size: int, context_len: float,
                       ms: float) -> None:
        """A measured target step (forward + the rest of the step, no drafting)."""
        cell = self._target.setdefault(self._pair(batch_size, context_len), {})
        q = max(1, round(num_tokens / batch_size))
        ratio = math.log(max(ms, 1e-6) / max(
            self.prior.target_ms(num_tokens, batch_size, context_len), 1e-6))
        cell[q] = ratio if q not in cell else self.decay * cell[q] + (1 - self.decay) * ratio

    def observe_draft_step(self, batch_size: int, ms: float) -> None:
        key = bucket(batch_size)
        ratio = math.log(max(ms, 1e-6) / max(self.prior.draft_step_ms(batch_size), 1e-6))
        old = self._draft.get(key)
        self._draft[key] = ratio if old is None else self.decay * old + (1 - self.decay) * ratio
