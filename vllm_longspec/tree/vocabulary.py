"""The tokens a draft can propose, when it proposes from part of the vocabulary.

A draft with a draft vocabulary (``vllm-longspec draft-vocab``) has logits only
for its N tokens; every other token has draft probability 0. Drafting in those
N columns instead of the target's V (8192 vs 49152 for the shipped draft) gives
the same draws for a sixth of the work: the softmax, the random noise and the
top-k of every drafted row shrink with N, and the noise was most of a sampled
round's drafting time on CPU. Verification still compares draft and target
distributions over the whole vocabulary: ``to_vocabulary`` puts q back there,
0 outside the N columns, exactly what drafting over V with -inf logits gave.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftVocabulary:
    token_ids: torch.Tensor  # [N] int64: the token id of each draft column
    vocab_size: int  # V, the target's vocabulary

    def __post_init__(self):
        if self.token_ids.dim() != 1 or not 0 < self.token_ids.numel() <= self.vocab_size:
            raise ValueError(f"a draft vocabulary holds 1 to {self.vocab_size} token ids, "
                             f"got shape {tuple(self.token_ids.shape)}")

    @property
    def size(self) -> int:
        return self.token_ids.numel()

    def columns(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] -> [..., N] the draft's columns (a copy)."""
        return logits.index_select(-1, self.token_ids)

    def tokens(self, columns: torch.Tensor) -> torch.Tensor:
        """Draft column indices -> token ids, any shape."""
        return self.token_ids[columns]

    def to_vocabulary(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[..., N] -> [..., V]: ``fill`` (probability 0, or logit -inf) for the
        tokens the draft cannot propose."""
        full = values.new_full((*values.shape[:-1], self.vocab_size), fill)
        return full.index_copy_(-1, self.token_ids, values)

    def sample(self, logits: torch.Tensor,
               sample: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run a sampler that maps [R, V] logits to (tokens [R], probs [R, V] or
        None) on the draft's columns of ``logits`` instead: its tokens as
        token ids, its probabilities over the whole vocabulary."""
        columns, probs = sample(self.columns(logits))
        return self.tokens(columns), None if probs is None else self.to_vocabulary(probs)
