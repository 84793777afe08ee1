"""The data card of a distillation file (no engine)."""

from __future__ import annotations

import json

from vllm_longspec.train.data_card import DataCard, family


def test_families_name_the_file_type_and_where_it_lives():
    assert family("/usr/include/linux/types.h") == ".h under /usr/include"
    assert family("/x/.venv/lib/python3.11/site-packages/torch/include/c10/a.h") == (
        ".h in site-packages/torch")
    assert family("/usr/lib/python3.11/json/decoder.py") == (
        ".py in the Python standard library")
    assert family("/usr/share/perl/5.36/Carp.pm") == ".pm under /usr/share"


def test_card_counts_records_and_tokens_and_skips_a_cut_off_line(tmp_path):
    records = [
        {"source": "/usr/include/a.h", "kind": "continue",
         "prompt_token_ids": [1] * 10, "output_token_ids": [2] * 4},
        {"source": "/usr/include/b.h", "kind": "explain",
         "prompt_token_ids": [1] * 20, "output_token_ids": [2] * 6},
        {"source": "/usr/share/perl/C.pm", "kind": "explain",
         "prompt_token_ids": [1] * 5, "output_token_ids": [2] * 1},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"source": "/x')
    card = DataCard.of(str(path))
    assert (card.total.records, card.total.prompt_tokens, card.total.answer_tokens) == (
        3, 35, 11)
    assert card.families[".h under /usr/include"].answer_tokens == 10
    assert card.kinds["explain"].records == 2
    assert card.incomplete_lines == 1
    text = card.markdown("d.jsonl")
    assert "3 records from 3 files; 35 prompt tokens, 11 answer tokens" in text
    assert "| .h under /usr/include | 2 | 30 | 10 |" in text


def test_distill_resumes_after_the_last_whole_record(tmp_path):
    from vllm_longspec.distill import completed_records

    out = tmp_path / "d.jsonl"
    assert completed_records(out) == 0
    out.write_text('{"a": 1}\n{"b": 2}\n{"c":')
    assert completed_records(out) == 2
    assert out.read_text() == '{"a": 1}\n{"b": 2}\n'  # the cut-off record dropped
    assert completed_records(out) == 2
