"""Visibility of the draft's attentions: noise shift j and sliding window W."""

from __future__ import annotations

import pytest
import torch

from vllm_longspec.train import attention
from vllm_longspec.train.attention import (
    shifted_cross_attention,
    sliding_window_attention,
)
from vllm_longspec.train.model import LongSpecDraft
from vllm_longspec.train.positions import plain_position_ids

CONFIG = {
    "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
SEQ_LEN = 24


def _draft(window: int) -> LongSpecDraft:
    torch.manual_seed(0)
    draft = LongSpecDraft(CONFIG, window)
    for param in draft.parameters():  # non-trivial biases and norms too
        torch.nn.init.normal_(param, std=0.3)
    return draft


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(2, SEQ_LEN, 32, generator=g)
    keys = torch.randn(2, 2, SEQ_LEN, 8, generator=g)
    values = torch.randn(2, 2, SEQ_LEN, 8, generator=g)
    return embeddings, plain_position_ids(2, SEQ_LEN) + 100, keys, values


@pytest.mark.parametrize("noise_shift", [1, 2, 3, 4])
def test_cross_attention_sees_target_kv_up_to_t_minus_j(noise_shift):
    draft = _draft(window=512)
    embeddings, positions, keys, values = _inputs()
    base = draft(embeddings, positions, keys, values, noise_shift)
    for t in (noise_shift, 9, SEQ_LEN - 1):
        later_keys, later_values = keys.clone(), values.clone()
        later_keys[:, :, t - noise_shift + 1:] += 5.0
        later_values[:, :, t - noise_shift + 1:] -= 5.0
        out = draft(embeddings, positions, later_keys, later_values, noise_shift)
        assert torch.equal(out[:, t], base[:, t]), "saw K/V after t-j"
        edge_values = values.clone()
        edge_values[:, :, t - noise_shift] += 5.0
        out = draft(embeddings, positions, keys, edge_values, noise_shift)
        assert not torch.allclose(out[:, t], base[:, t]), "did not see K/V at t-j"


@pytest.mark.parametrize("noise_shift", [1, 3])
def test_queries_without_visible_target_kv_get_zeros(noise_shift):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 10, 8, generator=g)
    kv = torch.randn(1, 2, 10, 8, generator=g)
    out = shifted_cross_attention(q, kv, kv, noise_shift)
    assert (out[:, :, :noise_shift] == 0).all()
    assert (out[:, :, noise_shift:].abs().sum(-1) > 0).all()
    # sequence shorter than the shift: nothing visible anywhere
    assert (shifted_cross_attention(q[:, :, :2], kv[:, :, :2], kv[:, :, :2], 3) == 0).all()


def test_cross_attention_matches_explicit_masked_softmax():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 9, 8, generator=g)
    k = torch.randn(2, 2, 9, 8, generator=g)
    v = torch.randn(2, 2, 9, 8, generator=g)
    j = 2
    out = shifted_cross_attention(q, k, v, j)
    k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = q @ k4.transpose(-1, -2) / 8**0.5
    t, s = torch.arange(9)[:, None], torch.arange(9)[None, :]
    scores = scores.masked_fill(~(s <= t - j), float("-inf"))
    expected = torch.nan_to_num(torch.softmax(scores, -1)) @ v4
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_draft_token_sees_itself_and_exactly_window_previous_tokens(monkeypatch):
    window = 5
    # small query blocks so that windows straddle block edges
    monkeypatch.setattr(attention, "QUERY_BLOCK", 7)
    draft = _draft(window)
    embeddings, positions, keys, values = _inputs()
    base = draft(embeddings, positions, keys, values, 1)
    for t in (window + 1, 13, SEQ_LEN - 1):
        far = embeddings.clone()
        far[:, t - window - 1] += 3.0
        out = draft(far, positions, keys, values, 1)
        assert torch.equal(out[:, t], base[:, t]), "saw the token at t-W-1"
        edge = embeddings.clone()
        edge[:, t - window] += 3.0
        out = draft(edge, positions, keys, values, 1)
        assert not torch.allclose(out[:, t], base[:, t]), "did not see t-W"


def test_blocked_window_attention_equals_one_masked_softmax(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 4)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 19, 8, generator=g)
    k = torch.randn(1, 2, 19, 8, generator=g)
    v = torch.randn(1, 2, 19, 8, generator=g)
    window = 6
    out = sliding_window_attention(q, k, v, window)
    k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = q @ k4.transpose(-1, -2) / 8**0.5
    distance = torch.arange(19)[:, None] - torch.arange(19)[None, :]
    scores = scores.masked_fill(~((distance >= 0) & (distance <= window)), float("-inf"))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v4, rtol=1e-5, atol=1e-6)
