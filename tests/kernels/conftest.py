"""Fixtures for the kernel tests: Triton in its interpreter, without leaking it.

``TRITON_INTERPRET=1`` must be set when a ``@triton.jit`` function is defined,
including Triton's own helpers (``tl.max``...), which are defined when
``triton.language`` is first imported (vLLM imports it too). ``tests/conftest.py``
imports ``triton.language`` under the variable before any test module; the
``triton_ops`` fixture checks that it worked (a kernel test FAILS otherwise:
these tests are the only checks on the kernels), imports the kernel modules
under the variable and sets it for the duration of each kernel test only
(Triton also reads it at launch), so engine subprocesses started by other tests
never inherit it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types

import pytest

KERNEL_MODULES = (
    "vllm_longspec.kernels.masked_spec_attention",
    "vllm_longspec.kernels.paged_prefix_attention",
    "vllm_longspec.kernels.merge_attention_states",
)
HAS_TRITON = importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def _interpreting():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


@pytest.fixture
def triton_ops(_interpreted_kernels, monkeypatch):
    """The kernels, with TRITON_INTERPRET=1 for the test (Triton reads it at launch)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return _interpreted_kernels


@pytest.fixture(scope="session")
def _interpreted_kernels():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(standard.max, InterpretedFunction):
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set, so its "
                    "helpers (tl.max...) are compiled functions and the kernels cannot "
                    "run in the interpreter. tests/conftest.py imports triton.language "
                    "under the variable before any test module; something imported "
                    "Triton earlier (a pytest plugin, or pytest started from a process "
                    "that had imported vLLM or Triton). Run pytest as a fresh process.",
                    pytrace=False)
    with _interpreting():
        modules = []
        for name in KERNEL_MODULES:
            module = sys.modules.get(name)
            module = importlib.reload(module) if module else importlib.import_module(name)
            modules.append(module)
    return types.SimpleNamespace(
        masked_spec_attention=modules[0].masked_spec_attention,
        paged_prefix_attention=modules[1].paged_prefix_attention,
        merge_attention_states=modules[2].merge_attention_states,
    )
