"""The data card of a self-distillation file: what it holds, by source and kind.

    python -m vllm_longspec.train.data_card ~/.cache/vllm-longspec/data/distill-v2.jsonl

Reads the JSONL that ``vllm-longspec distill`` writes and prints a markdown
table: records, prompt tokens and answer tokens per source family (a family is
a file type and where it lives, e.g. ``.h under /usr/include``) and per
prompt kind, with the totals. A last line that is not complete JSON (a run cut
off while writing) is counted and reported, not read.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import PurePath


def family(source: str) -> str:
    """The file type and where it lives: ``/usr/include/linux/types.h`` ->
    ``.h under /usr/include``; ``.../site-packages/torch/include/c10/x.h`` ->
    ``.h in site-packages/torch``; the standard library by name."""
    path = PurePath(source)
    parts, kind = path.parts, path.suffix or path.name
    if "site-packages" in parts[:-2]:
        return f"{kind} in site-packages/{parts[parts.index('site-packages') + 1]}"
    if any(part.startswith("python3") for part in parts[:-1]):
        return f"{kind} in the Python standard library"
    return f"{kind} under {PurePath(*parts[:3])}"


@dataclass
class Tally:
    records: int = 0
    prompt_tokens: int = 0
    answer_tokens: int = 0

    def add(self, record: dict) -> None:
        self.records += 1
        self.prompt_tokens += len(record["prompt_token_ids"])
        self.answer_tokens += len(record["output_token_ids"])


@dataclass
class DataCard:
    total: Tally = field(default_factory=Tally)
    families: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    kinds: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    files: Counter = field(default_factory=Counter)
    incomplete_lines: int = 0

    @classmethod
    def of(cls, path: str) -> DataCard:
        card = cls()
        with open(path) as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    card.incomplete_lines += 1
                    continue
                card.total.add(record)
                card.families[family(record["source"])].add(record)
                card.kinds[record.get("kind", "?")].add(record)
                card.files[record["source"]] += 1
        return card

    def markdown(self, title: str) -> str:
        def rows(tallies: dict[str, Tally]) -> list[str]:
            return [f"| {name} | {t.records:,} | {t.prompt_tokens:,} | {t.answer_tokens:,} |"
                    for name, t in sorted(tallies.items(), key=lambda kv: -kv[1].records)]

        header = ["| | records | prompt tokens | answer tokens |", "|---|---|---|---|"]
        total = self.total
        lines = [f"# Data card: {title}", "",
                 f"{total.records:,} records from {len(self.files):,} files; "
                 f"{total.prompt_tokens:,} prompt tokens, {total.answer_tokens:,} answer "
                 f"tokens (mean {total.answer_tokens / max(total.records, 1):.0f} per "
                 "answer).", ""]
        if self.incomplete_lines:
            lines += [f"{self.incomplete_lines} incomplete line(s) skipped (a cut-off "
                      "write).", ""]
        lines += ["## By source family", "", *header, *rows(self.families), "",
                  "## By prompt kind", "", *header, *rows(self.kinds), ""]
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_longspec.train.data_card",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("jsonl")
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    text = DataCard.of(args.jsonl).markdown(PurePath(args.jsonl).name)
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
