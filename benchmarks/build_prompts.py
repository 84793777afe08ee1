"""Build the long-context prompt set ``benchmarks/prompts/longctx-v2.jsonl``.

    python -m benchmarks.build_prompts           # (re)write the prompt file
    python -m benchmarks.build_prompts --check   # rebuild in memory, compare

Every prompt is cut from documents reserved in ``benchmarks/sources.txt``
(training never reads them) and encoded for the default target,
SmolLM2-135M-Instruct, with its chat template where the prompt is a chat
request. Four tasks in the spirit of LongBench's generation tasks, each at
three context lengths (1k, 4k, 7k target tokens) with four prompts per length
(the first two of each are ``longctx-v1``'s, token for token; that set stays
for the results measured on it):

- ``code_completion``: several files of one reserved standard-library package,
  concatenated and cut mid-file; continued either as raw text (like LongBench's
  LCC / RepoBench-P) or as a chat request to continue the last file;
- ``doc_qa``: a question about long documentation (docstrings of reserved
  modules, the email package's architecture notes, CPython's README, the
  Debian Python policy) whose answer is in the kept part of the document;
- ``summarisation``: a summary of one or several such documents;
- ``long_generation``: a detailed tutorial about a long piece of code.

The documents are concatenated in the order given and cut at a line boundary
so that the whole prompt falls in its bucket (``prompt_file.bucket_range``).
The set is versioned: changing a prompt means a new set name, so that results
of different sets are never compared. ``--check`` (and the unit tests) rebuild
it and require identical records, given the same standard library and
tokenizer (each source's sha256 is recorded to tell).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.longctx.documents import (
    CodeFile,
    Docstrings,
    Document,
    ProseFile,
    is_reserved,
    source_sha256,
)
from benchmarks.longctx.prompt_file import (
    BUCKET_TOKENS,
    MANIFEST_FILE,
    PROMPT_FILE,
    PROMPT_SET,
    PromptRecord,
    Source,
    bucket_range,
    file_sha256,
    text_sha256,
    write_prompts,
)

CODE_CHAT = ("The files above are from Python's `{package}` package; the last one "
             "is cut off. Continue the code of the last file from where it stops. "
             "Write only code.")
QA = "Answer the question using the documentation above.\n\nQuestion: {question}"
SUMMARY = ("Write a summary of the documentation above in two or three paragraphs: "
           "what it covers, its main concepts, and how they fit together.")
TUTORIAL = ("Write a detailed tutorial about the code above for a developer who "
            "has never seen it. Explain step by step what each part does and how "
            "the parts work together, with short usage examples.")

MAX_TOKENS = {"code_completion": 128, "doc_qa": 96, "summarisation": 160,
              "long_generation": 256}


@dataclass(frozen=True)
class PromptSpec:
    """One prompt: documents in order, and the request after them (None: the
    prompt is raw text for plain continuation). ``evidence`` is a phrase that
    the kept context must contain, so a question stays answerable."""

    id: str
    task: str
    bucket: str
    documents: tuple[Document, ...]
    instruction: str | None
    evidence: str | None = None


def _stdlib(kind, *names: str) -> tuple[Document, ...]:
    return tuple(kind("{stdlib}/" + name) for name in names)


POLICY = ProseFile("/usr/share/doc/python3/python-policy.txt.gz")
CPYTHON_README = ProseFile("/usr/share/doc/python3.11/README.rst.gz")
EMAIL_ARCHITECTURE = ProseFile("{stdlib}/email/architecture.rst")
DEBIAN_READMES = tuple(ProseFile(f"/usr/share/doc/python3.11/{name}") for name in (
    "README.Debian", "README.venv", "README.maintainers"))

SPECS: tuple[PromptSpec, ...] = (
    # code_completion: one raw continuation and one chat request per length
    PromptSpec("code-1k-json", "code_completion", "1k",
               _stdlib(CodeFile, "json/scanner.py", "json/decoder.py"), None),
    PromptSpec("code-1k-email-mime", "code_completion", "1k",
               _stdlib(CodeFile, "email/mime/base.py", "email/mime/nonmultipart.py",
                       "email/mime/multipart.py", "email/mime/text.py"),
               CODE_CHAT.format(package="email.mime")),
    PromptSpec("code-4k-concurrent", "code_completion", "4k",
               _stdlib(CodeFile, "concurrent/futures/__init__.py",
                       "concurrent/futures/thread.py", "concurrent/futures/_base.py"),
               None),
    PromptSpec("code-4k-urllib", "code_completion", "4k",
               _stdlib(CodeFile, "urllib/error.py", "urllib/response.py",
                       "urllib/robotparser.py", "urllib/parse.py"),
               CODE_CHAT.format(package="urllib")),
    PromptSpec("code-7k-asyncio", "code_completion", "7k",
               _stdlib(CodeFile, "asyncio/exceptions.py", "asyncio/coroutines.py",
                       "asyncio/mixins.py", "asyncio/futures.py", "asyncio/locks.py",
                       "asyncio/queues.py"),
               None),
    PromptSpec("code-7k-multiprocessing", "code_completion", "7k",
               _stdlib(CodeFile, "multiprocessing/process.py",
                       "multiprocessing/util.py", "multiprocessing/queues.py"),
               CODE_CHAT.format(package="multiprocessing")),
    # doc_qa: the evidence lies in the second half of the kept context
    PromptSpec("qa-1k-email-architecture", "doc_qa", "1k", (EMAIL_ARCHITECTURE,),
               QA.format(question="What are the stages of the general lifecycle of "
                         "a message, and what happens in each of them?"),
               evidence="Finalization"),
    PromptSpec("qa-1k-cpython-readme", "doc_qa", "1k", (CPYTHON_README,),
               QA.format(question="How do you get an optimized build of Python, "
                         "and what does that option enable?"),
               evidence="--enable-optimizations"),
    PromptSpec("qa-4k-logging", "doc_qa", "4k",
               _stdlib(Docstrings, "logging/__init__.py"),
               QA.format(question="What does Handler.handleError do, and what "
                         "happens to exceptions when raiseExceptions is false?"),
               evidence="If raiseExceptions is false"),
    PromptSpec("qa-4k-debian-policy", "doc_qa", "4k", (POLICY,),
               QA.format(question="Which interpreter path should Python 3 scripts "
                         "specify, and why should maintainers not use /usr/bin/env "
                         "instead?"),
               evidence="bypasses Debian"),
    PromptSpec("qa-7k-unittest", "doc_qa", "7k",
               _stdlib(Docstrings, "unittest/case.py", "unittest/mock.py"),
               QA.format(question="When an AsyncMock's side_effect is an iterable, "
                         "what does calling the mock return, and what happens "
                         "once the iterable is exhausted?"),
               evidence="is raised immediately"),
    PromptSpec("qa-7k-http", "doc_qa", "7k",
               _stdlib(Docstrings, "http/cookiejar.py", "http/cookies.py",
                       "http/client.py"),
               QA.format(question="What does SimpleCookie do with a value such as "
                         "the number 7 set dictionary-style, and how do you read "
                         "the value back?"),
               evidence="invokes the str() builtin"),
    # summarisation
    PromptSpec("sum-1k-json", "summarisation", "1k",
               _stdlib(Docstrings, "json/__init__.py"), SUMMARY),
    PromptSpec("sum-1k-debian-readmes", "summarisation", "1k", DEBIAN_READMES,
               SUMMARY),
    PromptSpec("sum-4k-urllib", "summarisation", "4k",
               _stdlib(Docstrings, "urllib/parse.py", "urllib/request.py"), SUMMARY),
    PromptSpec("sum-4k-email", "summarisation", "4k",
               (*_stdlib(Docstrings, "email/message.py"), EMAIL_ARCHITECTURE),
               SUMMARY),
    PromptSpec("sum-7k-debian-policy", "summarisation", "7k", (POLICY,), SUMMARY),
    PromptSpec("sum-7k-logging", "summarisation", "7k",
               _stdlib(Docstrings, "logging/__init__.py", "logging/handlers.py"),
               SUMMARY),
    # long_generation
    PromptSpec("tutorial-1k-json-encoder", "long_generation", "1k",
               _stdlib(CodeFile, "json/encoder.py"), TUTORIAL),
    PromptSpec("tutorial-1k-futures-thread", "long_generation", "1k",
               _stdlib(CodeFile, "concurrent/futures/thread.py"), TUTORIAL),
    PromptSpec("tutorial-4k-http-cookies", "long_generation", "4k",
               _stdlib(CodeFile, "http/cookies.py"), TUTORIAL),
    PromptSpec("tutorial-4k-email-feedparser", "long_generation", "4k",
               _stdlib(CodeFile, "email/feedparser.py"), TUTORIAL),
    PromptSpec("tutorial-7k-logging-config", "long_generation", "7k",
               _stdlib(CodeFile, "logging/config.py"), TUTORIAL),
    PromptSpec("tutorial-7k-importlib-bootstrap", "long_generation", "7k",
               _stdlib(CodeFile, "importlib/_bootstrap.py"), TUTORIAL),
    # longctx-v2: two more prompts per (task, length), from other reserved files
    PromptSpec("code-1k-xml-sax-handler", "code_completion", "1k",
               _stdlib(CodeFile, "xml/sax/handler.py"), None),
    PromptSpec("code-1k-unittest", "code_completion", "1k",
               _stdlib(CodeFile, "unittest/util.py", "unittest/result.py"),
               CODE_CHAT.format(package="unittest")),
    PromptSpec("code-4k-xml-etree", "code_completion", "4k",
               _stdlib(CodeFile, "xml/etree/ElementPath.py", "xml/etree/ElementTree.py"),
               None),
    PromptSpec("code-4k-http-server", "code_completion", "4k",
               _stdlib(CodeFile, "http/server.py"), CODE_CHAT.format(package="http")),
    PromptSpec("code-7k-email-headers", "code_completion", "7k",
               _stdlib(CodeFile, "email/_policybase.py", "email/headerregistry.py",
                       "email/_header_value_parser.py"),
               None),
    PromptSpec("code-7k-importlib", "code_completion", "7k",
               _stdlib(CodeFile, "importlib/_bootstrap_external.py"),
               CODE_CHAT.format(package="importlib")),
    PromptSpec("qa-1k-futures", "doc_qa", "1k",
               _stdlib(Docstrings, "concurrent/futures/_base.py"),
               QA.format(question="When is a callable given to Future.add_done_callback "
                         "called, by which thread, and in what order?"),
               evidence="in the order that they were added"),
    PromptSpec("qa-1k-json-decoder", "doc_qa", "1k",
               _stdlib(Docstrings, "json/decoder.py", "json/encoder.py"),
               QA.format(question="If a JSONDecoder gets both object_hook and "
                         "object_pairs_hook, which one is used, and what is "
                         "object_pairs_hook called with?"),
               evidence="the ``object_pairs_hook`` takes"),
    PromptSpec("qa-4k-elementtree", "doc_qa", "4k",
               _stdlib(Docstrings, "xml/etree/ElementTree.py"),
               QA.format(question="What does register_namespace do with an existing "
                         "mapping for the prefix or the URI, and when does it raise "
                         "an error?"),
               evidence="ValueError is raised if prefix is reserved"),
    PromptSpec("qa-4k-email-headers", "doc_qa", "4k",
               _stdlib(Docstrings, "email/_policybase.py", "email/headerregistry.py",
                       "email/policy.py"),
               QA.format(question="How does BaseHeader.fold encode non-ASCII characters "
                         "and surrogateescaped bytes, and what does the string it "
                         "returns include?"),
               evidence="charset utf-8"),
    PromptSpec("qa-7k-asyncio", "doc_qa", "7k",
               _stdlib(Docstrings, "asyncio/events.py", "asyncio/base_events.py",
                       "asyncio/tasks.py", "asyncio/streams.py"),
               QA.format(question="Does asyncio.wait raise TimeoutError when its timeout "
                         "occurs, and what happens to the futures that are not done?"),
               evidence="This does not raise TimeoutError"),
    PromptSpec("qa-7k-news", "doc_qa", "7k",
               (ProseFile("/usr/share/doc/python3.11/NEWS.gz"),),
               QA.format(question="Which change fixed how sys._base_executable is "
                         "calculated inside a POSIX virtual environment, and which "
                         "names does the calculation fall back to?"),
               evidence="gh-issue-99204"),
    PromptSpec("sum-1k-minidom", "summarisation", "1k",
               _stdlib(Docstrings, "xml/dom/minidom.py", "xml/dom/expatbuilder.py"),
               SUMMARY),
    PromptSpec("sum-1k-futures-process", "summarisation", "1k",
               _stdlib(Docstrings, "concurrent/futures/process.py",
                       "concurrent/futures/_base.py"),
               SUMMARY),
    PromptSpec("sum-4k-asyncio", "summarisation", "4k",
               _stdlib(Docstrings, "asyncio/locks.py", "asyncio/queues.py",
                       "asyncio/streams.py", "asyncio/subprocess.py", "asyncio/events.py"),
               SUMMARY),
    PromptSpec("sum-4k-importlib", "summarisation", "4k",
               _stdlib(Docstrings, "importlib/_bootstrap_external.py",
                       "importlib/metadata/__init__.py", "importlib/resources/_common.py"),
               SUMMARY),
    PromptSpec("sum-7k-email-parser", "summarisation", "7k",
               _stdlib(Docstrings, "email/_header_value_parser.py", "email/message.py",
                       "email/utils.py"),
               SUMMARY),
    PromptSpec("sum-7k-history", "summarisation", "7k",
               (ProseFile("/usr/share/doc/python3.11/HISTORY.gz"),), SUMMARY),
    PromptSpec("tutorial-1k-xmlreader", "long_generation", "1k",
               _stdlib(CodeFile, "xml/sax/xmlreader.py"), TUTORIAL),
    PromptSpec("tutorial-1k-asyncio-queues", "long_generation", "1k",
               _stdlib(CodeFile, "asyncio/queues.py"), TUTORIAL),
    PromptSpec("tutorial-4k-pool", "long_generation", "4k",
               _stdlib(CodeFile, "multiprocessing/pool.py"), TUTORIAL),
    PromptSpec("tutorial-4k-asyncio-streams", "long_generation", "4k",
               _stdlib(CodeFile, "asyncio/streams.py"), TUTORIAL),
    PromptSpec("tutorial-7k-urllib-request", "long_generation", "7k",
               _stdlib(CodeFile, "urllib/request.py"), TUTORIAL),
    PromptSpec("tutorial-7k-base-events", "long_generation", "7k",
               _stdlib(CodeFile, "asyncio/base_events.py"), TUTORIAL),
)


class PromptEncoder:
    """Prompt text and target token ids for a context and an instruction."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, context: str, instruction: str | None) -> str:
        if instruction is None:
            return context
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{context}\n\n{instruction}"}],
            add_generation_prompt=True, tokenize=False)

    def token_ids(self, text: str) -> list[int]:
        # The chat template already holds its special tokens; raw text gets none.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def build_record(spec: PromptSpec, encoder: PromptEncoder) -> PromptRecord:
    """Cut the spec's documents at the last line that keeps the prompt in its bucket."""
    for document in spec.documents:
        if not is_reserved(document.path):
            raise ValueError(f"{spec.id}: {document.path} is not listed in "
                             "benchmarks/sources.txt")
    rendered = [document.render() for document in spec.documents]
    context = "\n\n".join(rendered)
    lines = context.splitlines(keepends=True)
    allowed = bucket_range(spec.bucket)

    def num_tokens(num_lines: int) -> int:
        return len(encoder.token_ids(encoder.text("".join(lines[:num_lines]),
                                                  spec.instruction)))

    if num_tokens(len(lines)) < allowed.stop:
        raise ValueError(f"{spec.id}: its documents are too short for bucket "
                         f"{spec.bucket}")
    low, high = 0, len(lines)  # num_tokens(low) fits, num_tokens(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if num_tokens(middle) < allowed.stop else (low, middle)
    kept = "".join(lines[:low])
    text = encoder.text(kept, spec.instruction)
    token_ids = encoder.token_ids(text)
    if len(token_ids) not in allowed:
        raise ValueError(f"{spec.id}: {len(token_ids)} tokens after cutting at a line "
                         f"boundary, outside bucket {spec.bucket} ({allowed})")
    if spec.evidence is not None and spec.evidence not in kept:
        raise ValueError(f"{spec.id}: the kept context lost the evidence "
                         f"{spec.evidence!r}")
    return PromptRecord(
        id=spec.id, prompt_set=PROMPT_SET, task=spec.task, bucket=spec.bucket,
        format="raw" if spec.instruction is None else "chat",
        num_tokens=len(token_ids), max_tokens=MAX_TOKENS[spec.task],
        instruction=spec.instruction,
        sources=_used_sources(spec.documents, rendered, len(kept)),
        text_sha256=text_sha256(text), prompt_token_ids=tuple(token_ids))


