"""The prompt set on disk: one JSON record per line, plus a manifest.

``benchmarks/prompts/longctx-v2.jsonl`` is written by ``benchmarks/build_prompts.py``
and read by the runner. A record holds the exact token ids given to the target,
so every run of the suite decodes the same inputs; its sources and the sha256
of its text say where it came from. The manifest beside it names the tokenizer
the ids belong to and the sha256 of the JSONL file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROMPT_SET = "longctx-v2"
PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
PROMPT_FILE = PROMPTS_DIR / f"{PROMPT_SET}.jsonl"
MANIFEST_FILE = PROMPTS_DIR / f"{PROMPT_SET}.manifest.json"

TASKS = ("code_completion", "doc_qa", "summarisation", "long_generation")

# Context-length buckets: a prompt of bucket B has between BUCKET_TOKENS[B] -
# BUCKET_SLACK and BUCKET_TOKENS[B] tokens, chat template included. The longest
# leaves 1024 of the target's 8192 positions for the answer.
BUCKET_TOKENS = {"1k": 1024, "4k": 4096, "7k": 7168}
BUCKET_SLACK = 96


def bucket_range(bucket: str) -> range:
    """The prompt lengths (in target tokens) allowed in ``bucket``."""
    top = BUCKET_TOKENS[bucket]
    return range(top - BUCKET_SLACK, top + 1)


@dataclass(frozen=True)
class Source:
    """One document of a prompt: a reserved file and how much of it was used."""

    path: str  # "{stdlib}/asyncio/events.py" or an absolute path
    kind: str  # "code" | "docstrings" | "prose"
    sha256: str  # of the file's bytes
    complete: bool  # False for the document that was cut to fit the bucket


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt_set: str
    task: str
    bucket: str
    format: str  # "raw" (plain continuation) | "chat" (target's chat template)
    num_tokens: int
    max_tokens: int
    instruction: str | None  # the request after the documents (chat only)
    sources: tuple[Source, ...]
    text_sha256: str  # of the prompt text the token ids encode
    prompt_token_ids: tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> PromptRecord:
        data: dict[str, Any] = json.loads(line)
        data["sources"] = tuple(Source(**source) for source in data["sources"])
        data["prompt_token_ids"] = tuple(data["prompt_token_ids"])
        return cls(**data)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_prompts(records: list[PromptRecord], path: Path = PROMPT_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(record.to_json() + "\n" for record in records))


def read_prompts(path: Path = PROMPT_FILE) -> list[PromptRecord]:
    return [PromptRecord.from_json(line) for line in path.read_text().splitlines()]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
