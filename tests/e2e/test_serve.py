"""`vllm serve --speculative-config '{"method": "longspec", ...}'` as a real server.

Concurrent OpenAI-client completion and chat requests (float32, greedy) return
the same text as offline plain decoding, and /metrics shows the spec-decode
counters rising.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import run_engine_job

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _drafts_counter(metrics_text: str) -> float:
    match = re.search(r"^vllm:spec_decode_num_drafts_total\{[^}]*\} (\S+)$",
                      metrics_text, re.MULTILINE)
    assert match, "spec-decode counter missing from /metrics"
    return float(match.group(1))


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
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    spec = {"method": "longspec", "model": str(random_draft_dir),
            "num_speculative_tokens": 3}
    command = [str(Path(sys.executable).with_name("vllm")), "serve", str(target_dir),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "4096", "--enforce-eager",
               "--kv-cache-memory-bytes", str(1 << 30),
               "--speculative-config", json.dumps(spec)]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 420
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited:\n{log.read_text()[-4000:]}")
            try:
                _get(base + "/health")
                break
            except OSError:
                if time.time() > deadline:
                    raise AssertionError(
                        f"server not up:\n{log.read_text()[-4000:]}") from None
                time.sleep(2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_concurrent_requests_match_offline_plain(server, target_dir, offline_plain):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="none")
    model = str(target_dir)
    drafts_before = _drafts_counter(_get(server + "/metrics"))

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
    assert _drafts_counter(_get(server + "/metrics")) > drafts_before