def _used_sources(documents: Sequence[Document], rendered: Sequence[str],
                  kept_chars: int) -> tuple[Source, ...]:
    """The documents that start inside the kept context; the last may be cut."""
    sources, start = [], 0
    for document, text in zip(documents, rendered, strict=True):
        if start >= kept_chars:
            break
        end = start + len(text)
        sources.append(Source(path=document.path, kind=document.kind,
                              sha256=source_sha256(document.path),
                              complete=end <= kept_chars))
        start = end + 2  # the blank line between documents
    return tuple(sources)


def build_prompt_set(tokenizer) -> list[PromptRecord]:
    encoder = PromptEncoder(tokenizer)
    return [build_record(spec, encoder) for spec in SPECS]


def manifest(records: Sequence[PromptRecord], tokenizer_dir: Path,
             prompt_file: Path) -> dict:
    return {
        "prompt_set": PROMPT_SET,
        "num_prompts": len(records),
        "jsonl_sha256": file_sha256(prompt_file),
        "tokenizer": {"name": tokenizer_dir.name,
                      "tokenizer_json_sha256": file_sha256(
                          tokenizer_dir / "tokenizer.json")},
        "built_with_python": platform.python_version(),
        "buckets": {name: [r.start, r.stop - 1] for name, r in
                    ((b, bucket_range(b)) for b in BUCKET_TOKENS)},
        "max_tokens": MAX_TOKENS,
    }


