"""A short ``benchmarks/serve_stress.py`` run: a float32 LongSpec chain server
(shipped draft) under concurrent streams, streams cut off after two chunks, the
bad inputs and a seeded request on an uncached prompt that needs a chunked
prefill, two rounds.

It must answer no request with a 5xx and keep its engine alive; refuse every bad
input with a 4xx; free every aborted request; give the seeded request the same
tokens alone and batched; and give the greedy probes, answered alone (uncached,
then prefix-cache hits), inside the loaded rounds and after them, exactly the
tokens of offline plain vLLM (the shared plain engine's ``stress_probes``).
"""

from __future__ import annotations

import pytest

from benchmarks.serve_stress import run

from .conftest import STRESS as SETTINGS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stress(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_stress")
    return run(SETTINGS, out, out / "logs", "tests/e2e/test_serve_stress.py")


def test_no_5xx_no_engine_death(stress):
    summary = stress["summary"]["chain"]
    assert summary["rounds"] == SETTINGS.rounds
    assert summary["status_5xx"] == 0
    assert summary["no_response"] == 0
    assert summary["engine_deaths"] == 0
    assert summary["tracebacks"] == 0


def test_every_bad_input_gets_a_4xx_with_a_message(stress):
    for round_out in stress["servers"]["chain"]["rounds"]:
        for name, outcome in round_out["bad_inputs"].items():
            assert 400 <= outcome["status"] < 500, (name, outcome)
            assert outcome["error"], name


def test_aborted_streams_are_freed(stress):
    for round_out in stress["servers"]["chain"]["rounds"]:
        aborted = [r for r in round_out["load"]["requests"] if r["kind"] == "abort"]
        assert len(aborted) == SETTINGS.abort_streams
        assert all(r["chunks"] == SETTINGS.abort_after for r in aborted)
        assert round_out["metrics"]["vllm:num_requests_running"] == 0
        assert round_out["metrics"]["vllm:num_requests_waiting"] == 0


def test_seeded_request_alone_again_and_batched(stress):
    for round_out in stress["servers"]["chain"]["rounds"]:
        seeded = round_out["seeded"]
        assert {seeded[k]["status"] for k in ("alone", "again", "batched")} == {200}
        assert seeded["alone"]["num_tokens"] == SETTINGS.probe_tokens
        assert seeded["reproduced_alone"]
        assert seeded["reproduced"]


def test_greedy_probes_equal_plain_after_prefix_hits_under_load(stress, plain_run):
    plain_probe_tokens = plain_run["stress_probes"]["token_ids"]
    server = stress["servers"]["chain"]
    passes = {"fresh": server["probes_fresh"], "cached": server["probes_cached"],
              "after_load": server["probes_after_load"],
              **{f"round{r['round']}": r["load"]["probes"] for r in server["rounds"]}}
    for name, probes in passes.items():
        assert [p["token_ids"] for p in probes] == plain_probe_tokens, name
    metrics = server["rounds"][-1]["metrics"]
    assert metrics["vllm:prefix_cache_hits_total"] > 0
    assert metrics["vllm:spec_decode_num_drafts_total"] > 0
    assert metrics["vllm:spec_decode_num_accepted_tokens_total"] > 0

