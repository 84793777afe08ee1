"""Choose a draft vocabulary: the target tokens a draft may propose.

    vllm-longspec draft-vocab DRAFT_DIR --jsonl distill.jsonl [--text GLOB ...] --size 8192

A draft step's biggest cost is its LM head (for SmolLM2: 49152 x 576 weights
read per step). Restricting what the draft may propose to the N tokens the
target emits most often makes that read V/N times smaller; a token outside the
set can still be emitted (verification and the bonus token are the target's),
it just cannot be drafted. The tool counts tokens in what the target says
(``output_token_ids`` of self-distillation records: exactly what the draft has
to predict) and optionally in text files, keeps the N most frequent plus the
special tokens, prints the coverage, and writes the ids into the draft
directory (tensor ``draft_vocab`` in model.safetensors,
``longspec.draft_vocab_size`` in config.json).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from vllm_longspec.model.checkpoint import DRAFT_VOCAB
from vllm_longspec.train.exclusions import ExclusionSet


def count_tokens(token_lists: Iterable[Iterable[int]], vocab_size: int) -> np.ndarray:
    """[vocab_size] int64 occurrence counts."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for tokens in token_lists:
        ids = np.asarray(list(tokens), dtype=np.int64)
        if ids.size:
            counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


def choose_draft_vocab(counts: np.ndarray, size: int,
                       always: Iterable[int] = ()) -> np.ndarray:
    """The ``size`` most frequent ids (ties: lower id), ``always`` included; sorted."""
    always = sorted(set(int(i) for i in always))
    if not 0 < size <= counts.size or len(always) > size:
        raise ValueError(f"size must be in [{len(always)}, {counts.size}], got {size}.")
    order = np.lexsort((np.arange(counts.size), -counts))  # by count desc, id asc
    chosen = set(always)
    for token in order:
        if len(chosen) == size:
            break
        chosen.add(int(token))
    return np.array(sorted(chosen), dtype=np.int64)


def coverage(counts: np.ndarray, ids: np.ndarray) -> float:
    """Fraction of the counted tokens that the vocabulary contains."""
    total = counts.sum()
    return float(counts[ids].sum() / total) if total else 0.0


def write_draft_vocab(draft_dir: str | Path, ids: np.ndarray) -> None:
    """Store ``ids`` in a draft directory (replacing any previous draft vocabulary)."""
    import torch
    from safetensors.torch import load_file, save_file

    directory = Path(draft_dir)
    weights_file = directory / "model.safetensors"
    tensors = load_file(str(weights_file))
    tensors[DRAFT_VOCAB] = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config.setdefault("longspec", {})["draft_vocab_size"] = int(ids.size)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def _jsonl_outputs(paths: list[str]) -> Iterable[list[int]]:
    for path in paths:
        with open(path) as f:
            for line in f:
                yield json.loads(line)["output_token_ids"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-longspec draft-vocab",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("draft", help="draft directory to write the vocabulary into")
    parser.add_argument("--jsonl", nargs="*", default=[],
                        help="self-distillation records (their output_token_ids count)")
    parser.add_argument("--text", nargs="*", default=[], help="text file globs to count")
    parser.add_argument("--exclude-file", default="benchmarks/sources.txt",
                        help="files never read (the benchmark documents)")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--target", help="target model directory (default: SmolLM2)")
    args = parser.parse_args(argv)
    if not args.jsonl and not args.text:
        parser.error("give --jsonl and/or --text to count tokens in.")

    from transformers import AutoTokenizer

    from vllm_longspec.assets import default_target_path

    target = args.target or str(default_target_path())
    tokenizer = AutoTokenizer.from_pretrained(target)
    vocab_size = json.loads((Path(target) / "config.json").read_text())["vocab_size"]
    exclusions = ExclusionSet.from_config([], args.exclude_file)
    files = sorted({Path(f) for pattern in args.text
                    for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                    if Path(f).is_file() and exclusions.allows(f)})
    texts = (tokenizer(f.read_text(errors="replace"))["input_ids"] for f in files)
    counts = count_tokens(_jsonl_outputs(args.jsonl), vocab_size)
    counts += count_tokens(texts, vocab_size)
    ids = choose_draft_vocab(counts, args.size, tokenizer.all_special_ids)
    write_draft_vocab(args.draft, ids)
    print(f"draft vocabulary: {ids.size} of {vocab_size} tokens, covering "
          f"{coverage(counts, ids):.2%} of {counts.sum()} counted tokens; "
          f"written to {args.draft}")
    return 0
