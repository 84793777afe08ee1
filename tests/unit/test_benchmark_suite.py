"""The long-context benchmark suite without an engine: its prompt file and its metrics.

The prompt file must be valid, drawn only from benchmarks/sources.txt and
reproducible from benchmarks/build_prompts.py; the metrics must compute what
docs/benchmarks.md says on synthetic traces whose answers are known.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.longctx.documents import is_reserved, resolve, source_sha256
from benchmarks.longctx.methods import METHODS, MethodOptions
from benchmarks.longctx.metrics import (
    SpecCounters,
    cell_metrics,
    decode_timing,
    divergences,
    first_divergence,
    percentile,
    speedup,
)
from benchmarks.longctx.plan import CellKey, request_groups
from benchmarks.longctx.prompt_file import (
    BUCKET_TOKENS,
    MANIFEST_FILE,
    PROMPT_FILE,
    PROMPT_SET,
    TASKS,
    bucket_range,
    file_sha256,
    read_prompts,
)
from benchmarks.longctx.report import build_rows

TARGET_POSITIONS, TARGET_VOCAB = 8192, 49152


@pytest.fixture(scope="module")
def prompts():
    return read_prompts(PROMPT_FILE)


# --- the prompt file --------------------------------------------------------


def test_prompt_file_is_valid(prompts):
    assert len({p.id for p in prompts}) == len(prompts)
    manifest = json.loads(MANIFEST_FILE.read_text())
    assert manifest["jsonl_sha256"] == file_sha256(PROMPT_FILE)
    assert manifest["num_prompts"] == len(prompts)
    for prompt in prompts:
        assert prompt.prompt_set == PROMPT_SET
        assert prompt.task in TASKS and prompt.bucket in BUCKET_TOKENS
        assert prompt.format == ("raw" if prompt.instruction is None else "chat")
        assert prompt.num_tokens == len(prompt.prompt_token_ids)
        assert all(0 <= t < TARGET_VOCAB for t in prompt.prompt_token_ids)
        assert prompt.num_tokens + prompt.max_tokens <= TARGET_POSITIONS, prompt.id
        assert len(prompt.text_sha256) == 64
    # Every task at every length, at least two prompts each.
    for task in TASKS:
        for bucket in BUCKET_TOKENS:
            assert sum(p.task == task and p.bucket == bucket for p in prompts) >= 2


def test_prompt_lengths_are_within_their_buckets(prompts):
    for prompt in prompts:
        assert prompt.num_tokens in bucket_range(prompt.bucket), prompt.id


def test_every_source_is_reserved_for_benchmarks(prompts):
    for prompt in prompts:
        assert prompt.sources, prompt.id
        for source in prompt.sources:
            assert is_reserved(source.path), (prompt.id, source.path)
        # Only the last document may have been cut to fit the bucket.
        assert all(source.complete for source in prompt.sources[:-1]), prompt.id
    assert not is_reserved("{stdlib}/argparse.py")  # training data stays allowed


def test_prompt_file_is_reproducible(prompts, target_dir):
    from transformers import AutoTokenizer

    from benchmarks.build_prompts import build_prompt_set

    for prompt in prompts:
        for source in prompt.sources:
            if not resolve(source.path).is_file() or (
                    source_sha256(source.path) != source.sha256):
                pytest.skip(f"{source.path} differs on this machine: the set was "
                            "built from another Python / Debian docs")
    rebuilt = build_prompt_set(AutoTokenizer.from_pretrained(target_dir))
    assert [p.id for p in rebuilt] == [p.id for p in prompts]
    for new, old in zip(rebuilt, prompts, strict=True):
        assert new.text_sha256 == old.text_sha256, new.id
        assert new == old, new.id


# --- metrics on synthetic traces ---------------------------------------------


def _group(steps, num_requests=1, tokens=None):
    return {"requests": [{"prompt_id": f"p{i}", "copy": 0,
                          "token_ids": (tokens or {}).get(i, [])}
                         for i in range(num_requests)],
            "steps": [{"t": t, "prefilling": p, "emitted": e} for t, p, e in steps]}


def test_accepted_length_and_acceptance_by_position_from_counters():
    counters = SpecCounters.from_counters({
        "drafts": 10, "draft_tokens": 40, "accepted_tokens": 15,
        "accepted_per_position": [8, 5, 2, 0]})
    assert counters.mean_accepted_length == pytest.approx(2.5)  # 1 bonus + 1.5
    assert counters.acceptance_by_position == pytest.approx((0.8, 0.5, 0.2, 0.0))
    assert counters.draft_acceptance_rate == pytest.approx(15 / 40)
    pooled = counters + SpecCounters(10, 40, 5, (5,))
    assert pooled.accepted_per_position == (13, 5, 2, 0)
    assert pooled.mean_accepted_length == pytest.approx(2.0)
    assert SpecCounters(0, 0, 0, ()).mean_accepted_length is None
    assert SpecCounters(0, 0, 0, ()).acceptance_by_position == ()


def test_decode_timing_excludes_prefill_at_batch_one():
    # Prefill returns the first token at 2.0 s; then 4 tokens in 3 steps over 0.4 s.
    timing = decode_timing([_group([(1.0, 1, [0]), (2.0, 1, [1]), (2.1, 0, [1]),
                                    (2.3, 0, [2]), (2.4, 0, [1])])])
    assert timing.tokens == 4
    assert timing.seconds == pytest.approx(0.4)
    assert timing.tokens_per_s == pytest.approx(10.0)
    assert timing.tokens_per_step == pytest.approx(4 / 3)
    assert timing.token_times == pytest.approx((0.1, 0.1, 0.1, 0.1))


def test_decode_timing_at_batch_two_skips_steps_mixed_with_prefill():
    # Request 0 decodes while request 1 still prefills (the steps returning at
    # 1.0, 1.5 and 2.0 began with request 1 waiting for its first token); then
    # 2 decode steps of 0.2 s bring 4 tokens (request 1 finishes after the first).
    timing = decode_timing([_group([(1.0, 2, [1, 0]), (1.5, 1, [1, 0]),
                                    (2.0, 1, [1, 1]), (2.2, 0, [1, 2]),
                                    (2.4, 0, [1, 0])], num_requests=2)])
    assert timing.tokens == 4
    assert timing.seconds == pytest.approx(0.4)
    assert timing.tokens_per_s == pytest.approx(10.0)
    # Request 0: gaps 0.2, 0.2; request 1: 2 tokens after 0.2 s.
    assert sorted(timing.token_times) == pytest.approx([0.1, 0.1, 0.2, 0.2])


def test_percentiles_and_speedup():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([], 50) is None
    assert speedup(30.0, 20.0) == pytest.approx(1.5)
    assert speedup(None, 20.0) is None and speedup(30.0, 0.0) is None


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # stopped early


def _record(steps, tokens, counters=None):
    return {"groups": [_group(steps, tokens=tokens)],
            "counters": counters or {"drafts": 0, "draft_tokens": 0,
                                     "accepted_tokens": 0, "accepted_per_position": [],
                                     "preemptions": 0}}


def test_rows_compare_each_method_with_plain_decoding_of_the_same_cell():
    plain = _record([(1.0, 1, [1]), (1.1, 0, [1]), (1.2, 0, [1])], {0: [7, 8, 9]})
    spec = _record([(1.0, 1, [1]), (1.1, 0, [2])], {0: [7, 8, 4]},
                   {"drafts": 1, "draft_tokens": 4, "accepted_tokens": 1,
                    "accepted_per_position": [1, 0, 0, 0], "preemptions": 0})
    keys = [CellKey("greedy-float32", method, "doc_qa", "1k", 1)
            for method in ("plain", "longspec", "suffix")]
    rows = build_rows(keys, dict(zip(keys[:2], (plain, spec), strict=True)),
                      {"suffix": "not installed"})
    by_method = {row.method: row for row in rows}
    assert by_method["plain"].speedup == pytest.approx(1.0)
    assert by_method["longspec"].speedup == pytest.approx(2.0)  # 2 tok in 0.1 s vs 0.2 s
    assert by_method["longspec"].metrics["mean_accepted_length"] == pytest.approx(2.0)
    assert by_method["longspec"].first_divergence == {"p0#0": 2}
    assert by_method["longspec"].identical == (0, 1)
    assert by_method["suffix"].status == "unavailable"
    assert cell_metrics([spec]).tokens_per_step == pytest.approx(2.0)
    assert divergences([plain], [plain]) == {"p0#0": None}


# --- plan and methods ---------------------------------------------------------


def test_batches_cycle_through_the_bucket_prompts(prompts):
    bucket = [p for p in prompts if p.task == "doc_qa" and p.bucket == "4k"][:2]
    singles = request_groups(bucket, 1, None)
    assert [len(g) for g in singles] == [1, 1]
    (batch,) = request_groups(bucket, 8, 16)
    assert [r.prompt_id for r in batch] == [bucket[0].id, bucket[1].id] * 4
    assert [r.copy for r in batch] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len({r.seed for r in batch}) == 8  # every copy samples differently
    assert all(r.max_tokens == 16 for r in batch)


def test_methods_report_why_they_cannot_run():
    no_draft = MethodOptions(draft=None, num_speculative_tokens=4)
    assert "draft" in METHODS["longspec"].unavailable(no_draft)
    assert METHODS["longspec_tree"].unavailable(no_draft)
    with_draft = MethodOptions(draft="/some/draft", num_speculative_tokens=3)
    assert METHODS["longspec"].unavailable(with_draft) is None
    assert METHODS["longspec"].config(with_draft) == {
        "method": "longspec", "model": "/some/draft", "num_speculative_tokens": 3}
    assert METHODS["plain"].config(with_draft) is None
    assert METHODS["longspec_tree"].config(with_draft)["tree"] == [4, 4, 4, 4]
