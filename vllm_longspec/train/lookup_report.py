"""Draft vs context lookup vs hybrid: per-prompt measures and the summary tables.

``vllm-longspec evaluate --markdown`` writes them (benchmarks/results/lookup_rule.md).
The hybrid threshold chosen is the one with the most tokens per cost unit
(``round_sources``: a round costs 1, plus r K when it runs the draft).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from vllm_longspec.train.round_sources import (
    RoundOptions,
    by_match_length,
    source_totals,
    walk,
)


@dataclass
class PromptResult:
    id: str | None
    task: str
    bucket: str
    prompt_tokens: int
    output_tokens: int
    sources: dict[str, dict[str, int]]           # source name -> source_totals
    by_match_length: dict[int, dict[str, int]]   # see round_sources.by_match_length
    position_hits: dict[str, list[list[int]]]    # source -> [K] [tried, accepted]
    lookup_seconds: list[float]

    @classmethod
    def measure(cls, record: dict, output_tokens: int, options: RoundOptions,
                earliest: RoundOptions, k: int, max_ngram: int) -> PromptResult:
        sources = {"draft": walk(options, "draft"), "lookup": walk(options, "lookup"),
                   "lookup-earliest": walk(earliest, "lookup")}
        for threshold in range(1, max_ngram + 1):
            sources[f"hybrid@{threshold}"] = walk(options, "hybrid", threshold)
        return cls(record.get("id"), record.get("task", "all"), record.get("bucket", "all"),
                   len(record["prompt_token_ids"]), output_tokens,
                   {name: source_totals(rounds) for name, rounds in sources.items()},
                   by_match_length(options),
                   {"draft": position_counts(options.draft_accepted, options, k),
                    "lookup": position_counts(options.lookup_accepted, options, k,
                                              found_only=True)},
                   options.lookup_seconds.tolist())


def position_counts(accepted: np.ndarray, options: RoundOptions, k: int,
                    found_only: bool = False) -> list[list[int]]:
    """[k] [tried, accepted] per chain position over the rounds with room for k tokens.

    Position i (1-based) is tried when positions < i were accepted.
    """
    room = options.end - options.start - np.arange(len(accepted)) - 1
    keep = room >= k
    if found_only:
        keep &= options.match_len > 0
    kept = accepted[keep]
    return [[int((kept >= i - 1).sum()), int((kept >= i).sum())] for i in range(1, k + 1)]


class Summary:
    """Totals over prompts, the chosen threshold, and the tables."""

    def __init__(self, results: list[PromptResult], *, k: int, max_ngram: int,
                 draft_step_ratio: float):
        self.results, self.k, self.max_ngram = results, k, max_ngram
        self.ratio = draft_step_ratio
        self.totals = self._sum([r.sources for r in results])
        hybrids = [f"hybrid@{t}" for t in range(1, max_ngram + 1)]
        # most tokens per cost unit; ties go to the lower threshold
        self.threshold = 1 + max(range(len(hybrids)),
                                 key=lambda i: (self.per_cost(self.totals[hybrids[i]]), -i))

    @staticmethod
    def _sum(tables: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
        totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for table in tables:
            for name, row in table.items():
                for column, value in row.items():
                    totals[name][column] += value
        return totals

    def per_cost(self, row: dict[str, int]) -> float:
        cost = row["rounds"] + self.ratio * self.k * row["draft_rounds"]
        return row["tokens"] / max(cost, 1e-9)

    def source_row(self, name: str) -> dict[str, float]:
        row = self.totals[name]
        rounds = max(row["rounds"], 1)
        return {"tokens_per_round": row["tokens"] / rounds,
                "lookup_fraction": row["lookup_rounds"] / rounds,
                "draft_fraction": row["draft_rounds"] / rounds,
                "tokens_per_cost_unit": self.per_cost(row), **row}

    def match_rows(self) -> list[dict[str, float]]:
        table = self._sum([{str(m): row for m, row in r.by_match_length.items()}
                           for r in self.results])
        total = sum(row["positions"] for row in table.values())
        return [{"match_len": int(m), "positions": row["positions"],
                 "share": row["positions"] / max(total, 1),
                 "lookup_accepted": row["lookup_accepted"] / row["positions"],
                 "draft_accepted": row["draft_accepted"] / row["positions"]}
                for m, row in sorted(table.items(), key=lambda item: int(item[0]))]

    def position_rows(self) -> dict[str, list[float]]:
        rates = {}
        for source in ("draft", "lookup"):
            counts = np.array([r.position_hits[source] for r in self.results]).sum(0)
            rates[source] = [a / t if t else float("nan") for t, a in counts.tolist()]
        return rates

    def task_rows(self) -> dict[str, dict[str, float]]:
        names = ("draft", "lookup", f"hybrid@{self.threshold}")
        groups: dict[str, list[PromptResult]] = defaultdict(list)
        for result in self.results:
            groups[result.task].append(result)
        rows = {}
        for task, members in sorted(groups.items()):
            totals = self._sum([r.sources for r in members])
            rows[task] = {name: totals[name]["tokens"] / max(totals[name]["rounds"], 1)
                          for name in names} | {"prompts": len(members)}
        return rows

    def timing(self) -> dict[str, float]:
        seconds = np.concatenate([r.lookup_seconds for r in self.results]) * 1e6
        return {"calls": len(seconds), "median_us": float(np.median(seconds)),
                "p99_us": float(np.percentile(seconds, 99)), "max_us": float(seconds.max()),
                "longest_history": max(r.prompt_tokens + r.output_tokens for r in self.results)}

    def to_json(self, command: str, draft: str) -> dict:
        names = ["draft", "lookup", "lookup-earliest"] + [
            f"hybrid@{t}" for t in range(1, self.max_ngram + 1)]
        return {"command": command, "draft": draft, "k": self.k, "max_ngram": self.max_ngram,
                "draft_step_ratio": self.ratio, "chosen_threshold": self.threshold,
                "sources": {name: self.source_row(name) for name in names},
                "by_match_length": self.match_rows(),
                "acceptance_per_position": self.position_rows(),
                "by_task": self.task_rows(), "lookup_timing": self.timing(),
                "prompts": [r.__dict__ | {"lookup_seconds": None} for r in self.results]}

    def markdown(self, command: str, draft: str) -> str:
        hybrid = f"hybrid@{self.threshold}"
        lines = [f"# Draft, context lookup and the hybrid rule (greedy chains, K={self.k})",
                 "", f"Made by `{command}` (draft `{draft}`, {len(self.results)} prompts, "
                 f"tokens emitted after the first: "
                 f"{sum(r.output_tokens - 1 for r in self.results)}).", "",
                 f"Cost unit: one verification round; a round that runs the draft costs "
                 f"1 + {self.ratio} x {self.k}. Chosen rule: **lookup when its match is at "
                 f"least {self.threshold} tokens long, else the draft** ({hybrid}).", "",
                 "| source | tokens/round | lookup rounds | draft rounds | tokens/cost unit |",
                 "|---|---|---|---|---|"]
        names = ["draft", "lookup", "lookup-earliest", hybrid] + [
            f"hybrid@{t}" for t in range(1, self.max_ngram + 1) if t != self.threshold]
        for name in names:
            row = self.source_row(name)
            lines.append(f"| {name} | {row['tokens_per_round']:.3f} | "
                         f"{row['lookup_fraction']:.1%} | {row['draft_fraction']:.1%} | "
                         f"{row['tokens_per_cost_unit']:.3f} |")
        lines += ["", "Per lookup match length, over every position a round could start at "
                  f"(accepted proposed tokens, 0..{self.k}; `{self.max_ngram}` means "
                  f">= {self.max_ngram}):", "",
                  "| match length | positions | share | lookup accepted | draft accepted |",
                  "|---|---|---|---|---|"]
        for row in self.match_rows():
            lines.append(f"| {row['match_len']} | {row['positions']} | {row['share']:.1%} | "
                         f"{row['lookup_accepted']:.3f} | {row['draft_accepted']:.3f} |")
        rates = self.position_rows()
        lines += ["", "Acceptance per chain position, given the earlier ones accepted "
                  "(lookup: positions with a match):", "",
                  "| source | " + " | ".join(str(i) for i in range(1, self.k + 1)) + " |",
                  "|---|" + "---|" * self.k]
        for source, values in rates.items():
            lines.append(f"| {source} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        lines += ["", "Tokens per round by task:", "",
                  f"| task | prompts | draft | lookup | {hybrid} |", "|---|---|---|---|---|"]
        for task, row in self.task_rows().items():
            lines.append(f"| {task} | {row['prompts']} | {row['draft']:.3f} | "
                         f"{row['lookup']:.3f} | {row[hybrid]:.3f} |")
        timing = self.timing()
        lines += ["", f"Lookup cost (extend by one token + propose, {timing['calls']} calls, "
                  f"histories up to {timing['longest_history']} tokens): median "
                  f"{timing['median_us']:.0f} us, p99 {timing['p99_us']:.0f} us, max "
                  f"{timing['max_us']:.0f} us.", ""]
        return "\n".join(lines)
