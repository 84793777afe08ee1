"""End-to-end fixtures: long prompts from real source files, engine jobs.

Prompts: 8 prompts of 1.1k-7k tokens cut from Python standard-library modules
(real, long, present wherever Python is), alternately a raw code continuation
and a chat request to explain the code. Engines run in subprocesses via
``engine_job.py``; the plain-decoding reference is computed once per session.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

JOB_SCRIPT = Path(__file__).with_name("engine_job.py")
PROMPT_LENGTHS = (1100, 1900, 2700, 3500, 4300, 5100, 6000, 7000)
SOURCE_MODULES = ("argparse", "difflib", "typing", "inspect", "pathlib",
                  "fractions", "dataclasses", "tarfile")
MAX_TOKENS = 48


def _module_source(name: str) -> str:
    return inspect.getsource(__import__(name))


@pytest.fixture(scope="session")
def tokenizer(target_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(target_dir)


def _chat_ids(tokenizer, content: str) -> list[int]:
    return list(tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True,
        tokenize=True, return_dict=True)["input_ids"])


@pytest.fixture(scope="session")
def long_prompts(tokenizer) -> list[list[int]]:
    prompts = []
    for i, (length, module) in enumerate(zip(PROMPT_LENGTHS, SOURCE_MODULES, strict=True)):
        source_ids = tokenizer(_module_source(module))["input_ids"]
        assert len(source_ids) >= length, module
        if i % 2 == 0:  # continue the code
            prompts.append(source_ids[:length])
            continue
        question = "\n\nExplain what the Python code above does, step by step."
        overhead = len(_chat_ids(tokenizer, question))
        document = tokenizer.decode(source_ids[:length - overhead])
        prompts.append(_chat_ids(tokenizer, document + question))
    return prompts


def run_engine_job(tmp_path: Path, job: dict, timeout: int = 1500) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    job_file, result_file = tmp_path / "job.json", tmp_path / "result.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, str(JOB_SCRIPT), str(job_file),
                           str(result_file)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"engine job failed:\n{proc.stderr[-6000:]}")
    return json.loads(result_file.read_text())


@pytest.fixture(scope="session")
def plain_outputs(tmp_path_factory, target_dir, long_prompts) -> list[list[int]]:
    """Plain vLLM greedy decoding, float32: the reference for every LongSpec run."""
    result = run_engine_job(tmp_path_factory.mktemp("plain"), {
        "model": str(target_dir), "prompts": long_prompts, "max_tokens": MAX_TOKENS,
        "phases": [{"name": "batch", "mode": "batch"}],
    })
    return result["phases"]["batch"]["token_ids"]


@pytest.fixture(scope="session")
def recorded_continuations(tmp_path_factory, long_prompts, plain_outputs) -> Path:
    """The plain run's continuations, for the replaying test proposer."""
    path = tmp_path_factory.mktemp("replay") / "recorded.json"
    path.write_text(json.dumps({"sequences": [
        {"prompt_token_ids": p, "output_token_ids": o}
        for p, o in zip(long_prompts, plain_outputs, strict=True)]}))
    return path
