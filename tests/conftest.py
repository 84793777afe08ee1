"""Shared fixtures: the default target model and tiny draft directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def target_dir() -> Path:
    from vllm_longspec.assets import ensure_default_target

    return ensure_default_target(progress=False)


@pytest.fixture(scope="session")
def target_config(target_dir) -> dict:
    return json.loads((target_dir / "config.json").read_text())


@pytest.fixture(scope="session")
def random_draft_dir(tmp_path_factory, target_config) -> Path:
    """A randomly initialised LongSpec draft for the default target."""
    from vllm_longspec.model.checkpoint import random_draft_state, save_draft

    path = tmp_path_factory.mktemp("random_draft")
    return save_draft(path, random_draft_state(target_config, seed=0), target_config,
                      {"sliding_window": 512})
