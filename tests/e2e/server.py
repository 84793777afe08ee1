"""A real ``vllm serve`` for end-to-end tests: start, wait for /health, stop."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

START_TIMEOUT_S = 420
# test_serve.py's requests (greedy), answered offline by the shared plain engine.
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def http_post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read().decode())


def drafts_counter(metrics_text: str) -> float:
    match = re.search(r"^vllm:spec_decode_num_drafts_total\{[^}]*\} (\S+)$",
                      metrics_text, re.MULTILINE)
    assert match, "spec-decode counter missing from /metrics"
    return float(match.group(1))


@contextlib.contextmanager
def vllm_server(model: Path, speculative_config: dict | None, log: Path,
                max_model_len: int = 4096, extra_args: Sequence[str] = (),
                dtype: str = "float32", kv_cache_bytes: int = 1 << 30
                ) -> Iterator[str]:
    """``vllm serve MODEL`` with a speculative config (None: plain decoding);
    yields its base URL."""
    port = free_port()
    speculation = (["--speculative-config", json.dumps(speculative_config)]
                   if speculative_config is not None else [])
    command = [str(Path(sys.executable).with_name("vllm")), "serve", str(model),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
               "--max-model-len", str(max_model_len), "--enforce-eager",
               "--kv-cache-memory-bytes", str(kv_cache_bytes), *speculation, *extra_args]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited:\n{log.read_text()[-4000:]}")
            try:
                http_get(base + "/health")
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
