"""The speculation algorithms import neither vLLM nor the kernels (issue 16: pure
algorithms live in a package that runs without the engine)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import vllm_longspec.speculation as speculation_package


def test_speculation_package_imports_neither_vllm_nor_kernels():
    modules = [f"vllm_longspec.speculation.{m.name}"
               for m in pkgutil.iter_modules(speculation_package.__path__)]
    assert {"vllm_longspec.speculation.lookup", "vllm_longspec.speculation.policy",
            "vllm_longspec.speculation.cost"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "forbidden = ('vllm', 'vllm_longspec.kernels', 'triton')\n"
        "leaked = sorted(m for m in sys.modules\n"
        "                if any(m == f or m.startswith(f + '.') for f in forbidden))\n"
        "assert not leaked, leaked\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
