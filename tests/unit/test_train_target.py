"""What the draft reads from the target: last-layer K rotated at the AOI positions."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_longspec.train.positions import aoi_position_ids, plain_position_ids
from vllm_longspec.train.target import (
    UnsupportedTargetError,
    load_target,
    read_target_config,
    run_target,
)
from vllm_longspec.train.tiny_target import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny_target"))
    return path, load_target(path, dtype=torch.float32)


def _rotate(x, positions, theta):
    """x [B, H, T, D] rotated at positions [B, T] (independent of rope.py)."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2).double() / d)
    angles = positions.double()[..., None] * inv_freq  # [B, T, D/2]
    cos, sin = angles.cos()[:, None].float(), angles.sin()[:, None].float()
    first, second = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), -1)


def test_last_layer_keys_are_rotated_at_the_aoi_positions(tiny_target):
    path, target = tiny_target
    attn = target.model.layers[-1].self_attn
    captured = {}

    def grab_input(_module, args, kwargs):
        captured["x"] = kwargs.get("hidden_states", args[0] if args else None)

    handle = attn.register_forward_pre_hook(grab_input, with_kwargs=True)
    input_ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    positions = aoi_position_ids(3, 20, 2048, 4, torch.Generator().manual_seed(1))
    assert positions.max() > 100
    out = run_target(target, input_ids, positions, need_final_hidden=True)
    handle.remove()

    x = captured["x"]  # the last layer's normed input, [B, T, hidden]
    # [B, num_kv_heads, T, head_dim]
    unrotated = attn.k_proj(x).view(3, 20, 2, 16).transpose(1, 2)
    expected_keys = _rotate(unrotated, positions, theta=10000.0)
    expected_values = attn.v_proj(x).view(3, 20, 2, 16).transpose(1, 2)
    assert out.last_keys.shape == (3, 2, 20, 16)
    torch.testing.assert_close(out.last_keys, expected_keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.last_values, expected_values, rtol=0, atol=0)
    assert torch.equal(out.embeddings, target.model.embed_tokens(input_ids))
    assert out.final_hidden.shape == (3, 20, 64)
    # the target ran in eval, no grad anywhere
    assert not out.last_keys.requires_grad and not target.training


def test_aoi_jump_does_not_cut_the_targets_attention(tiny_target):
    """transformers treats a position jump as a packed-sequence boundary unless
    told otherwise; after the anchors the target must still see them."""
    _, target = tiny_target
    input_ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[0, 1, 2] + list(range(503, 512))])
    base = run_target(target, input_ids, positions).last_keys
    changed_ids = input_ids.clone()
    changed_ids[0, 0] = 1 if input_ids[0, 0] != 1 else 2
    changed = run_target(target, changed_ids, positions).last_keys
    assert not torch.allclose(changed[:, :, 5], base[:, :, 5])


def test_offset_keys_are_rope_shifted_plain_keys(tiny_target):
    """RoPE is relative: with no anchors, K at offset o equals R(o) K at 0."""
    _, target = tiny_target
    input_ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    plain = run_target(target, input_ids, plain_position_ids(1, 10)).last_keys
    offset = run_target(target, input_ids, plain_position_ids(1, 10) + 300).last_keys
    shift = torch.full((1, 10), 300)
    torch.testing.assert_close(offset, _rotate(plain, shift, 10000.0), rtol=1e-4, atol=1e-4)


def test_other_architectures_are_rejected_with_a_clear_message(tmp_path):
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedTargetError, match="LlamaForCausalLM, Qwen2ForCausalLM"):
        load_target(tmp_path)
    with pytest.raises(UnsupportedTargetError, match="no config.json"):
        read_target_config(tmp_path / "missing")


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 100000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 1024},
])
def test_draft_rope_tables_are_the_targets(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from vllm_longspec.train.rope import rope_cos_sin, rope_inv_freq

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192, rope_parameters=rope)
    positions = torch.tensor([[0, 1, 2, 1000, 5000, 8191]])
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32),
                                                  positions)
    cos, sin = rope_cos_sin(positions, *rope_inv_freq(config.to_dict()))
    torch.testing.assert_close(cos, hf_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, hf_sin, rtol=1e-5, atol=1e-5)


def test_qwen2_targets_work(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=512)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    target = load_target(tmp_path, dtype=torch.bfloat16)
    out = run_target(target, torch.randint(0, 256, (2, 12)),
                     plain_position_ids(2, 12) + 50)
    assert out.last_keys.shape == (2, 2, 12, 16)
    assert out.last_keys.dtype == torch.bfloat16
