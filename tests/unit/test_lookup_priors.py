"""The lookup-priors walk counts a chain round the way verification would."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.lookup_priors import main, walk_answer
from vllm_longspec.speculation.policy import LOOKUP_MATCH_CLASSES


def test_a_round_counts_the_tried_and_accepted_positions():
    tried, accepted = (np.zeros((len(LOOKUP_MATCH_CLASSES), 4)) for _ in range(2))
    # "5" never occurred: the draft's position (one token); then "1" matches the
    # prompt's first token (match 1): proposal 2 3 4 5, the answer goes 2 3 4 9
    assert walk_answer([1, 2, 3, 4, 5], [1, 2, 3, 4, 9], 4, tried, accepted) == 1
    assert tried[1].tolist() == [1, 1, 1, 1] and accepted[1].tolist() == [1, 1, 1, 0]
    assert tried.sum() == 4 and accepted.sum() == 3


def test_the_table_is_written(tmp_path):
    data = tmp_path / "distill.jsonl"
    record = {"prompt_token_ids": [7, 8, 9, 7, 8], "output_token_ids": [9, 7, 8, 9, 1]}
    data.write_text(json.dumps(record) + "\n\n")
    assert main(["--data", str(data), "--out", str(tmp_path / "priors")]) == 0
    result = json.loads((tmp_path / "priors.json").read_text())
    assert result["records"] == 1 and result["answer_tokens"] == 5
    assert sum(row["rounds"] for row in result["classes"]) == result["rounds"] > 0
    assert "| >= 8 |" in (tmp_path / "priors.md").read_text()
