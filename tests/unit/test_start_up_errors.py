"""Every LongSpec start-up error, raised while vLLM builds its config.

``EngineArgs.create_engine_config`` is what both ``vllm serve`` and ``LLM(...)``
run before any process starts or weight loads, so these checks are fast; one
test runs ``vllm serve`` itself to show the message reaches the user and the
exit code is non-zero.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from vllm_longspec.config import LongSpecSettings
from vllm_longspec.model.checkpoint import random_draft_state, save_draft


def _engine_config(target_dir, speculative_config, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_longspec.plugin

    vllm_longspec.plugin.register()
    return EngineArgs(model=str(target_dir), dtype="float32", max_model_len=2048,
                      speculative_config=speculative_config,
                      **kwargs).create_engine_config()


def test_valid_config_becomes_a_longspec_draft_model(target_dir, random_draft_dir):
    config = _engine_config(target_dir, {"method": "longspec",
                                         "model": str(random_draft_dir),
                                         "sliding_window": 64})
    spec = config.speculative_config
    assert spec.method == "draft_model"
    assert spec.num_speculative_tokens == 8   # adaptive chains: a ceiling of 8
    assert spec.draft_model_config.architectures == ["LongSpecForCausalLM"]
    settings = LongSpecSettings.of(spec.draft_model_config.hf_config)
    assert settings.config.sliding_window == 64
    assert settings.config.num_speculative_tokens == 8  # resolved: the default
    assert settings.draft_vocab_size == 0


def test_tree_reserves_its_nodes_and_writes_no_environment(target_dir, random_draft_dir):
    before = dict(os.environ)
    config = _engine_config(target_dir, {"method": "longspec",
                                         "model": str(random_draft_dir),
                                         "tree": [4, 4, 4]})
    assert dict(os.environ) == before
    spec = config.speculative_config
    assert spec.num_speculative_tokens == 12
    settings = LongSpecSettings.of(spec.draft_model_config.hf_config)
    assert settings.config.tree == (4, 4, 4)
    assert settings.config.sliding_window == 512  # the draft's (config.json)
    # the stored form survives vLLM's JSON view of the config
    assert json.loads(spec.draft_model_config.hf_config.to_json_string())[
        LongSpecSettings.HF_ATTRIBUTE]["config"]["tree"] == [4, 4, 4]


def test_longspec_makes_vllm_choose_the_v1_runner(target_dir, random_draft_dir,
                                                  monkeypatch):
    from vllm_longspec.patches.engine_args import UnsupportedConfigurationError
    from vllm_longspec.patches.v2_runner import V2_UNSUPPORTED

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    spec = {"method": "longspec", "model": str(random_draft_dir)}
    config = _engine_config(target_dir, spec)
    assert V2_UNSUPPORTED in config._get_v2_model_runner_unsupported_features()
    ngram = _engine_config(target_dir, {"method": "ngram", "num_speculative_tokens": 2,
                                        "prompt_lookup_max": 3})
    assert V2_UNSUPPORTED not in ngram._get_v2_model_runner_unsupported_features()
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(UnsupportedConfigurationError, match="VLLM_USE_V2_MODEL_RUNNER"):
        _engine_config(target_dir, spec)


def test_tree_on_a_gpu_is_refused(monkeypatch):
    """The tree runner moves K/V in vLLM's CPU cache layout: trees are CPU-only,
    with or without the GPU switch."""
    from vllm.platforms import current_platform

    from vllm_longspec.kernels.tuning import GPU_ENV
    from vllm_longspec.patches.engine_args import (
        UnsupportedConfigurationError,
        check_tree_platform,
    )

    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    for switch in ("0", "1"):
        monkeypatch.setenv(GPU_ENV, switch)
        with pytest.raises(UnsupportedConfigurationError, match="needs vLLM's CPU backend"):
            check_tree_platform()


def test_without_longspec_vllm_is_unchanged(target_dir):
    config = _engine_config(target_dir, {"method": "ngram", "num_speculative_tokens": 2,
                                         "prompt_lookup_max": 3})
    assert config.speculative_config.method == "ngram"
    assert _engine_config(target_dir, None).speculative_config is None


def test_spec_method_flag_spelling(target_dir, random_draft_dir):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=str(target_dir), dtype="float32", max_model_len=2048,
                        spec_method="longspec", spec_model=str(random_draft_dir),
                        spec_tokens=2).create_engine_config()
    assert config.speculative_config.num_speculative_tokens == 2


@pytest.mark.parametrize(
    "options, message",
    [
        ({"foo": 1}, "Unknown key 'foo'"),
        ({"num_speculative_tokens": 99}, "'num_speculative_tokens' must be"),
        ({"model": "/nonexistent/draft"}, "does not exist"),
    ],
)
def test_bad_user_config(target_dir, random_draft_dir, options, message):
    spec = {"method": "longspec", "model": str(random_draft_dir), **options}
    with pytest.raises(ValueError, match=message):
        _engine_config(target_dir, spec)


def test_draft_for_another_model(target_dir, target_config, tmp_path):
    other = {**target_config, "hidden_size": 512, "intermediate_size": 1024,
             "num_attention_heads": 8, "num_key_value_heads": 2}
    save_draft(tmp_path, random_draft_state(other), other, {})
    with pytest.raises(ValueError, match="Was it trained for another model"):
        _engine_config(target_dir, {"method": "longspec", "model": str(tmp_path)})


def test_draft_with_other_vocabulary(target_dir, target_config, tmp_path):
    save_draft(tmp_path, random_draft_state(target_config),
               {**target_config, "vocab_size": 32000}, {})
    with pytest.raises(ValueError, match="vocabulary of 32000"):
        _engine_config(target_dir, {"method": "longspec", "model": str(tmp_path)})


def test_unsupported_target_architecture(target_dir, random_draft_dir, tmp_path):
    shutil.copytree(target_dir, tmp_path / "t", ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    config.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    (tmp_path / "t" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not support target architecture"):
        _engine_config(tmp_path / "t", {"method": "longspec",
                                        "model": str(random_draft_dir)})


@pytest.mark.parametrize(
    "engine_kwargs, message",
    [
        ({"pipeline_parallel_size": 2}, "does not support pipeline parallelism"),
        ({"kv_cache_dtype": "fp8"}, "does not support --kv-cache-dtype fp8"),
    ],
)
def test_unsupported_feature_combination(target_dir, random_draft_dir, engine_kwargs,
                                         message):
    with pytest.raises(ValueError, match=message):
        _engine_config(target_dir, {"method": "longspec",
                                    "model": str(random_draft_dir)}, **engine_kwargs)


def test_vllm_serve_exits_with_the_message(target_dir, tmp_path):
    """A real `vllm serve` with a missing draft: non-zero exit, message shown."""
    vllm_cli = shutil.which("vllm", path=str(__import__("pathlib").Path(sys.executable).parent))
    spec = json.dumps({"method": "longspec", "model": str(tmp_path / "missing")})
    result = subprocess.run(
        [vllm_cli, "serve", str(target_dir), "--dtype", "float32",
         "--max-model-len", "2048", "--speculative-config", spec],
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "missing' does not exist" in result.stderr + result.stdout
