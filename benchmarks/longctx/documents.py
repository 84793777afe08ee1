"""The benchmark's documents: files reserved in ``benchmarks/sources.txt``.

Training never reads the files listed there (``vllm_longspec/train/exclusions.py``
reads the same list), so a draft cannot have memorised them. A document is one
such file, rendered as text in one of three ways:

- ``CodeFile``: the file's source under a ``# file: <name>`` line, as in
  repository-level code completion;
- ``Docstrings``: reference documentation built from a module's docstrings
  (module, public classes, functions and methods, with their signatures), the
  prose that the reserved standard-library packages contain;
- ``ProseFile``: a text file as it is (gzip-compressed ones decompressed), e.g.
  the Debian Python policy in ``/usr/share/doc/python3``.

Paths are spelled with ``{stdlib}`` for the running Python's standard library,
as in ``sources.txt``, so that prompt records do not name this machine's paths.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from vllm_longspec.train.exclusions import ExclusionSet

SOURCES_FILE = Path(__file__).resolve().parents[1] / "sources.txt"
STDLIB = "{stdlib}"


def resolve(path: str) -> Path:
    """The file a ``{stdlib}/...`` (or absolute) path names on this machine."""
    return Path(path.replace(STDLIB, sysconfig.get_paths()["stdlib"]))


def is_reserved(path: str) -> bool:
    """Whether ``path`` is listed in, or lies under an entry of, sources.txt."""
    reserved = ExclusionSet.from_config((), str(SOURCES_FILE))
    return not reserved.allows(resolve(path))


def source_sha256(path: str) -> str:
    return hashlib.sha256(resolve(path).read_bytes()).hexdigest()


def display_name(path: str) -> str:
    """``asyncio/events.py`` for stdlib files, the file name for others."""
    if path.startswith(STDLIB + "/"):
        return path[len(STDLIB) + 1:]
    return Path(path).name.removesuffix(".gz")


def _read_text(path: str) -> str:
    data = resolve(path).read_bytes()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8")


@dataclass(frozen=True)
class CodeFile:
    path: str
    kind: ClassVar[str] = "code"

    def render(self) -> str:
        return f"# file: {display_name(self.path)}\n\n{_read_text(self.path)}"


@dataclass(frozen=True)
class Docstrings:
    path: str
    kind: ClassVar[str] = "docstrings"

    def render(self) -> str:
        return render_docstrings(_read_text(self.path), display_name(self.path))


@dataclass(frozen=True)
class ProseFile:
    path: str
    kind: ClassVar[str] = "prose"

    def render(self) -> str:
        return f"Document: {display_name(self.path)}\n\n{_read_text(self.path)}"


Document = CodeFile | Docstrings | ProseFile

_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def render_docstrings(source: str, name: str) -> str:
    """Reference documentation of a module from its docstrings, pydoc-like::

        Documentation of logging/__init__.py
        ====================================

        <module docstring>

        class Logger(Filterer)
            <class docstring>

            Logger.setLevel(self, level)
                <method docstring>

    Public definitions only (no leading underscore, ``__init__`` excepted), in
    source order; functions without a docstring are left out, classes are
    always listed (their methods may be documented).
    """
    tree = ast.parse(source)
    title = f"Documentation of {name}"
    sections = [f"{title}\n{'=' * len(title)}"]
    if module_doc := ast.get_docstring(tree):
        sections.append(module_doc)
    sections += _definition_sections(tree.body, owner="", depth=0)
    return "\n\n".join(sections) + "\n"


def _definition_sections(body: list[ast.stmt], owner: str, depth: int) -> list[str]:
    sections = []
    for node in body:
        if not isinstance(node, _DEFINITIONS) or not _is_public(node.name):
            continue
        indent = "    " * depth
        if isinstance(node, ast.ClassDef):
            bases = ", ".join(ast.unparse(base) for base in node.bases)
            heading = f"class {node.name}({bases})" if bases else f"class {node.name}"
        else:
            heading = f"{owner}{node.name}({ast.unparse(node.args)})"
        doc = ast.get_docstring(node)
        if isinstance(node, ast.ClassDef):
            sections.append(_section(indent, heading, doc))
            sections += _definition_sections(node.body, f"{node.name}.", depth + 1)
        elif doc:
            sections.append(_section(indent, heading, doc))
    return sections


def _section(indent: str, heading: str, doc: str | None) -> str:
    lines = [f"{indent}{heading}"]
    lines += [f"{indent}    {line}".rstrip() for line in (doc or "").splitlines()]
    return "\n".join(lines)


def _is_public(name: str) -> bool:
    return not name.startswith("_") or name == "__init__"
