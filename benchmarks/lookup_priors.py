"""Context lookup's acceptance by match length, on the target's own answers.

    python -m benchmarks.lookup_priors [--data ~/.cache/vllm-longspec/data/distill-v2.jsonl]
        [--records N] [--k 4] [--out benchmarks/results/lookup_priors]

Each record of a ``vllm-longspec distill`` file is a prompt and the target's
greedy answer to it (bfloat16), from sources the benchmark suite does not use.
Walking an answer as a chain-mode round would (lookup only, K tokens): at each
round start the lookup proposes up to K tokens from the prompt and the answer
so far; the round accepts the proposal's longest prefix that the answer
continues with, then takes the target's own next token, and the next round
starts after it. A position without a match takes one token (the draft would
have proposed there).

For each match-length class of the policy (``speculation.policy.
LOOKUP_MATCH_CLASSES``) the table gives the conditional acceptance of chain
position i (accepted at i / tried at i, tried = every earlier position
accepted): the policy's priors for that class come from it (position 1, and
the later positions). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vllm_longspec.speculation.lookup import TokenIndex
from vllm_longspec.speculation.policy import LOOKUP_MATCH_CLASSES, lookup_match_class

DATA = Path("~/.cache/vllm-longspec/data/distill-v2.jsonl").expanduser()


def walk_answer(prompt: list[int], answer: list[int], k: int,
                tried: np.ndarray, accepted: np.ndarray) -> int:
    """Add one answer's rounds to tried/accepted [classes, k]; returns its rounds."""
    index = TokenIndex(prompt)
    start = rounds = 0
    while start < len(answer):
        proposal = index.propose(k)
        taken = 1
        if proposal.found:
            truth = answer[start:start + len(proposal.tokens)]
            hits = 0
            while hits < len(truth) and proposal.tokens[hits] == truth[hits]:
                hits += 1
            row = lookup_match_class(proposal.match_len)
            tried[row, :min(hits + 1, len(truth))] += 1
            accepted[row, :hits] += 1
            taken = hits + 1
            rounds += 1
        index.extend(answer[start:start + taken])
        start += taken
    return rounds


def markdown(result: dict) -> str:
    k = result["k"]
    lines = ["# Context lookup's acceptance by match length", "",
             f"Command: `{result['command']}`", "",
             f"{result['records']} records of `{result['data']}` (prompts and the "
             f"target's greedy answers, {result['answer_tokens']:,} answer tokens, "
             f"{result['rounds']:,} lookup rounds). Position i: accepted at i / tried at "
             "i (every earlier position accepted): the policy's priors for the class "
             "(`LOOKUP_PRIORS`: position 1, and the later positions).", "",
             "| match length | rounds | " + " | ".join(f"pos {i + 1}" for i in range(k))
             + " | accepted per round |", "|---" * (k + 3) + "|"]
    for row in result["classes"]:
        rates = " | ".join(f"{r:.3f}" for r in row["rates"])
        lines.append(f"| {row['label']} | {row['rounds']:,} | {rates} | "
                     f"{row['accepted_per_round']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--records", type=int, default=None, help="default: all")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lookup_priors"))
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"no distill data at {args.data}: make it with scripts/distill_data.sh")
    classes = len(LOOKUP_MATCH_CLASSES)
    tried, accepted = np.zeros((classes, args.k)), np.zeros((classes, args.k))
    records = answer_tokens = rounds = 0
    with args.data.open() as f:
        for line in tqdm(islice(f, args.records), total=args.records, unit="record"):
            if not line.strip():
                continue
            record = json.loads(line)
            rounds += walk_answer(record["prompt_token_ids"], record["output_token_ids"],
                                  args.k, tried, accepted)
            records += 1
            answer_tokens += len(record["output_token_ids"])
    bounds = [*LOOKUP_MATCH_CLASSES[1:], None]
    arguments = sys.argv[1:] if argv is None else argv
    result = {"command": " ".join(["python -m benchmarks.lookup_priors", *arguments]),
              "data": str(args.data), "records": records, "answer_tokens": answer_tokens,
              "rounds": rounds, "k": args.k, "classes": []}
    for row, (low, high) in enumerate(zip(LOOKUP_MATCH_CLASSES, bounds, strict=True)):
        if low == 0:
            continue  # "match length unknown": never measured here
        label = str(low) if high == low + 1 else f">= {low}" if high is None \
            else f"{low}-{high - 1}"
        rates = (accepted[row] / np.maximum(tried[row], 1)).tolist()
        result["classes"].append({
            "label": label, "min_match": low, "rounds": int(tried[row, 0]),
            "tried": tried[row].tolist(), "accepted": accepted[row].tolist(),
            "rates": rates,
            "accepted_per_round": float(accepted[row].sum() / max(tried[row, 0], 1))})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
