"""`vllm serve --speculative-config '{"method": "longspec", ...}'` as a real server.

Concurrent OpenAI-client completion and chat requests (float32, greedy) return
the same text as offline plain decoding, and /metrics shows the spec-decode
counters rising.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import run_engine_job
from .server import drafts_counter, http_get, vllm_server

pytestmark = pytest.mark.e2e

MAX_TOKENS = 32
TEXTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three most important ideas of thermodynamics are",
    "import json\n\n\ndef load_config(path):\n",
    "A short history of the printing press:",
]
QUESTIONS = [
    "What is a hash table? Answer in two sentences.",
    "Write a haiku about the sea.",
    "List three uses of Python decorators.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def offline_plain(tmp_path_factory, target_dir):
    result = run_engine_job(tmp_path_factory.mktemp("serve_plain"), {
        "model": str(target_dir), "max_tokens": MAX_TOKENS, "max_model_len": 4096,
        "phases": [
            {"name": "text", "mode": "text", "texts": TEXTS},
            {"name": "chat", "mode": "chat", "messages": [
                [{"role": "user", "content": q}] for q in QUESTIONS]},
        ],
    })
    return result["phases"]["text"]["texts"], result["phases"]["chat"]["texts"]


@pytest.fixture(scope="module")
def server(target_dir, random_draft_dir, tmp_path_factory):
    spec = {"method": "longspec", "model": str(random_draft_dir),
            "num_speculative_tokens": 3}
    with vllm_server(target_dir, spec, tmp_path_factory.mktemp("serve") / "server.log") as base:
        yield base


def test_concurrent_requests_match_offline_plain(server, target_dir, offline_plain):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="none")
    model = str(target_dir)
    drafts_before = drafts_counter(http_get(server + "/metrics"))

    def complete(text):
        return client.completions.create(model=model, prompt=text, temperature=0,
                                         max_tokens=MAX_TOKENS).choices[0].text

    def chat(question):
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}],
            temperature=0, max_tokens=MAX_TOKENS).choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        texts = [pool.submit(complete, t) for t in TEXTS]
        chats = [pool.submit(chat, q) for q in QUESTIONS]
        texts, chats = [f.result() for f in texts], [f.result() for f in chats]

    plain_texts, plain_chats = offline_plain
    assert texts == plain_texts
    assert chats == plain_chats
    assert drafts_counter(http_get(server + "/metrics")) > drafts_before
