"""The pure algorithms import neither vLLM nor the kernels nor the vLLM glue.

``vllm_longspec.tree`` (tree structures, masks, beam, verification rules,
limits) and ``vllm_longspec.speculation`` (context lookup, step cost, the
speculation length policy) run without an engine and without Triton; the
training pipeline and the tests use them as they are.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

FORBIDDEN = ("vllm", "triton", "vllm_longspec.kernels", "vllm_longspec.attention",
             "vllm_longspec.model", "vllm_longspec.runner", "vllm_longspec.patches")
PURE_PACKAGES = {
    "vllm_longspec.tree": {"beam", "limits", "mask", "structure", "verify"},
    "vllm_longspec.speculation": {"cost", "lookup", "policy"},
}


def leaked_modules(modules: list[str]) -> list[str]:
    """Forbidden modules loaded by importing ``modules`` in a fresh interpreter."""
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"forbidden = {FORBIDDEN!r}\n"
        "print(sorted(m for m in sys.modules\n"
        "             if any(m == f or m.startswith(f + '.') for f in forbidden)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return eval(result.stdout)


@pytest.mark.parametrize("package", sorted(PURE_PACKAGES))
def test_pure_package_imports_nothing_of_the_engine(package):
    path = importlib.import_module(package).__path__
    names = {m.name for m in pkgutil.iter_modules(path)}
    assert PURE_PACKAGES[package] <= names
    assert leaked_modules([package] + [f"{package}.{name}" for name in sorted(names)]) == []


def test_the_check_sees_a_leak():
    assert "vllm_longspec.kernels.checks" in leaked_modules(["vllm_longspec.kernels.checks"])
