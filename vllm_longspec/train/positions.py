"""Position ids for training: plain, or Anchor-Offset Indices (AOI).

AOI (LongSpec section 3): the first ``a`` tokens keep positions 0..a-1 (attention
sinks), every later token is shifted by one offset ``o``:

    [0, 1, .., a-1, a+o, a+1+o, .., T-1+o]     a ~ U{0..max_anchors}
                                               o ~ U{0..max_positions-T}

so a cheap short sequence shows the draft (and the target, whose cached keys are
rotated at these positions) the large position indices of a long context. The
largest position is T-1+o <= max_positions-1. Each sequence draws its own a, o.
"""

from __future__ import annotations

import torch


def plain_position_ids(batch: int, seq_len: int) -> torch.Tensor:
    # [batch, seq_len]
    return torch.arange(seq_len).expand(batch, seq_len).clone()


def aoi_position_ids(
    batch: int,
    seq_len: int,
    max_positions: int,
    max_anchors: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """[batch, seq_len] AOI position ids (int64)."""
    if seq_len > max_positions:
        raise ValueError(
            f"seq_len {seq_len} exceeds the target's max_position_embeddings "
            f"{max_positions}."
        )
    # [batch, 1]
    anchors = torch.randint(0, max_anchors + 1, (batch, 1), generator=generator)
    offsets = torch.randint(0, max_positions - seq_len + 1, (batch, 1),
                            generator=generator)
    positions = plain_position_ids(batch, seq_len)
    is_shifted = positions >= anchors
    return positions + offsets * is_shifted
