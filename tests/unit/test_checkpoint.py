"""Draft checkpoint format: the exact name mapping and every start-up error."""

from __future__ import annotations

import json
import types

import pytest
import torch

from vllm_longspec.model.checkpoint import (
    REQUIRED_PARAMS,
    DraftCheckpointError,
    check_draft_matches_target,
    map_param_name,
    random_draft_state,
    read_draft_checkpoint,
    save_draft,
)

TINY = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
    "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "rms_norm_eps": 1e-5, "vocab_size": 100,
    "max_position_embeddings": 256,
}

# The whole mapping, reference name -> (vLLM parameter, shard); None = not loaded.
EXPECTED_MAPPING = {
    "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", "q"),
    "self_attn.q_proj.bias": ("self_attn.qkv_proj.bias", "q"),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", "k"),
    "self_attn.k_proj.bias": ("self_attn.qkv_proj.bias", "k"),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", "v"),
    "self_attn.v_proj.bias": ("self_attn.qkv_proj.bias", "v"),
    "self_attn.o_proj.weight": ("self_attn.o_proj.weight", None),
    "cross_attn.q_proj.weight": ("cross_attn.q_proj.weight", None),
    "cross_attn.q_proj.bias": ("cross_attn.q_proj.bias", None),
    "cross_attn.k_proj.weight": None,
    "cross_attn.k_proj.bias": None,
    "cross_attn.v_proj.weight": None,
    "cross_attn.v_proj.bias": None,
    "cross_attn.o_proj.weight": ("cross_attn.o_proj.weight", None),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1),
    "mlp.down_proj.weight": ("mlp.down_proj.weight", None),
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "post_self_attention_layernorm.weight": (
        "post_self_attention_layernorm.weight", None),
    "post_cross_attention_layernorm.weight": (
        "post_cross_attention_layernorm.weight", None),
    "embed_tokens.weight": None,
    "lm_head.weight": None,
}


@pytest.mark.parametrize("prefix", ["", "model."])
def test_reference_names_map_exactly(prefix):
    for name, expected in EXPECTED_MAPPING.items():
        assert map_param_name(prefix + name) == expected, name


def _target(**overrides):
    return types.SimpleNamespace(**{**TINY, **overrides})


def test_round_trip_and_published_layout(tmp_path):
    state = random_draft_state(TINY, seed=1)
    # Published checkpoints carry unused cross k/v and a "model." prefix.
    state["cross_attn.k_proj.weight"] = torch.zeros(16, 32)
    state = {f"model.{k}": v for k, v in state.items()}
    save_draft(tmp_path, state, TINY, {"sliding_window": 256})
    draft = read_draft_checkpoint(tmp_path)
    assert set(REQUIRED_PARAMS) <= set(draft.shapes)
    assert draft.sliding_window == 256
    check_draft_matches_target(draft, _target())


def test_missing_directory(tmp_path):
    with pytest.raises(DraftCheckpointError, match="does not exist"):
        read_draft_checkpoint(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(DraftCheckpointError, match="has no config.json"):
        read_draft_checkpoint(tmp_path)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DraftCheckpointError, match="Cannot read"):
        read_draft_checkpoint(tmp_path)


def test_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(DraftCheckpointError, match="no \\*.safetensors"):
        read_draft_checkpoint(tmp_path)


def test_corrupt_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(DraftCheckpointError, match="Cannot read draft weights"):
        read_draft_checkpoint(tmp_path)


def test_not_a_draft_block(tmp_path):
    state = random_draft_state(TINY)
    del state["cross_attn.q_proj.weight"]
    save_draft(tmp_path, state, TINY, {})
    with pytest.raises(DraftCheckpointError, match="missing cross_attn.q_proj.weight"):
        read_draft_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "target, message",
    [
        (_target(hidden_size=64), "does not fit the target"),
        (_target(num_key_value_heads=4), "self_attn.k_proj.weight"),
        (_target(vocab_size=101), "vocabulary of 100"),
        (_target(architectures=["GPT2LMHeadModel"]), "does not support target arch"),
    ],
)
def test_draft_for_another_target(tmp_path, target, message):
    save_draft(tmp_path, random_draft_state(TINY), TINY, {})
    with pytest.raises(DraftCheckpointError, match=message):
        check_draft_matches_target(read_draft_checkpoint(tmp_path), target)
