"""Published LongSpec checkpoints (sail-sg/LongSpec layout) served as they are.

Tiny random Llama and Qwen2 targets, each with a random draft written exactly as
the reference code's ``save_pretrained`` writes one (``tests/published_drafts``):
through ``LLM`` and through ``vllm serve``, greedy float32 output equals plain
decoding token for token, and the draft ran. One engine per configuration;
prompts straddle the default 512-token draft window.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.published_drafts import save_tiny_target, write_published_draft

from .conftest import run_engine_job
from .server import drafts_counter, http_get, http_post_json, vllm_server

pytestmark = pytest.mark.e2e

PROMPT_LENGTHS = (300, 700)
MAX_TOKENS = 24
MAX_MODEL_LEN = 2048


@dataclasses.dataclass(frozen=True)
class Case:
    target: Path
    draft: Path
    prompts: list[list[int]]
    plain: list[list[int]]  # plain greedy continuations of ``prompts``

    def job(self, speculative_config: dict | None = None) -> dict:
        return {"model": str(self.target), "prompts": self.prompts,
                "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "max_model_len": MAX_MODEL_LEN,
                "engine_args": {"skip_tokenizer_init": True},
                "speculative_config": speculative_config,
                "phases": [{"name": "batch", "mode": "batch"}]}


def _longspec(case: Case) -> dict:
    return {"method": "longspec", "model": str(case.draft), "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def case_of(tmp_path_factory):
    """family -> Case, built (with its plain reference run) once per module."""
    built: dict[str, Case] = {}

    def case(family: str) -> Case:
        if family not in built:
            root = tmp_path_factory.mktemp(family)
            target = save_tiny_target(root / "target", family)
            draft = write_published_draft(root / "draft", target)
            rng = np.random.default_rng(0)
            prompts = [rng.integers(3, 256, n).tolist() for n in PROMPT_LENGTHS]
            partial = Case(target, draft, prompts, [])
            plain = run_engine_job(root / "plain", partial.job())
            built[family] = dataclasses.replace(
                partial, plain=plain["phases"]["batch"]["token_ids"])
        return built[family]

    return case


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llm_with_published_draft_matches_plain(family, case_of, tmp_path):
    case = case_of(family)
    result = run_engine_job(tmp_path, case.job(_longspec(case)))
    batch = result["phases"]["batch"]
    assert batch["token_ids"] == case.plain
    assert batch["counters"]["vllm:spec_decode_num_draft_tokens"] > 0


def test_vllm_serve_with_published_draft_matches_plain(case_of, tmp_path):
    case = case_of("llama")
    with vllm_server(case.target, _longspec(case), tmp_path / "server.log",
                     max_model_len=MAX_MODEL_LEN,
                     extra_args=["--skip-tokenizer-init"]) as base:
        drafts_before = drafts_counter(http_get(base + "/metrics"))

        def complete(prompt):
            response = http_post_json(base + "/v1/completions", {
                "model": str(case.target), "prompt": prompt, "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            return response["choices"][0]["token_ids"]

        with ThreadPoolExecutor(max_workers=len(case.prompts)) as pool:
            outputs = list(pool.map(complete, case.prompts))
        assert outputs == case.plain
        assert drafts_counter(http_get(base + "/metrics")) > drafts_before
