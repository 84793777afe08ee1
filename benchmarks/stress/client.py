"""The HTTP side of the stress run: completions (streamed or not, some cut off
after a few chunks) and requests that must be refused."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import httpx

REQUEST_TIMEOUT_S = 900


@dataclass
class Outcome:
    """One request as the client saw it."""

    kind: str                       # "stream", "abort", "probe", "seeded", ...
    status: int                     # HTTP status (0: no response at all)
    error: str | None = None        # the server's message, or the client's exception
    token_ids: list[int] = field(default_factory=list)
    chunks: int = 0
    seconds: float = 0.0
    first_token_s: float | None = None
    finish_reason: str | None = None

    def record(self, with_tokens: bool = False) -> dict:
        out = asdict(self)
        out["num_tokens"] = len(self.token_ids)
        if not with_tokens:
            del out["token_ids"]
        return out


def error_message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body (else the body)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:500]
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message", error))[:500]
    return str(error)[:500]


async def stream_completion(client: httpx.AsyncClient, base: str, kind: str, body: dict,
                            disconnect_after: int | None = None) -> Outcome:
    """POST a streamed completion; with ``disconnect_after``, close the
    connection after that many chunks (the server must abort the request)."""
    body = {**body, "stream": True, "return_token_ids": True}
    started = time.perf_counter()
    outcome = Outcome(kind, 0)
    try:
        async with client.stream("POST", base + "/v1/completions", json=body,
                                 timeout=REQUEST_TIMEOUT_S) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                outcome.error = error_message(await response.aread())
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                _read_chunk(outcome, json.loads(line[len("data: "):]), started)
                if disconnect_after is not None and outcome.chunks >= disconnect_after:
                    break
    except (httpx.HTTPError, ValueError) as exc:
        outcome.error = f"client: {type(exc).__name__}: {exc}"[:500]
    finally:
        outcome.seconds = time.perf_counter() - started
    return outcome


def _read_chunk(outcome: Outcome, chunk: dict, started: float) -> None:
    if "error" in chunk:  # an error after the 200 header: vLLM sends it in-stream
        outcome.error = error_message(json.dumps(chunk).encode())
        status = chunk["error"].get("code") if isinstance(chunk["error"], dict) else None
        outcome.status = status if isinstance(status, int) else 500
        return
    outcome.chunks += 1
    for choice in chunk.get("choices", []):
        ids = choice.get("token_ids") or []
        if ids and outcome.first_token_s is None:
            outcome.first_token_s = time.perf_counter() - started
        outcome.token_ids += ids
        outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason


async def complete(client: httpx.AsyncClient, base: str, kind: str, body: dict) -> Outcome:
    """POST a completion and wait for all of it."""
    started = time.perf_counter()
    outcome = Outcome(kind, 0)
    try:
        response = await client.post(base + "/v1/completions",
                                     json={**body, "return_token_ids": True},
                                     timeout=REQUEST_TIMEOUT_S)
        outcome.status = response.status_code
        if response.status_code != 200:
            outcome.error = error_message(response.content)
        else:
            choice = response.json()["choices"][0]
            outcome.token_ids = list(choice.get("token_ids") or [])
            outcome.finish_reason = choice.get("finish_reason")
    except (httpx.HTTPError, ValueError) as exc:
        outcome.error = f"client: {type(exc).__name__}: {exc}"[:500]
    outcome.seconds = time.perf_counter() - started
    return outcome


def bad_inputs(model: str, max_model_len: int, prompt: list[int]) -> dict[str, dict]:
    """Name -> request the server must refuse with a 4xx. ``prompt``: a few
    hundred valid token ids. Each entry: {"path", "body"} (body: dict, or
    bytes sent as they are)."""
    ok = {"model": model, "prompt": prompt, "max_tokens": 8}
    over = (prompt * (max_model_len // len(prompt) + 2))[:max_model_len + 16]
    cases = {
        "prompt_over_context": {**ok, "prompt": over},
        "max_tokens_-1": {**ok, "max_tokens": -1},
        "max_tokens_0": {**ok, "max_tokens": 0},
        "temperature_-1": {**ok, "temperature": -1.0},
        "top_p_1.5": {**ok, "top_p": 1.5},
        "logprobs_50": {**ok, "logprobs": 50},
        "unknown_model": {**ok, "model": "no-such-model"},
        "empty_prompt": {**ok, "prompt": ""},
        "prompt_token_out_of_vocab": {**ok, "prompt": [10**9]},
    }
    requests = {name: {"path": "/v1/completions", "body": body}
                for name, body in cases.items()}
    requests["malformed_json"] = {"path": "/v1/completions",
                                  "body": b'{"model": "' + model.encode() + b'", "prompt": '}
    requests["chat_empty_messages"] = {"path": "/v1/chat/completions",
                                       "body": {"model": model, "messages": []}}
    return requests


async def send_bad_input(client: httpx.AsyncClient, base: str, request: dict) -> Outcome:
    body = request["body"]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    started = time.perf_counter()
    try:
        response = await client.post(base + request["path"], content=content,
                                     headers={"Content-Type": "application/json"},
                                     timeout=REQUEST_TIMEOUT_S)
        outcome = Outcome("bad_input", response.status_code)
        if response.status_code != 200:
            outcome.error = error_message(response.content)
    except httpx.HTTPError as exc:
        outcome = Outcome("bad_input", 0, f"client: {type(exc).__name__}: {exc}"[:500])
    outcome.seconds = time.perf_counter() - started
    return outcome


async def gather(*coroutines) -> list[Outcome]:
    return list(await asyncio.gather(*coroutines))
