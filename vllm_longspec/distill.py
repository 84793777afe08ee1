"""Self-distillation data: the target's own answers to prompts built from local files.

    vllm-longspec distill --sources 'DIR/**/*.py' --out data.jsonl [--num-prompts N]

A draft is accepted when it predicts what the target will say, so the best
training text is the target's own output on inputs like the users'. Each prompt
is cut from a local document (a source file, a text document) in one of three
forms, as in the long-context tasks LongSpec targets:

- ``continue``: the first part of the document as raw text; the target continues it;
- ``explain``: a chat request to explain / summarise the document;
- ``question``: a chat request to answer a question about the document.

The target generates with vLLM in batches (sampled at ``--temperature`` with a
per-prompt seed, greedy with 0) and every record is appended to a JSONL file
as ``{"prompt_token_ids": [...], "output_token_ids": [...], "source": path,
"kind": ...}``, the format the trainer reads. Generation resumes: prompts
already in the output file are skipped. Files listed in the exclusion file
(the benchmark documents) are never read.
"""

from __future__ import annotations

import argparse
import glob
import json
import random
from pathlib import Path

from vllm_longspec.train.exclusions import ExclusionSet

KINDS = ("continue", "explain", "question")
# Longer files are cut here before tokenizing (a prompt needs at most ~8k tokens).
MAX_DOCUMENT_CHARS = 200_000
QUESTIONS = (
    "Summarise the document above in a few paragraphs.",
    "Explain what the code above does, step by step.",
    "What are the main ideas of the text above? Answer in detail.",
    "List the functions or sections above and describe each one.",
    "Write a detailed review of the code above, with suggestions.",
)


def collect_sources(patterns: list[str], exclusions) -> list[list[Path]]:
    """One group of files per pattern (sorted, excluded files dropped, empty
    groups left out), so that prompts can be drawn evenly across sources."""
    groups = []
    for pattern in patterns:
        files = sorted({Path(p).resolve() for p in glob.glob(pattern, recursive=True)
                        if Path(p).is_file()})
        files = [f for f in files if exclusions.allows(f)]
        if files:
            groups.append(files)
    return groups


def build_prompts(groups, tokenizer, num_prompts, min_tokens, max_tokens, seed):
    """``num_prompts`` prompts, each from a file of a uniformly drawn group: a
    pattern with 7,000 C headers does not crowd out one with 300 Tcl files.
    Deterministic in ``seed`` (resuming relies on it)."""
    rng = random.Random(seed)
    prompts = []
    attempts = 0
    while len(prompts) < num_prompts and attempts < 20 * num_prompts:
        attempts += 1
        path = rng.choice(rng.choice(groups))
        try:
            text = path.read_text(errors="strict")[:MAX_DOCUMENT_CHARS]
        except (UnicodeDecodeError, OSError):
            continue
        ids = tokenizer(text)["input_ids"]
        if len(ids) < min_tokens:
            continue
        length = rng.randint(min_tokens, min(max_tokens, len(ids)))
        start = rng.randint(0, len(ids) - length)
        document = tokenizer.decode(ids[start:start + length])
        kind = KINDS[len(prompts) % len(KINDS)]
        if kind == "continue":
            prompt_ids = ids[start:start + length]
        else:
            request = rng.choice(QUESTIONS)
            prompt_ids = list(tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{document}\n\n{request}"}],
                add_generation_prompt=True, tokenize=True, return_dict=True,
            )["input_ids"])
        prompts.append({"source": str(path), "kind": kind, "prompt_token_ids": prompt_ids})
    return prompts


def completed_records(out: Path) -> int:
    """Records already in ``out``; a last line cut off mid-write (a run that was
    killed) is removed, so the resumed run writes that record again whole."""
    if not out.exists():
        return 0
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        with out.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[:data.rfind(b"\n") + 1]
    return data.count(b"\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-longspec distill",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="target model directory (default: SmolLM2)")
    parser.add_argument("--sources", nargs="+", required=True, help="glob patterns")
    parser.add_argument("--exclude-file", default="benchmarks/sources.txt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--min-prompt-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-tokens", type=int, default=3000)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from tqdm import tqdm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_longspec.assets import ensure_default_target

    target = args.target or str(ensure_default_target())
    tokenizer = AutoTokenizer.from_pretrained(target)
    exclusions = ExclusionSet.from_config([], args.exclude_file)
    groups = collect_sources(args.sources, exclusions)
    if not groups:
        raise SystemExit(f"no readable source files match {args.sources}")
    prompts = build_prompts(groups, tokenizer, args.num_prompts, args.min_prompt_tokens,
                            args.max_prompt_tokens, args.seed)
    out = Path(args.out)
    done = completed_records(out)
    todo = list(enumerate(prompts))[done:]
    print(f"{sum(map(len, groups))} source files in {len(groups)} groups, "
          f"{len(prompts)} prompts, {done} already done")

    llm = LLM(model=target, dtype=args.dtype, max_model_len=8192, seed=args.seed,
              kv_cache_memory_bytes=4 << 30, max_num_seqs=args.batch_size)
    progress = tqdm(total=len(todo), desc="distilling", unit="prompt")
    with out.open("a") as sink:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            params = [SamplingParams(temperature=args.temperature,
                                     max_tokens=args.max_new_tokens,
                                     seed=args.seed * 1_000_003 + index)
                      for index, _ in batch]
            outputs = llm.generate(
                [TokensPrompt(prompt_token_ids=p["prompt_token_ids"]) for _, p in batch],
                params, use_tqdm=False)
            for (_, prompt), output in zip(batch, outputs, strict=True):
                record = {**prompt, "output_token_ids": list(output.outputs[0].token_ids)}
                sink.write(json.dumps(record) + "\n")
            sink.flush()
            progress.update(len(batch))
    progress.close()
    return 0


if __name__ == "__main__":
    main()
