"""The long-context benchmark suite without an engine: its prompt file and its metrics.

The prompt file must be valid, drawn only from benchmarks/sources.txt and
reproducible from benchmarks/build_prompts.py; the metrics must compute what
docs/benchmarks.md says on synthetic traces whose answers are known.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from benchmarks.longctx.documents import is_reserved, resolve, source_sha256
from benchmarks.longctx.jobs import job_payload, load_cached, plan
from benchmarks.longctx.methods import (
    METHODS,
    MethodOptions,
    MethodSpecError,
    parse_spec,
    spec_from_slug,
    spec_slug,
)
from benchmarks.longctx.metrics import (
    SpecCounters,
    cell_metrics,
    decode_timing,
    divergences,
    first_divergence,
    percentile,
    speedup,
)
from benchmarks.longctx.plan import CellKey, EngineSettings, request_groups
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
from benchmarks.longctx.report import build_rows, markdown
from benchmarks.longctx_bench import parse_args
from vllm_longspec.config import DEFAULT_TREE

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
    # Every task at every length, at least four prompts each (issue 14).
    for task in TASKS:
        for bucket in BUCKET_TOKENS:
            assert sum(p.task == task and p.bucket == bucket for p in prompts) >= 4


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
    rows = build_rows(keys, dict(zip(keys[:2], ([plain], [spec]), strict=True)),
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
    assert METHODS["longspec_tree"].config(with_draft)["tree"] == list(DEFAULT_TREE)


# --- method specs: several chains and trees in one run -------------------------

WITH_DRAFT = MethodOptions(draft="/some/draft", num_speculative_tokens=4)


def test_method_specs_parse_to_canonical_identities():
    assert parse_spec("plain").spec == "plain"
    assert parse_spec("longspec").spec == "longspec"  # bare: --k decides
    assert parse_spec("longspec:2").spec == "longspec:2"
    assert parse_spec("longspec:02").spec == "longspec:2"
    tree = parse_spec("longspec_tree:4,4,4,4")
    assert tree.spec == "longspec_tree:4,4,4,4" and tree.method.name == "longspec_tree"
    assert parse_spec("longspec_tree:2,02,2").spec == "longspec_tree:2,2,2"
    assert parse_spec("longspec_tree:8").spec == "longspec_tree:8"


@pytest.mark.parametrize("spec, message", [
    ("beam", "unknown method 'beam'"),
    ("beam:4", "unknown method 'beam'"),
    ("LongSpec:4", "unknown method"),
    ("plain:3", "takes no parameters"),
    ("ngram:4", "takes no parameters"),
    ("suffix:", "takes no parameters"),
    ("longspec:", "positive integer"),
    ("longspec:0", "positive integer"),
    ("longspec:-1", "positive integer"),
    ("longspec:2.5", "positive integer"),
    ("longspec:+2", "positive integer"),
    ("longspec: 2", "positive integer"),
    ("longspec:2,2", "positive integer"),
    ("longspec:17", "at most 16"),
    ("longspec_tree:", "positive integer"),
    ("longspec_tree:4,,4", "positive integer"),
    ("longspec_tree:4,4,", "positive integer"),
    ("longspec_tree:4,0", "positive integer"),
    ("longspec_tree:4-4", "positive integer"),
    ("longspec_tree:4;4", "positive integer"),
    ("longspec_tree:64,64", "at most 127"),
])
def test_malformed_method_specs_are_rejected(spec, message, capsys):
    with pytest.raises(MethodSpecError, match=message):
        parse_spec(spec)
    with pytest.raises(SystemExit) as exit_info:  # an argparse error, not a traceback
        parse_args(["--methods", "plain", spec])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "argument --methods" in error and message.split("'")[0] in error


def test_command_line_keeps_plain_first_and_each_spec_once():
    args = parse_args(["--methods", "longspec:1", "longspec:4", "longspec_tree:4,4,4,4",
                       "longspec_tree:2,2,2", "plain", "longspec:04", "longspec"])
    assert args.methods == ["plain", "longspec:1", "longspec:4",
                            "longspec_tree:4,4,4,4", "longspec_tree:2,2,2", "longspec"]
    assert parse_args([]).methods == ["plain", "ngram", "suffix", "longspec"]
    assert parse_args(["--tree", "2", "2"]).tree == [2, 2]
    for bad in (["--k", "0"], ["--k", "x"], ["--tree", "4", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_method_specs_make_the_speculative_configs():
    chain = {"method": "longspec", "model": "/some/draft"}
    assert parse_spec("longspec").config(WITH_DRAFT) == chain | {
        "num_speculative_tokens": 4}
    assert parse_spec("longspec:1").config(WITH_DRAFT) == chain | {
        "num_speculative_tokens": 1}
    assert parse_spec("longspec:7").config(
        MethodOptions("/some/draft", 3, (2, 2))) == chain | {"num_speculative_tokens": 7}
    assert parse_spec("longspec_tree").config(WITH_DRAFT) == chain | {
        "tree": list(DEFAULT_TREE)}
    assert parse_spec("longspec_tree").config(
        MethodOptions("/some/draft", 4, (3, 1))) == chain | {"tree": [3, 1]}
    assert parse_spec("longspec_tree:2,2,2").config(WITH_DRAFT) == chain | {
        "tree": [2, 2, 2]}
    assert parse_spec("plain").config(WITH_DRAFT) is None
    assert parse_spec("ngram").config(WITH_DRAFT) == METHODS["ngram"].config(WITH_DRAFT)
    no_draft = MethodOptions(draft=None, num_speculative_tokens=4)
    assert "draft" in parse_spec("longspec:2").unavailable(no_draft)
    assert "draft" in parse_spec("longspec_tree:2,2").unavailable(no_draft)
    assert parse_spec("longspec_tree:2,2").unavailable(WITH_DRAFT) is None


def test_method_summaries_name_the_variant():
    assert parse_spec("longspec").summary(WITH_DRAFT).startswith("LongSpec chain, K<=4, the")
    assert parse_spec("longspec:2").summary(WITH_DRAFT).startswith("LongSpec chain, K<=2")
    assert parse_spec("longspec_draft").summary(WITH_DRAFT).endswith("the draft alone, every step")
    assert parse_spec("longspec_draft").config(WITH_DRAFT)["adaptive"] is False
    assert parse_spec("longspec_lookup:3").config(WITH_DRAFT) == {
        "method": "longspec", "model": WITH_DRAFT.draft, "num_speculative_tokens": 3,
        "context_lookup": True, "adaptive": False}
    assert parse_spec("longspec_tree:4,4,4,4").summary(WITH_DRAFT).startswith(
        "LongSpec tree 4-4-4-4 (dynamic beam tree, 16 nodes, depth 4")
    assert parse_spec("longspec_tree:2,2,2").summary(WITH_DRAFT).startswith(
        "LongSpec tree 2-2-2 (")
    assert "chain of K=3" in parse_spec("longspec_tree:1,1,1").summary(WITH_DRAFT)


def test_spec_file_names_are_safe_distinct_and_reversible():
    specs = ["plain", "ngram", "suffix", "longspec", "longspec:1", "longspec:4",
             "longspec:14", "longspec_tree", "longspec_tree:4,4,4,4",
             "longspec_tree:2,2,2", "longspec_tree:22,2", "longspec_tree:2,22",
             "longspec_tree:1,4"]
    slugs = [spec_slug(spec) for spec in specs]
    assert len(set(slugs)) == len(specs)
    assert all(re.fullmatch(r"[a-z0-9_-]+", slug) for slug in slugs)
    assert [spec_from_slug(slug) for slug in slugs] == specs
    # Bare names keep the directories of cells measured before specs existed.
    assert spec_slug("longspec") == "longspec"
    assert spec_slug("longspec_tree:4,4,4,4") == "longspec_tree-4-4-4-4"


def test_plan_gives_every_variant_its_own_engine_cells_and_config(prompts):
    specs = ["plain", "longspec", "longspec:1", "longspec:4", "longspec_tree:4,4,4,4",
             "longspec_tree:2,2,2"]
    args = argparse.Namespace(samplings=["greedy"], dtype="float32", batch_sizes=[1, 8],
                              max_tokens=64, batched_max_tokens=64, k=4,
                              tree=[4, 4, 4, 4])
    buckets = {("code_completion", "4k"): [p for p in prompts if p.task
                                          == "code_completion" and p.bucket == "4k"][:1]}
    draft = {"path": "/some/draft", "sha256": "d" * 64}
    jobs = plan(args, EngineSettings(model="/target"), buckets, specs, draft, "0.0")
    assert [job.method for job in jobs] == specs
    assert len({job.name for job in jobs}) == len(jobs)
    assert jobs[5].name == "greedy-float32-longspec_tree-2-2-2"
    configs = {job.method: job.speculative_config for job in jobs}
    assert configs["plain"] is None
    assert configs["longspec:1"]["num_speculative_tokens"] == 1
    assert configs["longspec:4"]["num_speculative_tokens"] == 4
    assert configs["longspec_tree:4,4,4,4"]["tree"] == [4, 4, 4, 4]
    assert configs["longspec_tree:2,2,2"]["tree"] == [2, 2, 2]
    assert all(config["model"] == "/some/draft" for config in list(configs.values())[1:])
    cells = [cell for job in jobs for cell in job.cells]
    assert len(cells) == len(specs) * 2
    assert len({cell.key for cell in cells}) == len(cells)
    assert len({cell.key.relative_path() for cell in cells}) == len(cells)
    assert len({cell.key.label() for cell in cells}) == len(cells)
    assert str(jobs[4].cells[0].key.relative_path()) == (
        "greedy-float32/longspec_tree-4-4-4-4/code_completion-4k-b1.json")
    assert str(jobs[1].cells[0].key.relative_path()) == (
        "greedy-float32/longspec/code_completion-4k-b1.json")
    by_spec = {job.method: [cell.fingerprint for cell in job.cells] for job in jobs}
    # The same experiment has the same fingerprint (bare longspec is K=4) ...
    assert by_spec["longspec"] == by_spec["longspec:4"]
    # ... and every other variant is another experiment.
    distinct = [tuple(by_spec[s]) for s in specs if s != "longspec"]
    assert len(set(distinct)) == len(distinct)


def test_rounds_run_fresh_engines_in_rotation_and_resume(prompts, tmp_path):
    args = argparse.Namespace(samplings=["greedy"], dtype="bfloat16", batch_sizes=[1],
                              max_tokens=8, batched_max_tokens=8, k=4, tree=[2, 2])
    buckets = {("doc_qa", "1k"): [p for p in prompts if p.task == "doc_qa"
                                 and p.bucket == "1k"][:1]}
    draft = {"path": "/some/draft", "sha256": "d" * 64}
    jobs = plan(args, EngineSettings(model="/target"), buckets,
                ["plain", "ngram", "longspec"], draft, "0.0")
    records, pending = load_cached(jobs, tmp_path, fresh=False, rounds=3)
    assert records == {}
    assert [(todo.round, todo.job.method) for todo in pending] == [
        (1, "plain"), (1, "ngram"), (1, "longspec"), (2, "ngram"), (2, "longspec"),
        (2, "plain"), (3, "longspec"), (3, "plain"), (3, "ngram")]
    assert pending[3].name == "greedy-bfloat16-ngram.r2"
    # what the worker writes for round 2 of plain is found again, that round only
    payload = job_payload(pending[5], EngineSettings(model="/target"), tmp_path)
    (cell,) = payload["cells"]
    assert cell["path"].endswith("greedy-bfloat16/plain/doc_qa-1k-b1.r2.json")
    Path(cell["path"]).parent.mkdir(parents=True)
    Path(cell["path"]).write_text(json.dumps({"fingerprint": cell["fingerprint"]}))
    records, pending = load_cached(jobs, tmp_path, fresh=False, rounds=3)
    assert list(records.values()) == [[{"fingerprint": cell["fingerprint"]}]]
    assert (2, "plain") not in [(todo.round, todo.job.method) for todo in pending]
    assert len(pending) == 8


def test_rounds_report_the_median_and_each_rounds_speedup():
    def timed(seconds):  # 1 token after the first, in ``seconds``
        return _record([(1.0, 1, [1]), (1.0 + seconds, 0, [1])], {0: [7, 8]})

    plain = [timed(0.10), timed(0.10), timed(0.20)]  # 10, 10, 5 tok/s
    spec = [timed(0.05), timed(0.04), timed(0.10)]  # 20, 25, 10 tok/s
    keys = [CellKey("greedy-bfloat16", method, "doc_qa", "1k", 1)
            for method in ("plain", "longspec")]
    rows = {row.method: row for row in build_rows(keys, dict(zip(
        keys, (plain, spec), strict=True)), {})}
    longspec = rows["longspec"]
    assert longspec.metrics["decode_tokens_per_s"] == pytest.approx(20.0)  # median
    assert longspec.speedup == pytest.approx(2.0)  # median 20 / median 10
    assert longspec.speedup_by_round == pytest.approx((2.0, 2.5, 2.0))
    assert longspec.identical == (1, 1)


def _spec_record(tokens, accepted_per_position):
    drafts = 10
    return _record([(1.0, 1, [1]), (1.1, 0, [len(tokens) - 1])], {0: tokens},
                   {"drafts": drafts, "draft_tokens": 4 * drafts,
                    "accepted_tokens": sum(accepted_per_position),
                    "accepted_per_position": accepted_per_position, "preemptions": 0})


def test_report_shows_every_variant_with_its_own_acceptance_positions():
    plain = _record([(1.0, 1, [1]), (1.1, 0, [1]), (1.2, 0, [1])], {0: [7, 8, 9]})
    # vLLM sizes a tree's per-position counter by its nodes; only depths count.
    records = {"plain": plain,
               "longspec:1": _spec_record([7, 8, 9], [3]),
               "longspec:4": _spec_record([7, 8, 9], [5, 3, 1, 0]),
               "longspec_tree:4,4,4,4": _spec_record([7, 8, 9], [6, 4, 2, 1] + [0] * 12),
               "longspec_tree:2,2,2": _spec_record([7, 8, 4], [7, 5, 3] + [0] * 3)}
    keys = [CellKey("greedy-float32", spec, "doc_qa", "4k", 1) for spec in records]
    rows = build_rows(keys, {key: [records[key.method]] for key in keys}, {})
    assert [row.method for row in rows] == list(records)
    options = WITH_DRAFT
    header = {
        "prompt_set": PROMPT_SET, "command": "python -m benchmarks.longctx_bench",
        "suite_wall_s": 60.0, "failures": {}, "draft": None,
        "machine": {"cpu_model": "cpu", "usable_cores": 2, "memory_gib": 8,
                    "loadavg_at_start": [1.0, 1.0, 1.0]},
        "software": {"vllm": "0", "torch": "0", "vllm_longspec_commit": None,
                     "vllm_longspec_dirty": False, "ld_preload": None},
        "methods": {spec: {"summary": parse_spec(spec).summary(options),
                           "speculative_config": parse_spec(spec).config(options),
                           "unavailable": None} for spec in records}}
    table = markdown(header, rows)
    lines = {line.split(" | ")[3]: line for line in table.splitlines()
             if line.startswith("| doc_qa |")}
    assert set(lines) == set(records)
    assert "| 0.30 |" in lines["longspec:1"]
    assert "| 0.50 0.30 0.10 0.00 |" in lines["longspec:4"]
    assert "| 0.60 0.40 0.20 0.10 |" in lines["longspec_tree:4,4,4,4"]
    assert "| 0.70 0.50 0.30 |" in lines["longspec_tree:2,2,2"]
    assert "identical 1/1" in lines["longspec_tree:4,4,4,4"]
    assert "first diff at token 2" in lines["longspec_tree:2,2,2"]
    assert "- `longspec_tree:2,2,2`: LongSpec tree 2-2-2" in table
    assert "- `longspec:1`: LongSpec chain, K<=1, the plugin's defaults" in table
