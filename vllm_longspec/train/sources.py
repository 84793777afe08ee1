"""Documents of a stage's sources: enumerated once, read (tokenized) on demand.

A document is one row of ``DocumentIndex.refs``: (file number, item), where
the item is 0 for a text file (the whole file), a byte offset for a JSONL line,
or a piece number for a token file (TOKEN_PIECE tokens each). Files are found
with the sources' globs, sorted, de-duplicated by resolved path, and filtered
by the source's ``exclude`` globs and by the run's ``ExclusionSet`` (the
benchmarks' files), so an excluded file never gets an entry.

Reading a document gives (token ids, loss mask): text files and JSONL "text"
end with the tokenizer's EOS; JSONL "messages" are chats (loss on assistant
tokens only, see chat.py); token files carry a loss on every token.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import logging
from pathlib import Path

import numpy as np

from vllm_longspec.train.chat import ChatTemplateError, tokenize_chat
from vllm_longspec.train.config import SourceConfig
from vllm_longspec.train.exclusions import ExclusionSet

log = logging.getLogger(__name__)

TOKEN_PIECE = 8192
TOKEN_FILE_SUFFIXES = (".npy", ".bin")


@dataclasses.dataclass
class DocumentIndex:
    files: list[tuple[SourceConfig, Path]]
    # [num_documents, 2] int64: (index into files, item)
    refs: np.ndarray

    def __len__(self) -> int:
        return len(self.refs)


def kept_files(source: SourceConfig, exclusions: ExclusionSet) -> list[Path]:
    """The source's files that the run's exclusions (the benchmarks') allow."""
    return [p for p in matching_files(source) if exclusions.allows(p)]


def matching_files(source: SourceConfig) -> list[Path]:
    found: dict[Path, Path] = {}
    for pattern in source.expanded_paths():
        for name in glob.glob(str(Path(pattern).expanduser()), recursive=True):
            path = Path(name)
            resolved = path.resolve()
            if path.is_file() and not any(
                fnmatch.fnmatch(str(resolved), ex) for ex in source.exclude
            ):
                found.setdefault(resolved, path)
    return [found[key] for key in sorted(found)]


def _open_token_file(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r")
    return np.memmap(path, dtype=np.uint32, mode="r")


def _items(source: SourceConfig, path: Path) -> list[int]:
    if source.type == "text":
        return [0]
    if source.type == "tokens":
        if path.suffix not in TOKEN_FILE_SUFFIXES:
            raise ValueError(f"token file {str(path)!r} must end in .npy or .bin.")
        return list(range(-(-len(_open_token_file(path)) // TOKEN_PIECE)))
    offsets, position = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(position)
            position += len(line)
    return offsets


def index_documents(
    sources: tuple[SourceConfig, ...], exclusions: ExclusionSet
) -> DocumentIndex:
    files: list[tuple[SourceConfig, Path]] = []
    refs: list[tuple[int, int]] = []
    for source in sources:
        skipped_before = len(exclusions.skipped)
        kept = kept_files(source, exclusions)
        for path in kept:
            refs += [(len(files), item) for item in _items(source, path)]
            files.append((source, path))
        log.info(
            "source %s %s: %d files, %d excluded (benchmark files)",
            source.type, list(source.paths), len(kept),
            len(exclusions.skipped) - skipped_before,
        )
    if not refs:
        raise ValueError(
            f"no training documents found in {[list(s.paths) for s in sources]} "
            f"({len(exclusions.skipped)} files excluded as benchmark inputs)."
        )
    return DocumentIndex(files=files, refs=np.asarray(refs, dtype=np.int64))


class DocumentReader:
    """Turns a document ref into (token ids int64, loss mask bool) arrays."""

    def __init__(self, index: DocumentIndex, tokenizer=None):
        self.index = index
        self.tokenizer = tokenizer
        self.unreadable = 0

    def _text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        if not text.strip():
            return _empty()
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = np.asarray(ids + [self.tokenizer.eos_token_id], dtype=np.int64)
        return ids, np.ones(len(ids), dtype=bool)

    def _jsonl_line(self, path: Path, offset: int) -> tuple[np.ndarray, np.ndarray]:
        with open(path, "rb") as f:
            f.seek(offset)
            record = json.loads(f.readline())
        if "messages" in record:
            ids, mask = tokenize_chat(self.tokenizer, record["messages"])
            return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
        if "output_token_ids" in record:
            # `vllm-longspec distill` output: the target's own continuation of a
            # prompt; loss on the continuation, the prompt is context.
            prompt, output = record["prompt_token_ids"], record["output_token_ids"]
            ids = np.asarray(prompt + output, dtype=np.int64)
            mask = np.zeros(len(ids), dtype=bool)
            mask[len(prompt):] = True
            return ids, mask
        return self._text(record.get("text") or "")

    def read(self, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        file_number, item = int(ref[0]), int(ref[1])
        source, path = self.index.files[file_number]
        if source.type == "tokens":
            tokens = _open_token_file(path)[item * TOKEN_PIECE:(item + 1) * TOKEN_PIECE]
            ids = np.asarray(tokens, dtype=np.int64)
            return ids, np.ones(len(ids), dtype=bool)
        try:
            if source.type == "text":
                return self._text(path.read_text(encoding="utf-8", errors="replace"))
            return self._jsonl_line(path, item)
        except (OSError, json.JSONDecodeError, ChatTemplateError) as err:
            self.unreadable += 1
            log.warning("skipping a document of %s: %s", path, err)
            return _empty()


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)


def needs_tokenizer(sources: tuple[SourceConfig, ...]) -> bool:
    return any(source.type != "tokens" for source in sources)
