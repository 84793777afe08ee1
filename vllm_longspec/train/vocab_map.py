"""Training over the draft vocabulary: the rows of the draft's LM head.

A draft directory may carry a draft vocabulary (``draft_vocab`` tensor, written
by ``vllm-longspec draft-vocab``): at serving time the draft's LM head is the
target's rows for those token ids and every other token has logit -inf, so the
draft proposes only from them. Training with ``draft_vocab`` set does the same:
the softmax runs over the draft vocabulary only (6x fewer LM-head rows for
SmolLM2's 8192 of 49152), and a target token outside it is treated as follows:

- as a label (the next token): it can never be proposed, so its row gets no
  cross-entropy term and no CE gradient; the row still counts in the step's
  loss-token normaliser and as a top-1 miss in the logged accuracy;
- in distillation: the target's distribution is restricted to the draft
  vocabulary and renormalised (full teacher: softmax over the draft rows of
  the target's logits; top-k teacher: softmax over those of its k logits that
  are in the draft vocabulary; a row with none of them gets no KL term).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from vllm_longspec.model.checkpoint import DRAFT_VOCAB


def read_draft_vocab(source: str | Path) -> np.ndarray:
    """Sorted unique token ids [N] int64 from a draft directory (its
    ``draft_vocab`` tensor) or a ``.npy`` file of ids."""
    path = Path(source).expanduser()
    if path.suffix == ".npy":
        ids = np.load(path)
    else:
        from safetensors import safe_open

        weights = path / "model.safetensors"
        if not weights.is_file():
            raise ValueError(f"draft_vocab {str(source)!r}: no {weights.name} there "
                             "(give a draft directory or a .npy of token ids).")
        with safe_open(str(weights), framework="np") as f:
            if DRAFT_VOCAB not in f.keys():
                raise ValueError(f"draft_vocab {str(source)!r} has no draft vocabulary: "
                                 "run `vllm-longspec draft-vocab` on it first.")
            ids = f.get_tensor(DRAFT_VOCAB)
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if ids.size == 0 or ids[0] < 0:
        raise ValueError(f"draft_vocab {str(source)!r}: ids must be non-negative, "
                         "at least one.")
    return ids


@dataclasses.dataclass(frozen=True)
class VocabMap:
    """Where each target token sits in the draft's LM head."""

    ids: torch.Tensor | None  # [draft_vocab] sorted target ids; None: all of them
    row_of: torch.Tensor  # [target_vocab] int64 head row of each token, -1 outside

    @classmethod
    def build(cls, vocab_size: int, ids: np.ndarray | None = None) -> VocabMap:
        if ids is None:
            return cls(None, torch.arange(vocab_size))
        if int(ids.max()) >= vocab_size:
            raise ValueError(f"draft vocabulary id {int(ids.max())} is outside the "
                             f"target's vocabulary of {vocab_size}.")
        ids_tensor = torch.as_tensor(ids, dtype=torch.int64)
        row_of = torch.full((vocab_size,), -1, dtype=torch.int64)
        row_of[ids_tensor] = torch.arange(ids_tensor.numel())
        return cls(ids_tensor, row_of)

    @property
    def size(self) -> int:
        return self.row_of.numel() if self.ids is None else self.ids.numel()

    def head(self, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """[draft_vocab, hidden]: the target's LM-head rows the draft proposes from."""
        if self.ids is None:
            return lm_head_weight
        return lm_head_weight[self.ids.to(lm_head_weight.device)].contiguous()

    def rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Head rows of target token ids (same shape), -1 where not proposable."""
        return self.row_of.to(token_ids.device)[token_ids.long()]
