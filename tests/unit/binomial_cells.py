"""Testing category counts cell by cell against exact probabilities, with power.

Among n draws, the count of a cell of probability p is Binomial(n, p). A cell
passes when its count lies within the exact binomial quantiles at alpha / 2 on
each side (from the pmf, no approximation), so a correct sampler fails it with
probability at most alpha; a cell of probability 0 passes with count 0 only.
The power against a cell probability of p + e (e of either sign) is computed
with the normal approximation to Binomial(n, p + e), continuity corrected: the
biases of interest (e around 0.01, n around 10**5) put n (p + e) in the
thousands, where it is accurate (for p = 0 it is exact: 1 - (1 - e)**n).
"""

from __future__ import annotations

import math

import torch


def acceptance_bounds(probs: torch.Tensor, num_samples: int,
                      alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[C] cell probabilities -> ([C] lowest, [C] highest) count passing."""
    bounds = [_cell_bounds(float(p), num_samples, alpha) for p in probs.double()]
    lowest, highest = zip(*bounds, strict=True)
    return torch.tensor(lowest), torch.tensor(highest)


def _cell_bounds(p: float, n: int, alpha: float) -> tuple[int, int]:
    if p in (0, 1):
        return round(p * n), round(p * n)
    # The pmf on counts within 40 standard deviations (+ 50) of the mean: the
    # mass beyond is below 1e-40, far under alpha.
    spread = 40 * math.sqrt(n * p * (1 - p)) + 50
    k = torch.arange(max(0, math.floor(n * p - spread)),
                     min(n, math.ceil(n * p + spread)) + 1, dtype=torch.float64)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
               + k * math.log(p) + (n - k) * math.log1p(-p))
    pmf = log_pmf.exp()
    below = pmf.cumsum(0)                          # P(X <= k), summed from the small end
    above = pmf.flip(0).cumsum(0).flip(0)          # P(X >= k)
    lowest = int(k[0]) + int((below <= alpha / 2).sum())   # P(X < lowest) <= alpha / 2
    highest = int(k[-1]) - int((above <= alpha / 2).sum())  # P(X > highest) <= alpha / 2
    return lowest, highest


def failure_probability(lowest: torch.Tensor, highest: torch.Tensor, probs: torch.Tensor,
                        num_samples: int) -> torch.Tensor:
    """[C] probability that a cell of probability ``probs`` fails (normal approx.)."""
    mean = num_samples * probs
    std = (num_samples * probs * (1 - probs)).sqrt().clamp(min=1e-12)
    normal = torch.special.ndtr
    return normal((lowest - 0.5 - mean) / std) + 1 - normal((highest + 0.5 - mean) / std)


def detectable_bias(probs: torch.Tensor, num_samples: int, alpha: float,
                    power: float = 0.9) -> torch.Tensor:
    """[C] the smallest |e| such that a cell of probability p + e fails with
    probability >= ``power``, for every feasible sign of e (max over the two)."""
    probs = probs.double()
    lowest, highest = acceptance_bounds(probs, num_samples, alpha)
    worst = torch.zeros_like(probs)
    for sign in (1.0, -1.0):
        feasible = probs < 1 if sign > 0 else probs > 0
        low, high = torch.zeros_like(probs), (1 - probs) if sign > 0 else probs.clone()
        for _ in range(60):  # bisection; the failure probability grows with |e|
            mid = (low + high) / 2
            strong = failure_probability(lowest, highest, probs + sign * mid,
                                         num_samples) >= power
            high, low = torch.where(strong, mid, high), torch.where(strong, low, mid)
        worst = torch.where(feasible, torch.maximum(worst, high), worst)
    # a cell of probability 0 fails on any count: exactly 1 - (1 - e)**n
    return worst.masked_fill(probs == 0, 1 - (1 - power) ** (1 / num_samples))
