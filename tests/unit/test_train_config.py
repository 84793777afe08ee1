"""Training config: files, defaults, validation messages, the shipped default."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

import vllm_longspec.train as train_package
from vllm_longspec.train.config import TrainConfigError, config_from_dict, load_config

STAGE = {"name": "s", "sources": [{"type": "text", "paths": ["x/*.py"]}], "steps": 3}
DEFAULT_CONFIG = Path(train_package.__file__).parent / "configs" / "smollm2_135m.json"


def test_json_and_yaml_give_the_same_config(tmp_path):
    raw = {"stages": [STAGE], "seed": 3, "noise_shift": [1, 2]}
    (tmp_path / "c.json").write_text(json.dumps(raw))
    yaml = pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    from_json, from_yaml = load_config(tmp_path / "c.json"), load_config(tmp_path / "c.yaml")
    assert from_json == from_yaml
    assert from_json.noise_shift == (1, 2) and from_json.betas == (0.9, 0.95)
    assert from_json.weight_decay == 0.1 and from_json.sliding_window == 512
    stage = from_json.stages[0]
    assert stage.aoi and stage.seq_len == 1024 and stage.num_steps == 3


@pytest.mark.parametrize("raw, message", [
    ({"stages": [STAGE], "learning_rate": 1}, "unknown key 'learning_rate'"),
    ({"stages": [{**STAGE, "epochs": 1}]}, "unknown key 'epochs' in stages\\[0\\]"),
    ({"stages": [{**STAGE, "tokens": 5}]}, "exactly one of 'steps' and 'tokens'"),
    ({"stages": [{**STAGE, "batch_tokens": 1000}]}, "multiple of grad_accum"),
    ({"stages": [STAGE], "noise_shift": [0, 4]}, "noise_shift"),
    ({"stages": []}, "no stages"),
    ({"stages": [{**STAGE, "sources": [{"type": "csv", "paths": ["a"]}]}]}, "csv"),
    ({"stages": [STAGE, STAGE]}, "unique"),
    ({"stages": [STAGE], "device": "gpu"}, "device must be 'cpu' or 'cuda"),
    ({"stages": [{**STAGE, "loss_on": "prompt"}]}, "loss_on must be one of source, all"),
])
def test_bad_configs_name_the_problem(raw, message):
    with pytest.raises(TrainConfigError, match=message):
        config_from_dict(raw)


def test_tokens_budget_becomes_steps():
    config = config_from_dict({"stages": [
        {**STAGE, "steps": None, "tokens": 10_000, "batch_tokens": 4096,
         "seq_len": 1024, "grad_accum": 2}
    ]})
    assert config.stages[0].num_steps == 3
    assert config.stages[0].sequences_per_micro_batch == 2


def test_default_smollm2_config_loads_and_its_sources_exist():
    config = load_config(DEFAULT_CONFIG)
    assert config.target is None  # the default target
    assert [s.name for s in config.stages] == ["short-aoi", "sft-distill"]
    assert config.stages[0].aoi and config.stages[0].seq_len == 1024
    stdlib = sysconfig.get_paths()["stdlib"]
    first_source = config.stages[0].sources[0]
    assert first_source.expanded_paths()[0].startswith(stdlib)
    assert any(Path(stdlib).glob("*.py"))
    # stage 2 reads `vllm-longspec distill` output from the user's cache
    (distill,) = config.stages[1].sources
    assert distill.type == "jsonl" and not config.stages[1].aoi
    assert distill.expanded_paths()[0].startswith(str(Path.home()))
