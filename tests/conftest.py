"""Shared fixtures: the default target model and tiny draft directories.

Also: Triton's interpreter for ``tests/kernels``. ``TRITON_INTERPRET=1`` must be
set when a ``@triton.jit`` function is defined, Triton's own helpers
(``tl.max``...) included, which are defined when ``triton.language`` is first
imported; vLLM imports it too. This conftest is loaded before any test module
of ``tests/`` is imported, so it imports ``triton.language`` first, under the
variable, then restores the environment (engine subprocesses must not inherit
it). ``tests/kernels/conftest.py`` fails the kernel tests if Triton was imported
before this ran (e.g. by a pytest plugin, or pytest started from a process that
had imported vLLM).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest


def _import_triton_language_interpreted() -> None:
    if "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_triton_language_interpreted()

E2E_DIR = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(config, items):
    """Every test under ``tests/e2e/`` starts engines: it is marked ``e2e``, so
    ``-m "not e2e"`` selects the fast tier."""
    for item in items:
        if E2E_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Trainers set torch's thread count (``num_threads``): restore it after each test."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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
