"""What one suite run measures: settings, engines, cells and their requests.

A *cell* is one (setting, method, task, bucket, batch size): all prompts of
that task and context-length bucket, decoded at that batch size by one engine.
Batch size 1 decodes the prompts one after another; batch size B > 1 sends B
requests at once, cycling through the bucket's prompts when it has fewer
than B (copies of a prompt are separate requests with their own seeds).

A cell's *fingerprint* hashes everything that determines its measurement
(engine settings, speculative config with the draft's content hash, sampling,
requests, vLLM version), so a cached cell is reused only for the same
experiment.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.longctx.methods import spec_slug
from benchmarks.longctx.prompt_file import PromptRecord

SAMPLED_TEMPERATURE = 0.8


@dataclass(frozen=True)
class Setting:
    """How tokens are chosen and in which dtype the target runs."""

    sampling: str  # "greedy" | "sampled"
    dtype: str  # "float32" | "bfloat16"

    @property
    def name(self) -> str:
        return f"{self.sampling}-{self.dtype}"

    @property
    def temperature(self) -> float:
        return 0.0 if self.sampling == "greedy" else SAMPLED_TEMPERATURE


@dataclass(frozen=True)
class EngineSettings:
    """``LLM(...)`` arguments shared by every method (dtype comes from the setting)."""

    model: str
    max_model_len: int = 8192
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 8192  # a 7k prompt prefills in one step
    kv_cache_memory_bytes: int = 3 << 30  # 8 requests of 7.3k tokens in float32
    enable_prefix_caching: bool = True  # vLLM's default; affects prefill only
    enforce_eager: bool = True
    seed: int = 0


@dataclass(frozen=True)
class Request:
    prompt_id: str
    copy: int  # which copy of the prompt within the cell (batch > #prompts)
    seed: int  # per-request sampling seed, the same for every method
    max_tokens: int
    prompt_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class CellKey:
    setting: str
    method: str  # the canonical method spec, e.g. "longspec:2" (methods.py)
    task: str
    bucket: str
    batch: int

    def relative_path(self, round_: int = 1) -> Path:
        """Where the cell's record of that round is cached (``--rounds``)."""
        suffix = "" if round_ == 1 else f".r{round_}"
        name = f"{self.task}-{self.bucket}-b{self.batch}{suffix}.json"
        return Path(self.setting, spec_slug(self.method), name)

    def label(self) -> str:
        return f"{self.setting} {self.method} {self.task} {self.bucket} b{self.batch}"


@dataclass(frozen=True)
class Cell:
    key: CellKey
    groups: tuple[tuple[Request, ...], ...]  # each group is decoded concurrently
    fingerprint: str


def request_seed(prompt_id: str, copy: int) -> int:
    return zlib.crc32(f"{prompt_id}:{copy}".encode())


def request_groups(prompts: list[PromptRecord], batch: int,
                   max_tokens_cap: int | None) -> tuple[tuple[Request, ...], ...]:
    """max(#prompts, batch) requests rounded up to whole batches, cycling prompts."""
    count = -(-max(len(prompts), batch) // batch) * batch
    requests = []
    for index in range(count):
        prompt = prompts[index % len(prompts)]
        copy = index // len(prompts)
        max_tokens = prompt.max_tokens
        if max_tokens_cap is not None:
            max_tokens = min(max_tokens, max_tokens_cap)
        requests.append(Request(prompt.id, copy, request_seed(prompt.id, copy),
                                max_tokens, prompt.prompt_token_ids))
    return tuple(tuple(requests[i:i + batch]) for i in range(0, count, batch))


def fingerprint(**parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=_jsonable)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"cannot fingerprint {type(value).__name__}")


def directory_sha256(directory: str) -> str:
    """Content hash of what makes a draft: its config.json and weights (names
    and bytes); a card or plot next to them does not change it."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and (path.name == "config.json" or path.suffix == ".safetensors"):
            digest.update(str(path.relative_to(directory)).encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
