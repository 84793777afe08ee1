"""Toy language models for the losslessness tests: a fixed random next-token
distribution for every context over a tiny vocabulary, some entries exactly 0.

Contexts of up to ``max_len`` tokens are numbered id = sum_i (token_i + 1) *
(V + 1) ** i, so a child's id is its parent's plus one term and a whole batch of
tree slots looks its distributions up with one gather.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from vllm_longspec.tree import DraftTree


class ToyLM:
    def __init__(self, vocab: int, seed: int, zero_fraction: float = 0.25, max_len: int = 5,
                 overrides: Mapping[tuple[int, ...], Sequence[float]] | None = None):
        self.vocab = vocab
        gen = torch.Generator().manual_seed(seed)
        shape = ((vocab + 1) ** max_len, vocab)
        weights = torch.rand(shape, generator=gen, dtype=torch.float64) ** 2
        zeros = torch.rand(shape, generator=gen) < zero_fraction
        keep_one = torch.nn.functional.one_hot(torch.randint(vocab, shape[:1], generator=gen),
                                               vocab).bool()
        weights = weights.masked_fill(zeros & ~keep_one, 0.0)
        self.table = weights / weights.sum(-1, keepdim=True)  # [contexts, V] float64
        for context, probs in (overrides or {}).items():
            self.table[self.context_id(context)] = torch.tensor(probs, dtype=torch.float64)

    def context_id(self, context: Sequence[int]) -> int:
        return sum((token + 1) * (self.vocab + 1) ** i for i, token in enumerate(context))

    def probs(self, context: Sequence[int]) -> torch.Tensor:
        """[V] float64 next-token distribution after ``context``."""
        return self.table[self.context_id(context)]

    def tempered(self, context: Sequence[int], temperature: float) -> torch.Tensor:
        """The distribution softmax(log p / temperature) samples from."""
        weights = self.probs(context) ** (1.0 / temperature)
        return weights / weights.sum()

    def probs_at(self, context_ids: torch.Tensor) -> torch.Tensor:
        """[...] context ids -> [..., V] float32 distributions."""
        return self.table[context_ids].float()

    def logits_at(self, context_ids: torch.Tensor) -> torch.Tensor:
        """[...] context ids -> [..., V] float32 logits (log-probs; -inf for zeros)."""
        return self.table[context_ids].log().float()


def slot_context_ids(tree: DraftTree, root_ids: torch.Tensor, root_lengths: torch.Tensor,
                     lm: ToyLM) -> torch.Tensor:
    """[B, N + 1] context id of every slot: the request's context (id and
    length, each [B]), then its path."""
    base = lm.vocab + 1
    ids = torch.zeros(tree.batch_size, tree.num_nodes + 1, dtype=torch.int64)
    ids[:, 0] = root_ids
    for node in range(tree.num_nodes):
        parent_ids = ids.gather(1, tree.parents[:, node:node + 1] + 1).squeeze(1)
        power = base ** (root_lengths + tree.depths[:, node] - 1)
        ids[:, node + 1] = parent_ids + (tree.tokens[:, node] + 1) * power
    return ids
