"""Draft checkpoint format: the exact name mapping, both layouts, every start-up error."""

from __future__ import annotations

import json
import types

import pytest
import torch

from tests.published_drafts import (
    GLIDE_CLASS,
    glide_layer_shapes,
    save_tiny_target,
    write_published_draft,
)
from vllm_longspec.model.checkpoint import (
    REQUIRED_PARAMS,
    DraftCheckpointError,
    check_draft_matches_target,
    is_longspec_architecture,
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


def test_round_trip_with_prefix_and_cross_kv(tmp_path):
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


# -- the published layout (sail-sg/LongSpec's save_pretrained) ------------------

FAMILIES = ("llama", "qwen2")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_target(request, tmp_path_factory):
    """(target config dict, target directory) of a tiny random target."""
    directory = save_tiny_target(tmp_path_factory.mktemp(request.param), request.param)
    return json.loads((directory / "config.json").read_text()), directory


def _as_hf(config: dict):
    return types.SimpleNamespace(**config)


def test_published_checkpoint_reads_with_defaults(tiny_target, tmp_path):
    config, target = tiny_target
    draft = read_draft_checkpoint(write_published_draft(tmp_path, target))
    assert draft.layout == "published"
    assert draft.sliding_window == 512
    assert draft.draft_vocab_size == 0
    assert draft.recommended_num_speculative_tokens is None
    assert draft.shapes == glide_layer_shapes(config)
    assert is_longspec_architecture(draft.config["architectures"])
    check_draft_matches_target(draft, _as_hf(config))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 256, "intermediate_size": 512}, "does not fit the target"),
        ({"num_key_value_heads": 2}, "self_attn.k_proj.weight has shape"),
        ({"vocab_size": 512}, "vocabulary of 512"),
    ],
)
def test_published_checkpoint_for_another_target(tiny_target, tmp_path, change, message):
    config, _ = tiny_target
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, **change}))
    draft = read_draft_checkpoint(write_published_draft(tmp_path / "draft", other))
    with pytest.raises(DraftCheckpointError, match=message):
        check_draft_matches_target(draft, _as_hf(config))


def test_save_published_layout(tiny_target, tmp_path):
    config, target = tiny_target
    state = random_draft_state(config, seed=3)
    save_draft(tmp_path / "ours", state, config, {"sliding_window": 512, "target": "t"},
               layout="published")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    reference = json.loads(
        (write_published_draft(tmp_path / "ref", target, dtype_name="float32")
         / "config.json").read_text())
    assert written == reference
    assert written["architectures"] == [GLIDE_CLASS[config["model_type"]]]
    assert written["num_hidden_layers"] == config["num_hidden_layers"]
    assert "longspec" not in written

    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == glide_layer_shapes(config)
    for name, value in state.items():
        assert torch.equal(tensors[name], value), name
    for name in ("cross_attn.k_proj.weight", "cross_attn.v_proj.bias"):
        assert not tensors[name].any(), name
    draft = read_draft_checkpoint(tmp_path / "ours")
    assert draft.layout == "published"
    check_draft_matches_target(draft, _as_hf(config))


def test_save_published_keeps_trained_cross_kv(tiny_target, tmp_path):
    config, _ = tiny_target
    state = random_draft_state(config, seed=4)
    trained = torch.randn(state["self_attn.k_proj.weight"].shape)
    state["model.cross_attn.k_proj.weight"] = trained
    save_draft(tmp_path, state, config, {}, layout="published")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(tensors["cross_attn.k_proj.weight"], trained)
    assert not tensors["cross_attn.k_proj.bias"].any()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s, c, w: s.update(draft_vocab=torch.arange(4)), "draft vocabulary"),
        (lambda s, c, w: s.update({"lm_head.weight": torch.zeros(1)}), "not lm_head"),
        (lambda s, c, w: s.pop("mlp.up_proj.weight"), "missing mlp.up_proj.weight"),
        (lambda s, c, w: w.update(sliding_window=256), "trained with 256"),
        (lambda s, c, w: c.update(architectures=["MistralForCausalLM"]),
         "not \\['MistralForCausalLM'\\]"),
        (lambda s, c, w: c.update(head_dim=32), "head_dim 32"),
    ],
)
def test_save_published_refuses_what_it_cannot_store(tiny_target, tmp_path, edit, message):
    config, _ = tiny_target
    config, longspec = dict(config), {"sliding_window": 512}
    state = random_draft_state(config)
    edit(state, config, longspec)
    with pytest.raises(DraftCheckpointError, match=message):
        save_draft(tmp_path, state, config, longspec, layout="published")
    assert not (tmp_path / "config.json").exists()


def _reference_layer_class(family: str):
    """A transformers model with exactly the parameters of the reference's
    ``<Family>GlideDecoderLayer`` (sail-sg/LongSpec longspec/test/*_glide.py),
    loaded the way the reference loads a draft: ``from_pretrained(dir)``."""
    from torch import nn
    from transformers import LlamaConfig, PreTrainedModel, Qwen2Config
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

    config_class, mlp_class, norm_class = {
        "llama": (LlamaConfig, LlamaMLP, LlamaRMSNorm),
        "qwen2": (Qwen2Config, Qwen2MLP, Qwen2RMSNorm),
    }[family]

    def glide_attention(config) -> nn.Module:
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        kv_size = config.num_key_value_heads * head_dim
        attention = nn.Module()
        attention.q_proj = nn.Linear(hidden, heads * head_dim, bias=True)
        attention.k_proj = nn.Linear(hidden, kv_size, bias=True)
        attention.v_proj = nn.Linear(hidden, kv_size, bias=True)
        attention.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        return attention

    class GlideDecoderLayer(PreTrainedModel):
        base_model_prefix = "model"

        def __init__(self, config):
            super().__init__(config)
            self.self_attn = glide_attention(config)
            self.cross_attn = glide_attention(config)
            self.mlp = mlp_class(config)
            eps = config.rms_norm_eps
            self.input_layernorm = norm_class(config.hidden_size, eps=eps)
            self.post_self_attention_layernorm = norm_class(config.hidden_size, eps=eps)
            self.post_cross_attention_layernorm = norm_class(config.hidden_size, eps=eps)
            self.post_init()

    GlideDecoderLayer.config_class = config_class
    return GlideDecoderLayer


def test_reference_code_loads_the_published_export(tiny_target, tmp_path):
    config, target = tiny_target
    state = random_draft_state(config, seed=5)
    save_draft(tmp_path / "ours", state, config, {}, layout="published")
    layer_class = _reference_layer_class(config["model_type"])
    for directory in (tmp_path / "ours", write_published_draft(tmp_path / "ref", target)):
        layer, info = layer_class.from_pretrained(directory, output_loading_info=True)
        assert not any(info.values()), (directory, info)
        assert layer.config.num_hidden_layers == config["num_hidden_layers"]
    # The fixture's layout equals the reference module's parameters.
    loaded = read_draft_checkpoint(tmp_path / "ours")
    reference = layer_class.from_pretrained(tmp_path / "ours")
    assert loaded.shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert torch.equal(reference.state_dict()["mlp.down_proj.weight"],
                       state["mlp.down_proj.weight"])
