"""Training data: exclusions by construction, seeded order, packing, resume, chat masks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from vllm_longspec.train import sources as sources_module
from vllm_longspec.train.config import SourceConfig
from vllm_longspec.train.data import PackedStream
from vllm_longspec.train.exclusions import ExclusionSet
from vllm_longspec.train.sources import DocumentReader, index_documents


class CharTokenizer:
    """One token per character (ord % 250 + 3), EOS = 2."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 250 + 3 for c in text]}


def _tree(tmp_path):
    for name in ("a.py", "b.py", "sub/c.py", "sub/deeper/d.py", "e.txt"):
        path = tmp_path / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {name}\n" + "x = 1\n" * 20)
    return tmp_path / "src"


def test_excluded_files_and_directories_are_never_indexed(tmp_path, monkeypatch):
    src = _tree(tmp_path)
    os.symlink(src / "a.py", tmp_path / "alias.py")
    list_file = tmp_path / "sources.txt"
    # a symlink to a.py, a directory, comments and blanks
    list_file.write_text(f"# benchmark inputs\n{tmp_path / 'alias.py'}\n\nsrc/sub\n")
    monkeypatch.chdir(tmp_path)  # relative entries are relative to the cwd
    exclusions = ExclusionSet.from_config([str(src / "e.txt")], str(list_file))
    sources = (SourceConfig("text", (f"{src}/**/*.py", f"{src}/*.txt")),)
    index = index_documents(sources, exclusions)
    assert sorted(path.name for _, path in index.files) == ["b.py"]
    assert sorted(p.name for p in exclusions.skipped) == ["a.py", "c.py", "d.py", "e.txt"]


def test_missing_exclusion_list_excludes_nothing(tmp_path):
    src = _tree(tmp_path)
    exclusions = ExclusionSet.from_config([], str(tmp_path / "no-such-file.txt"))
    index = index_documents((SourceConfig("text", (f"{src}/**/*.py",)),), exclusions)
    assert len(index) == 4 and not exclusions.skipped


def test_source_exclude_globs_and_empty_sources(tmp_path):
    src = _tree(tmp_path)
    sources = (SourceConfig("text", (f"{src}/**/*.py",), exclude=("*/sub/*",)),)
    index = index_documents(sources, ExclusionSet([]))
    assert sorted(path.name for _, path in index.files) == ["a.py", "b.py"]
    with pytest.raises(ValueError, match="no training documents"):
        index_documents((SourceConfig("text", (f"{src}/*.none",)),), ExclusionSet([]))


def _token_stream(tmp_path, seq_len=100, seed=0):
    """Two token files of 500 tokens (0..499), read in pieces of 64."""
    tokens = np.arange(500, dtype=np.uint32)
    np.save(tmp_path / "tokens.npy", tokens)
    tokens.tofile(tmp_path / "tokens.bin")
    sources = (SourceConfig("tokens", (str(tmp_path / "tokens.npy"),
                                       str(tmp_path / "tokens.bin"))),)
    reader = DocumentReader(index_documents(sources, ExclusionSet([])))
    return PackedStream(reader, seq_len, seed=seed, stage=0), tokens


@pytest.fixture(autouse=True)
def small_token_pieces(monkeypatch):
    monkeypatch.setattr(sources_module, "TOKEN_PIECE", 64)


def test_packing_covers_every_token_once_per_epoch(tmp_path):
    stream, tokens = _token_stream(tmp_path, seq_len=100)
    assert len(stream.reader.index) == 2 * 8  # ceil(500 / 64) pieces per file
    ids, mask = stream.next_batch(10)  # exactly one epoch: 1000 tokens
    assert ids.shape == (10, 100) and mask.all()
    flat = ids.flatten().numpy()
    assert np.array_equal(np.sort(flat), np.sort(np.concatenate([tokens, tokens])))
    # pieces are packed whole and in order: runs of +1 break only at piece edges
    breaks = np.flatnonzero(np.diff(flat) != 1) + 1
    pieces = np.split(flat, breaks)
    assert all(piece[0] % 64 == 0 for piece in pieces)
    assert stream.state_dict() == {"epoch": 1, "cursor": 0, "offset": 0}
    assert not torch.equal(stream.next_batch(10)[0], ids)  # a new permutation


def test_order_is_seeded_and_resume_continues_exactly(tmp_path):
    stream, _ = _token_stream(tmp_path, seq_len=30)
    same, _ = _token_stream(tmp_path, seq_len=30)
    other, _ = _token_stream(tmp_path, seq_len=30, seed=1)
    first = [stream.next_batch(3)[0] for _ in range(4)]
    assert all(torch.equal(a, same.next_batch(3)[0]) for a in first)
    assert not torch.equal(first[0], other.next_batch(3)[0])
    state = stream.state_dict()
    assert state["offset"] > 0  # stopped inside a document
    expected = [stream.next_batch(3)[0] for _ in range(12)]  # crosses an epoch
    assert stream.state_dict()["epoch"] == 1
    resumed, _ = _token_stream(tmp_path, seq_len=30)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(e, resumed.next_batch(3)[0]) for e in expected)


def test_text_and_jsonl_documents(tmp_path):
    (tmp_path / "doc.txt").write_text("hello")
    (tmp_path / "data.jsonl").write_text(
        json.dumps({"text": "abc"}) + "\n\n" + json.dumps({"text": "de"}) + "\n"
    )
    sources = (SourceConfig("text", (str(tmp_path / "doc.txt"),)),
               SourceConfig("jsonl", (str(tmp_path / "data.jsonl"),)))
    index = index_documents(sources, ExclusionSet([]))
    reader = DocumentReader(index, CharTokenizer())
    documents = [reader.read(ref)[0].tolist() for ref in index.refs]
    tok = CharTokenizer()
    assert documents == [
        tok("hello")["input_ids"] + [2], tok("abc")["input_ids"] + [2],
        tok("de")["input_ids"] + [2],
    ]


def _smollm2_tokenizer():
    from vllm_longspec.assets import default_target_path

    path = default_target_path()
    if not (path / "tokenizer.json").is_file():
        pytest.skip("the default target (SmolLM2) is not prepared on this machine")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_chat_loss_mask_covers_assistant_tokens_only(tmp_path):
    tokenizer = _smollm2_tokenizer()
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course."},
    ]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    index = index_documents((SourceConfig("jsonl", (str(tmp_path / "chat.jsonl"),)),),
                            ExclusionSet([]))
    ids, mask = DocumentReader(index, tokenizer).read(index.refs[0])
    trained = tokenizer.decode(ids[mask])
    assert trained == "It is 4.<|im_end|>\n6, of course.<|im_end|>\n"
    assert "What is 2+2?" in tokenizer.decode(ids[~mask])


def test_distill_records_train_on_the_output_only(tmp_path):
    import json as _json

    from vllm_longspec.train.config import SourceConfig
    from vllm_longspec.train.exclusions import ExclusionSet
    from vllm_longspec.train.sources import DocumentReader, index_documents

    path = tmp_path / "distill.jsonl"
    path.write_text(_json.dumps({"prompt_token_ids": [5, 6, 7],
                                 "output_token_ids": [8, 9]}) + "\n")
    index = index_documents((SourceConfig(type="jsonl", paths=(str(path),)),),
                            ExclusionSet([]))
    ids, mask = DocumentReader(index).read(index.refs[0])
    assert ids.tolist() == [5, 6, 7, 8, 9]
    assert mask.tolist() == [False, False, False, True, True]
