"""Long prompts for the stress run: token ids cut from reserved source files.

The files are the Python modules of the standard-library packages reserved for
benchmarks in ``benchmarks/sources.txt`` (training never reads them). Prompt
``i`` starts with file ``i`` (in sorted order) and goes on through the next
files until it has the asked number of tokens, so two prompts with different
indices share no first block (no prefix-cache hit between them) while the same
index always gives the same tokens.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.longctx.documents import CodeFile, is_reserved, resolve

PACKAGES = ("asyncio", "email", "http", "logging", "json", "xml", "concurrent",
            "importlib", "unittest", "multiprocessing", "sqlite3", "urllib")


def reserved_files() -> list[str]:
    """``{stdlib}/...`` paths of the reserved packages' modules, sorted."""
    stdlib = resolve("{stdlib}")
    paths = sorted(str(p.relative_to(stdlib)) for package in PACKAGES
                   for p in (stdlib / package).rglob("*.py") if p.stat().st_size > 2000)
    named = ["{stdlib}/" + p for p in paths]
    assert named and all(is_reserved(p) for p in named), "packages not in sources.txt"
    return named


class PromptPool:
    """Prompt ``i`` of ``length`` tokens: always the same ids for the same (i, length)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.files = reserved_files()
        self._ids: dict[str, list[int]] = {}

    def _file_ids(self, path: str) -> list[int]:
        if path not in self._ids:
            self._ids[path] = self.tokenizer(CodeFile(path).render() + "\n\n",
                                             add_special_tokens=False)["input_ids"]
        return self._ids[path]

    def prompt(self, index: int, length: int) -> list[int]:
        """Past ``len(files)`` prompts, prompt ``i`` starts ``i // len(files)``
        x 97 tokens into its first file (still a distinct first block)."""
        count = len(self.files)
        skip = (index // count) * 97
        ids: list[int] = []
        for step in range(count):
            file_ids = self._file_ids(self.files[(index + step) % count])
            ids += file_ids[skip:] if step == 0 else file_ids
            if len(ids) >= length:
                return ids[:length]
        raise ValueError(f"the reserved files hold fewer than {length} tokens")


def tokenizer_for(model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)
