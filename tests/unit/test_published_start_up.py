"""Published checkpoints (sail-sg/LongSpec layout) through vLLM's config building.

``EngineArgs.create_engine_config`` is what ``vllm serve`` and ``LLM(...)`` run
first; before the fix it stopped inside ``SpeculativeConfig`` with "Model
architectures ['LlamaGlideDecoderLayer'] are not supported for now". No engine.
"""

from __future__ import annotations

import json
import types

import pytest

from tests.published_drafts import GLIDE_CLASS, save_tiny_target, write_published_draft


def _engine_config(target_dir, draft_dir):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_longspec.plugin

    vllm_longspec.plugin.register()
    return EngineArgs(
        model=str(target_dir), dtype="float32", max_model_len=2048,
        skip_tokenizer_init=True,
        speculative_config={"method": "longspec", "model": str(draft_dir)},
    ).create_engine_config()


@pytest.fixture(scope="module", params=sorted(GLIDE_CLASS))
def family_target(request, tmp_path_factory):
    return request.param, save_tiny_target(tmp_path_factory.mktemp(request.param),
                                           request.param)


def test_published_draft_becomes_a_longspec_draft(family_target, tmp_path):
    from vllm_longspec.config import LongSpecSettings
    from vllm_longspec.patches.model_runner import is_longspec_speculation

    family, target = family_target
    draft = write_published_draft(tmp_path, target)
    config = _engine_config(target, draft)
    spec = config.speculative_config
    assert spec.method == "draft_model"
    assert spec.num_speculative_tokens == 8   # adaptive chains: a ceiling of 8
    assert spec.draft_model_config.architectures == ["LongSpecForCausalLM"]
    settings = LongSpecSettings.of(spec.draft_model_config.hf_config)
    assert settings.config.sliding_window == 512 and settings.config.tree is None
    assert settings.draft_vocab_size == 0
    assert is_longspec_speculation(config)
    # Nothing was written into the user's directory.
    assert json.loads((draft / "config.json").read_text())["architectures"] == [
        GLIDE_CLASS[family]]
    assert sorted(p.name for p in draft.iterdir()) == ["config.json", "model.safetensors"]


def test_published_draft_for_another_target_is_refused(family_target, tmp_path):
    family, target = family_target
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((target / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2}))
    draft = write_published_draft(tmp_path / "draft", other)
    with pytest.raises(ValueError, match="Was it trained for another model"):
        _engine_config(target, draft)


@pytest.mark.parametrize("architecture", [
    "LongSpecForCausalLM", "LlamaGlideDecoderLayer", "Qwen2GlideDecoderLayer"])
def test_every_draft_architecture_is_longspec(architecture):
    from vllm import ModelRegistry

    import vllm_longspec.plugin
    from vllm_longspec.patches.model_runner import is_longspec_speculation

    vllm_longspec.plugin.register()
    assert architecture in ModelRegistry.get_supported_archs()
    hf_config = types.SimpleNamespace(architectures=[architecture])
    spec = types.SimpleNamespace(method="draft_model",
                                 draft_model_config=types.SimpleNamespace(hf_config=hf_config))
    assert is_longspec_speculation(types.SimpleNamespace(speculative_config=spec))
    hf_config.architectures = ["LlamaForCausalLM"]
    assert not is_longspec_speculation(types.SimpleNamespace(speculative_config=spec))
