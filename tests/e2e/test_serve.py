"""`vllm serve --speculative-config '{"method": "longspec", ...}'` as a real server.

Concurrent OpenAI-client completion and chat requests (float32, greedy) return
the same text as offline plain decoding (the shared plain engine's ``serve_*``
phases, ``conftest.py``), and /metrics shows the spec-decode counters rising.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from .server import MAX_TOKENS, QUESTIONS, TEXTS, drafts_counter, http_get, vllm_server

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def server(target_dir, random_draft_dir, tmp_path_factory):
    spec = {"method": "longspec", "model": str(random_draft_dir),
            "num_speculative_tokens": 3}
    with vllm_server(target_dir, spec, tmp_path_factory.mktemp("serve") / "server.log") as base:
        yield base


def test_concurrent_requests_match_offline_plain(server, target_dir, plain_run):
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

    assert texts == plain_run["serve_text"]["texts"]
    assert chats == plain_run["serve_chat"]["texts"]
    assert drafts_counter(http_get(server + "/metrics")) > drafts_before
