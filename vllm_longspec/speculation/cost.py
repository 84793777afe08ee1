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
the machine may be loaded), so ``CostModel`` corrects it per cell (batch
bucket, context bucket): with e = N - b the tokens verified beyond one per
request,

    measured - prior ~ r0 + r1 * e + r2 * [e > 0]        (milliseconds)

fitted by exponentially decayed least squares over the cell's steps,
ridge-regularised towards 0 (no correction) with ``level_weight``,
``slope_weight`` and ``switch_weight`` pseudo-observations. r2 is the price of
leaving plain decoding at all: a step that verifies more than one token per
request for some request runs the attention's multi-query path, which here
costs a jump, not a slope (batch 1, 7k, bfloat16: 54 ms for one token, 66 for
two, 73 for three); a line alone fitted mostly on speculative steps put plain
steps too high and the first extra token too cheap, and the policy kept
verifying lookup tokens that lost (0.87x plain on a 7k document-QA prompt).

Additive, not a factor: at batch 8 a plain step here costs about what the batch-1 prior says (the weights are read
once either way) while each extra verified token still costs about the prior's
2.25 ms; a factor fitted on the plain steps (0.74 there) scaled that marginal
cost down with the level, priced a K = 1 step for all eight requests at 58 ms
where it took 64 (``VLLM_LONGSPEC_POLICY_TRACE``), and let the policy pay for
lookup tokens that did not pay back. Until the cell has measured extra tokens,
the prior's marginal cost stands. Every step moves the whole line, so an e the
policy stopped choosing still follows the machine's level, and one slow step
cannot price an e out for good: an earlier table of independent corrections
per tokens-per-request did exactly that. With steps timed with a spread of 30%
(a loaded VM), it kept batch-1 lookup chains at K = 3 in 45% of the steps
where K = 4 was 14% faster (``tests/unit/test_policy.py``). Each observation
is also clipped to ``max_jump`` (a fraction) around the current prediction,
so a stall (a page fault, another process) moves it by a bounded step. Buckets are
powers of two (batch 1, 2, 3-4, 5-8, ...; context up to 1k, 2k, 4k, ...).
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


MIN_SHARE = 0.1   # a prediction never falls below this share of the prior


def bucket(value: float) -> int:
    """Power-of-two bucket: 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, ..."""
    return max(0, math.ceil(math.log2(max(value, 1.0))))


class _Correction:
    """Decayed weighted ridge least squares of y = r0 + r1 * e + r2 * [e > 0],
    the ridge pulling each coefficient towards 0 (no correction).

    Solved once per observation (3 x 3); the policy reads the three floats
    several times per engine step."""

    __slots__ = ("ridge", "gram", "moments", "weight", "level", "slope", "switch")

    def __init__(self, level_weight: float, slope_weight: float, switch_weight: float):
        self.ridge = np.diag([level_weight, slope_weight, switch_weight])
        self.gram = np.zeros((3, 3))     # decayed sum of w x x^T, x = (1, e, [e > 0])
        self.moments = np.zeros(3)       # decayed sum of w y x
        self.weight = 0.0                # decayed sum of w
        self.level = self.slope = self.switch = 0.0

    def coefficients(self) -> tuple[float, float, float]:
        return self.level, self.slope, self.switch

    def observe(self, e: float, y: float, decay: float) -> None:
        x = np.array([1.0, e, 1.0 if e > 0 else 0.0])
        self.gram = decay * self.gram + np.outer(x, x)
        self.moments = decay * self.moments + y * x
        self.weight = decay * self.weight + 1.0
        # positive definite: the ridge is
        self.level, self.slope, self.switch = np.linalg.solve(
            self.gram + self.ridge, self.moments).tolist()


class CostModel:
    """The prior plus a learned correction line per (batch, context) cell."""

    def __init__(self, prior: CostPrior | None = None, *, decay: float = 0.95,
                 context_unit: int = 1024, level_weight: float = 0.5,
                 slope_weight: float = 20.0, switch_weight: float = 0.5,
                 max_jump: float = 0.3):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        if min(level_weight, slope_weight, switch_weight) <= 0:
            raise ValueError("ridge weights must be > 0")
        self.prior = prior or CostPrior()
        self.decay, self.context_unit = decay, context_unit
        self.ridge = (level_weight, slope_weight, switch_weight)
        self.max_jump = max_jump
        self._target: dict[tuple[int, int], _Correction] = {}
        self._draft: dict[int, float] = {}

    def _pair(self, batch_size: int, context_len: float) -> tuple[int, int]:
        return bucket(batch_size), bucket(context_len / self.context_unit)

    def correction_ms(self, num_tokens: np.ndarray | float, batch_size: int,
                      context_len: float) -> np.ndarray | float:
        """predicted - prior, ms, for N = num_tokens (0 where nothing was measured)."""
        correction = self._target.get(self._pair(batch_size, context_len))
        if correction is None:
            return 0.0 if np.ndim(num_tokens) == 0 else np.zeros(np.shape(num_tokens))
        level, slope, switch = correction.coefficients()
        if np.ndim(num_tokens) == 0:
            extra = float(num_tokens) - batch_size
            return level + slope * extra + (switch if extra > 0 else 0.0)
        extra = np.asarray(num_tokens, dtype=float) - batch_size
        return level + slope * extra + switch * (extra > 0)

    def target_ms(self, num_tokens: np.ndarray | float, batch_size: int,
                  context_len: float) -> np.ndarray | float:
        """Predicted target step time for N = num_tokens (a scalar or an array);
        at least ``MIN_SHARE`` of the prior's, whatever the line says."""
        prior = self.prior.target_ms(num_tokens, batch_size, context_len)
        predicted = prior + self.correction_ms(num_tokens, batch_size, context_len)
        if np.ndim(num_tokens) == 0:
            return max(float(predicted), MIN_SHARE * float(prior))
        return np.maximum(predicted, MIN_SHARE * prior)

    def draft_step_ms(self, batch_size: int) -> float:
        return self.prior.draft_step_ms(batch_size) * math.exp(
            self._draft.get(bucket(batch_size), 0.0))

    def observe_target(self, num_tokens: int, batch_size: int, context_len: float,
                       ms: float) -> None:
        """A measured target step (forward + the rest of the step, no drafting)."""
        pair = self._pair(batch_size, context_len)
        correction = self._target.get(pair)
        if correction is None:
            correction = self._target[pair] = _Correction(*self.ridge)
        elif correction.weight >= 1.0:
            current = float(self.target_ms(num_tokens, batch_size, context_len))
            ms = min(max(ms, current * (1 - self.max_jump)), current * (1 + self.max_jump))
        excess = ms - float(self.prior.target_ms(num_tokens, batch_size, context_len))
        correction.observe(float(num_tokens - batch_size), excess, self.decay)

    def observe_draft_step(self, batch_size: int, ms: float) -> None:
        key = bucket(batch_size)
        ratio = math.log(max(ms, 1e-6) / max(self.prior.draft_step_ms(batch_size), 1e-6))
        old = self._draft.get(key)
        self._draft[key] = ratio if old is None else self.decay * old + (1 - self.decay) * ratio
