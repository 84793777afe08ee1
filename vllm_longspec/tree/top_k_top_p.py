"""vLLM's top-k / top-p filter, restated in plain torch for the pure package.

``BatchSampling`` takes the filter as a function. The runner passes vLLM's own
(``vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_top_p``, see
``runner/sampling.py``); this reference, the default, has the semantics
of vLLM 0.32's PyTorch path (the one it runs on CPU), and a test checks the two
agree. On logits already divided by the temperature:

- top-k keeps every token whose logit is at least the k-th largest one, so all
  the tokens tied with the k-th are kept (k = V: no filter);
- top-p then drops the least likely tokens, in ascending ``torch.sort`` order
  of the logits (ties in the order torch's unstable sort leaves them, as in
  vLLM), while their cumulative probability under the softmax of what top-k
  kept is at most 1 - p; the most likely token always stays (p = 1: no filter).

Filtered tokens get logit -inf.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (logits [n, V] float, top_k [n] int in 1..V or None, top_p [n] float in (0, 1]
# or None) -> [n, V] logits with the filtered tokens at -inf; may write into logits
TopKTopP = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def top_k_top_p_reference(logits: torch.Tensor, top_k: torch.Tensor | None,
                          top_p: torch.Tensor | None) -> torch.Tensor:
    """The ``TopKTopP`` of vLLM 0.32, in plain torch (returns a new tensor)."""
    if top_k is None and top_p is None:
        return logits
    vocab = logits.shape[-1]
    ascending, order = logits.sort(dim=-1)  # [n, V], the order vLLM sorts in
    if top_k is not None:
        # [n, 1] the k-th largest logit sits at ascending position V - k
        kth_largest = ascending.gather(-1, (vocab - top_k.long()).unsqueeze(-1))
        ascending = ascending.masked_fill(ascending < kth_largest, -torch.inf)
    if top_p is not None:
        # [n, V] mass of each token and of all those before it in ascending order
        tail_mass = ascending.softmax(-1).cumsum(-1)
        drop = tail_mass <= 1 - top_p.unsqueeze(-1)
        drop[:, -1] = False  # the most likely token
        ascending = ascending.masked_fill(drop, -torch.inf)
    return torch.empty_like(logits).scatter_(-1, order, ascending)
