"""The training draft computes the spec's math (a naive per-token version here)
and carries exactly the checkpoint format's parameter names."""

from __future__ import annotations

import math

import torch

from vllm_longspec.model.checkpoint import REQUIRED_PARAMS, random_draft_state
from vllm_longspec.train.model import LongSpecDraft, draft_logits, new_draft

CONFIG = {
    "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
}


def _rms(x, w, eps=1e-5):
    return w * x / torch.sqrt((x * x).mean() + eps)


def _rope(vec, position, theta=500.0):
    """Rotate one head vector [D] (neox: pairs (i, i + D/2))."""
    half = vec.shape[0] // 2
    out = vec.clone()
    for i in range(half):
        angle = position * theta ** (-2 * i / vec.shape[0])
        c, s = math.cos(angle), math.sin(angle)
        out[i] = vec[i] * c - vec[i + half] * s
        out[i + half] = vec[i + half] * c + vec[i] * s
    return out


def _attend(q, keys, values):
    """q [D], keys/values [n, D] -> [D]; zeros if n == 0."""
    if keys.shape[0] == 0:
        return torch.zeros_like(q)
    probs = torch.softmax(keys @ q / math.sqrt(q.shape[0]), dim=0)
    return probs @ values


def _naive_draft(p, embeddings, positions, target_k, target_v, window, j):
    """One sequence, token by token, straight from the spec."""
    seq_len, heads, kv_heads, d_head = embeddings.shape[0], 4, 2, 8
    group = heads // kv_heads
    lin = lambda x, name: x @ p[f"{name}.weight"].T + p.get(f"{name}.bias", 0)  # noqa: E731
    x = [_rms(embeddings[t], p["input_layernorm.weight"]) for t in range(seq_len)]
    q = [lin(x[t], "self_attn.q_proj").view(heads, d_head) for t in range(seq_len)]
    k = [lin(x[t], "self_attn.k_proj").view(kv_heads, d_head) for t in range(seq_len)]
    v = [lin(x[t], "self_attn.v_proj").view(kv_heads, d_head) for t in range(seq_len)]
    out = []
    for t in range(seq_len):
        h = embeddings[t].clone()
        seen = range(max(0, t - window), t + 1)
        attn = torch.cat([
            _attend(
                _rope(q[t][hd], positions[t]),
                torch.stack([_rope(k[s][hd // group], positions[s]) for s in seen]),
                torch.stack([v[s][hd // group] for s in seen]),
            ) for hd in range(heads)
        ])
        h = h + lin(attn, "self_attn.o_proj")
        y = _rms(h, p["post_self_attention_layernorm.weight"])
        q2 = lin(y, "cross_attn.q_proj").view(heads, d_head)
        visible = max(0, t - j + 1)  # target positions 0..t-j
        cross = torch.cat([
            _attend(_rope(q2[hd], positions[t]), target_k[hd // group, :visible],
                    target_v[hd // group, :visible]) for hd in range(heads)
        ])
        h = h + lin(cross, "cross_attn.o_proj")
        z = _rms(h, p["post_cross_attention_layernorm.weight"])
        h = h + lin(torch.nn.functional.silu(lin(z, "mlp.gate_proj")) * lin(z, "mlp.up_proj"),
                    "mlp.down_proj")
        out.append(h)
    return torch.stack(out)


def test_state_dict_names_are_the_checkpoint_format():
    draft = LongSpecDraft(CONFIG, 512)
    assert set(draft.state_dict()) == set(REQUIRED_PARAMS)
    shapes = {k: tuple(v.shape) for k, v in random_draft_state(CONFIG).items()}
    assert {k: tuple(v.shape) for k, v in draft.state_dict().items()} == shapes


def test_draft_matches_naive_spec_implementation():
    torch.manual_seed(0)
    params = {k: torch.randn_like(v) * 0.3 for k, v in random_draft_state(CONFIG).items()}
    draft = LongSpecDraft(CONFIG, sliding_window=3)
    draft.load_state_dict(params)
    seq_len = 11
    embeddings = torch.randn(1, seq_len, 32)
    # AOI-like positions: 2 anchors, then an offset
    positions = torch.tensor([[0, 1] + list(range(2 + 700, seq_len + 700))])
    target_k, target_v = torch.randn(1, 2, seq_len, 8), torch.randn(1, 2, seq_len, 8)
    out = draft(embeddings, positions, target_k, target_v, noise_shift=2)
    expected = _naive_draft(params, embeddings[0], positions[0].tolist(),
                            target_k[0], target_v[0], window=3, j=2)
    torch.testing.assert_close(out[0], expected, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_stays_close_to_fp32_and_keeps_fp32_master_weights():
    draft = new_draft(CONFIG, 512, seed=0)
    for param in draft.parameters():
        torch.nn.init.normal_(param, std=0.3)
    embeddings = torch.randn(2, 16, 32)
    positions = torch.arange(16).expand(2, 16)
    k, v = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    full = draft(embeddings, positions, k, v, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = draft(embeddings, positions, k.bfloat16(), v.bfloat16(), 1)
    assert mixed.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in draft.parameters())
    torch.testing.assert_close(mixed, full, rtol=0.05, atol=0.1)
    logits = draft_logits(full, torch.randn(50, 32))
    assert logits.shape == (2, 16, 50)
