"""Anchor-Offset Indices: anchors keep 0..a-1, one offset for the rest, in range."""

from __future__ import annotations

import torch

from vllm_longspec.train.positions import aoi_position_ids, plain_position_ids


def _anchors_and_offset(row: torch.Tensor) -> tuple[int, int]:
    plain = torch.arange(len(row))
    anchors = 0
    while anchors < len(row) and row[anchors] == anchors:
        anchors += 1
    offsets = (row - plain)[anchors:]
    if len(offsets) == 0:
        return anchors, 0
    assert (offsets == offsets[0]).all(), "one offset for every non-anchor token"
    return anchors, int(offsets[0])


def test_aoi_keeps_anchors_and_shifts_the_rest_within_range():
    seq_len, max_positions, max_anchors = 32, 300, 4
    generator = torch.Generator().manual_seed(0)
    positions = aoi_position_ids(2000, seq_len, max_positions, max_anchors, generator)
    assert positions.shape == (2000, seq_len) and positions.dtype == torch.int64
    seen_anchors, seen_offsets = set(), []
    for row in positions:
        anchors, offset = _anchors_and_offset(row)
        # an offset of 0 looks like "all anchors": only the first a count then
        if offset:
            seen_anchors.add(anchors)
            assert anchors <= max_anchors
            assert (row[:anchors] == torch.arange(anchors)).all()
        seen_offsets.append(offset)
        assert 0 <= offset <= max_positions - seq_len
        assert int(row.max()) <= max_positions - 1
        assert (row.diff() > 0).all()
    assert seen_anchors == set(range(max_anchors + 1))
    # offsets spread over the whole allowed range
    assert max(seen_offsets) > 0.9 * (max_positions - seq_len)
    assert min(seen_offsets) < 0.1 * (max_positions - seq_len)


def test_aoi_is_deterministic_per_generator_and_full_length_is_plain():
    a = aoi_position_ids(3, 16, 100, 4, torch.Generator().manual_seed(7))
    b = aoi_position_ids(3, 16, 100, 4, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    full = aoi_position_ids(2, 100, 100, 4, torch.Generator().manual_seed(1))
    assert torch.equal(full, plain_position_ids(2, 100))
