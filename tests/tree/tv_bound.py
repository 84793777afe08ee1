"""How far n samples of a K-category distribution stray, in total variation.

Bretagnolle-Huber-Carol: the empirical distribution of n draws from P is at
TV distance >= t from P with probability at most 2**K exp(-2 n t**2), for any
P over K categories. Hence, for a test that fails when TV(empirical, target)
>= ``tv_threshold(n, K, alpha)``:

- a correct sampler fails it with probability at most ``alpha``;
- a sampler whose law Q is at TV distance delta from the target fails it with
  probability >= ``power`` once delta >= ``detectable_tv(n, K, alpha, power)``:
  with that probability its empirical is within tv_threshold(n, K, 1 - power)
  of Q (the same bound), hence at least tv_threshold(n, K, alpha) from the
  target (triangle inequality).

Both are bounds, not estimates: the true power is higher.
"""

from __future__ import annotations

import math


def tv_threshold(num_samples: int, categories: int, alpha: float) -> float:
    """The TV distance n samples exceed with probability at most ``alpha``."""
    return math.sqrt((categories * math.log(2) + math.log(1 / alpha)) / (2 * num_samples))


def detectable_tv(num_samples: int, categories: int, alpha: float,
                  power: float = 0.9) -> float:
    """The smallest TV bias the ``tv_threshold(n, K, alpha)`` test detects with
    probability >= ``power``."""
    return (tv_threshold(num_samples, categories, alpha)
            + tv_threshold(num_samples, categories, 1 - power))
