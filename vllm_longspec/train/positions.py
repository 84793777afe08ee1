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


def draw_anchors_offsets(
    batch: int,
    seq_len: int,
    max_positions: int,
    max_anchors: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors a [batch], offsets o [batch]) int64, drawn as AOI draws them."""
    if seq_len > max_positions:
        raise ValueError(
            f"seq_len {seq_len} exceeds the target's max_position_embeddings "
            f"{max_positions}."
        )
    anchors = torch.randint(0, max_anchors + 1, (batch,), generator=generator)
    offsets = torch.randint(0, max_positions - seq_len + 1, (batch,),
                            generator=generator)
    return anchors, offsets


def anchored_position_ids(
    anchors: torch.Tensor,  # [batch] int
    offsets: torch.Tensor,  # [batch] int
    seq_len: int,
) -> torch.Tensor:
    """[batch, seq_len] positions [0..a-1, a+o .. T-1+o] per row."""
    positions = plain_position_ids(anchors.shape[0], seq_len)
    is_shifted = positions >= anchors[:, None]
    return positions + offsets[:, None].long() * is_shifted


def aoi_position_ids(
    batch: int,
    seq_len: int,
    max_positions: int,
    max_anchors: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """[batch, seq_len] AOI position ids (int64)."""
    anchors, offsets = draw_anchors_offsets(batch, seq_len, max_positions, max_anchors,
                                            generator)
    return anchored_position_ids(anchors, offsets, seq_len)
