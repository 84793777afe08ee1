"""The training pipeline never imports vLLM (it must run where vLLM is absent)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import vllm_longspec.train as train_package


def test_train_package_and_cli_do_not_import_vllm():
    modules = [f"vllm_longspec.train.{m.name}"
               for m in pkgutil.iter_modules(train_package.__path__)]
    assert "vllm_longspec.train.trainer" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules + ['vllm_longspec.cli']!r}:\n"
        "    importlib.import_module(name)\n"
        "from vllm_longspec.train.trainer import Trainer\n"
        "leaked = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'))\n"
        "assert not leaked, leaked\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
