"""How each request of a batch samples, and the random draws that follows from it.

Greedy requests have temperature 0. For the others the target distribution is
vLLM's: logits / temperature, then vLLM's top-k / top-p filter, then softmax.
The filter is a function (``top_k_top_p``): the runner hands in vLLM's own,
the pure package defaults to a plain-torch reference of it
(``top_k_top_p.py``, where its semantics are spelled out: ties with the k-th
logit are kept). The draft distribution gets the temperature only:
verification is lossless for any draft distribution, provided the candidates
are drawn from it and verification is handed the same one.

Randomness: a row listed in ``generators`` (a seeded request) draws from its own
generator, the other rows from torch's default generator, as in vLLM's sampler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from vllm_longspec.tree.top_k_top_p import TopKTopP, top_k_top_p_reference


@dataclass(frozen=True)
class BatchSampling:
    temperature: torch.Tensor            # [B] float, 0 = greedy
    top_k: torch.Tensor | None = None    # [B] int, <= 0 or >= V = off
    top_p: torch.Tensor | None = None    # [B] float, >= 1 = off
    generators: Mapping[int, torch.Generator] = field(default_factory=dict)
    top_k_top_p: TopKTopP = top_k_top_p_reference

    @classmethod
    def greedy(cls, batch_size: int, device: torch.device | str = "cpu") -> BatchSampling:
        return cls(torch.zeros(batch_size, device=device))

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    def select(self, rows: list[int]) -> BatchSampling:
        """The settings of ``rows``, in that order; generators follow their rows."""
        index = torch.tensor(rows, dtype=torch.long, device=self.temperature.device)
        renumber = {row: i for i, row in enumerate(rows)}
        return dataclasses.replace(
            self,
            temperature=self.temperature[index],
            top_k=None if self.top_k is None else self.top_k[index],
            top_p=None if self.top_p is None else self.top_p[index],
            generators={renumber[row]: gen for row, gen in self.generators.items()
                        if row in renumber},
        )

    @property
    def is_greedy(self) -> torch.Tensor:
        """[B] bool."""
        return self.temperature == 0

    def draft_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, ..., V] logits -> log-probs at each row's temperature (1 for greedy rows)."""
        return torch.log_softmax(self._scaled(logits), dim=-1)

    def target_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, ..., V] logits -> the distribution a sampled row draws from.

        Greedy rows get temperature 1 and no filtering (they verify by argmax).
        """
        scaled = self._scaled(logits)  # a new tensor: the filter may write into it
        if self.top_k is None and self.top_p is None:
            return torch.softmax(scaled, dim=-1)
        vocab = logits.shape[-1]
        slots_per_row = scaled[0].numel() // vocab if self.batch_size else 0
        top_k = top_p = None
        if self.top_k is not None:  # off (<= 0, >= V) and greedy rows: k = V
            off = self.is_greedy | (self.top_k <= 0) | (self.top_k >= vocab)
            top_k = torch.where(off, vocab, self.top_k).long()
        if self.top_p is not None:  # off and greedy rows: p = 1
            top_p = torch.where(self.is_greedy, 1.0, self.top_p.clamp(max=1.0)).float()
        filtered = self.top_k_top_p(
            scaled.reshape(-1, vocab),
            None if top_k is None else top_k.repeat_interleave(slots_per_row),
            None if top_p is None else top_p.repeat_interleave(slots_per_row))
        return torch.softmax(filtered, dim=-1).view_as(logits)

    def uniforms(self, *shape: int, device: torch.device | str) -> torch.Tensor:
        """[B, *shape] independent U[0, 1) draws."""
        return self._draw(lambda out, gen: out.uniform_(generator=gen), shape, device)

    def exponentials(self, *shape: int, device: torch.device | str) -> torch.Tensor:
        """[B, *shape] independent Exp(1) draws, clamped away from 0 (safe to divide by)."""
        draws = self._draw(lambda out, gen: out.exponential_(generator=gen), shape, device)
        return draws.clamp_(min=torch.finfo(draws.dtype).tiny)

    def _draw(self, fill: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor],
              shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        out = torch.empty(self.batch_size, *shape, device=device)
        fill(out, None)
        for row, generator in self.generators.items():
            fill(out[row], generator)
        return out

    def _scaled(self, logits: torch.Tensor) -> torch.Tensor:
        temperature = torch.where(self.is_greedy, 1.0, self.temperature)
        return logits / self._per_row(temperature, logits)

    @staticmethod
    def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """[B] -> [B, 1, ..., 1] broadcasting against ``like``."""
        return values.view(-1, *([1] * (like.dim() - 1)))