def load_default_tokenizer():
    from transformers import AutoTokenizer

    from vllm_longspec.assets import ensure_default_target

    return AutoTokenizer.from_pretrained(ensure_default_target())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="rebuild in memory and compare with the committed file")
    args = parser.parse_args(argv)
    tokenizer = load_default_tokenizer()
    records = build_prompt_set(tokenizer)
    if args.check:
        from benchmarks.longctx.prompt_file import read_prompts

        committed = read_prompts(PROMPT_FILE)
        differing = [new.id for new, old in zip(records, committed, strict=False)
                     if new != old]
        if differing or len(records) != len(committed):
            sys.exit(f"{PROMPT_FILE} differs from a rebuild: {differing or 'count'}")
        print(f"{PROMPT_FILE}: {len(records)} prompts, identical to a rebuild")
        return
    write_prompts(records, PROMPT_FILE)
    info = manifest(records, Path(tokenizer.name_or_path), PROMPT_FILE)
    MANIFEST_FILE.write_text(json.dumps(info, indent=2) + "\n")
    for record in records:
        print(f"{record.id:34s} {record.task:16s} {record.bucket:3s} "
              f"{record.num_tokens:5d} tokens  max_tokens {record.max_tokens}")
    print(f"wrote {PROMPT_FILE} and {MANIFEST_FILE.name}")


if __name__ == "__main__":
    main()
