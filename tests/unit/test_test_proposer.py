"""The test-only replay proposer: which tokens it proposes, and when."""

from __future__ import annotations

import json
import types

import torch

from vllm_longspec.testing import ENV_VAR, TestProposer


def _runner(prompt):
    state = types.SimpleNamespace(prompt_token_ids=prompt)
    batch = types.SimpleNamespace(req_ids=["a"], vocab_size=1000)
    return types.SimpleNamespace(input_batch=batch, requests={"a": state})


def test_replay_and_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "rec.json"
    path.write_text(json.dumps({"sequences": [
        {"prompt_token_ids": [5, 6, 7], "output_token_ids": [10, 11, 12, 13, 14]}]}))
    monkeypatch.setenv(ENV_VAR, json.dumps({"replay": str(path)}))
    proposer = TestProposer.from_env()
    model_drafts = torch.full((1, 3), 999)
    # Bonus token at position 4 = output #1 (11): drafts are outputs #2..#4.
    got = proposer.override(model_drafts, _runner([5, 6, 7]), torch.tensor([4]))
    assert got.tolist() == [[12, 13, 14]]
    # Past the recording, the model's own drafts stay.
    got = proposer.override(model_drafts, _runner([5, 6, 7]), torch.tensor([6]))
    assert got.tolist() == [[14, 999, 999]]
    # Unknown prompt: untouched.
    got = proposer.override(model_drafts, _runner([1]), torch.tensor([4]))
    assert got.tolist() == [[999, 999, 999]]

    monkeypatch.setenv(ENV_VAR, json.dumps({"replay": str(path), "corrupt_every": 3}))
    got = TestProposer.from_env().override(model_drafts, _runner([5, 6, 7]),
                                           torch.tensor([4]))
    assert got.tolist() == [[12, 14, 14]]  # output #3 corrupted to 13 + 1


def test_off_without_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert TestProposer.from_env() is None
