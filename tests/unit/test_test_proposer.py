"""The test-only replay proposer: which tokens it proposes, and when."""

from __future__ import annotations

import json
import types

import torch

from vllm_longspec.testing import ENV_VAR, TestProposer


def _runner(prompt, produced=()):
    state = types.SimpleNamespace(prompt_token_ids=prompt, output_token_ids=list(produced))
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
    got = proposer.override(model_drafts, _runner([5, 6, 7]), torch.tensor([4]),
                            torch.tensor([11]))
    assert got.tolist() == [[12, 13, 14]]
    # Past the recording, the model's own drafts stay.
    got = proposer.override(model_drafts, _runner([5, 6, 7]), torch.tensor([6]),
                            torch.tensor([13]))
    assert got.tolist() == [[14, 999, 999]]
    # Unknown prompt: untouched.
    got = proposer.override(model_drafts, _runner([1]), torch.tensor([4]), torch.tensor([11]))
    assert got.tolist() == [[999, 999, 999]]

    monkeypatch.setenv(ENV_VAR, json.dumps({"replay": str(path), "corrupt_every": 3}))
    got = TestProposer.from_env().override(model_drafts, _runner([5, 6, 7]),
                                           torch.tensor([4]), torch.tensor([11]))
    assert got.tolist() == [[12, 14, 14]]  # output #3 corrupted to 13 + 1


def test_a_recorded_sequence_sets_its_own_corruption(tmp_path, monkeypatch):
    """One engine, two replay modes: told apart by prompt."""
    path = tmp_path / "rec.json"
    outputs = [10, 11, 12, 13, 14]
    path.write_text(json.dumps({"sequences": [
        {"prompt_token_ids": [5, 6, 7], "output_token_ids": outputs},
        {"prompt_token_ids": [5, 6], "output_token_ids": outputs, "corrupt_every": 3}]}))
    monkeypatch.setenv(ENV_VAR, json.dumps({"replay": str(path)}))
    proposer = TestProposer.from_env()
    drafts = torch.full((1, 3), 999)
    got = proposer.override(drafts, _runner([5, 6, 7]), torch.tensor([4]),
                            torch.tensor([11]))
    assert got.tolist() == [[12, 13, 14]]
    got = proposer.override(drafts, _runner([5, 6]), torch.tensor([3]), torch.tensor([11]))
    assert got.tolist() == [[12, 14, 14]]  # output #3 corrupted to 13 + 1


def test_replays_the_continuation_that_agrees_with_the_request(tmp_path, monkeypatch):
    """Sampled requests: one recorded continuation per likely first token."""
    path = tmp_path / "rec.json"
    path.write_text(json.dumps({"sequences": [
        {"prompt_token_ids": [5, 6], "output_token_ids": [10, 20, 21]},
        {"prompt_token_ids": [5, 6], "output_token_ids": [11, 30, 31]}]}))
    monkeypatch.setenv(ENV_VAR, json.dumps({"replay": str(path)}))
    proposer = TestProposer.from_env()
    drafts = torch.full((1, 2), 999)
    # Bonus token = output #0 at position 2 (not yet in the request's state:
    # LongSpec drafts before vLLM's bookkeeping); drafts are outputs #1, #2.
    got = proposer.override(drafts, _runner([5, 6]), torch.tensor([2]), torch.tensor([11]))
    assert got.tolist() == [[30, 31]]
    got = proposer.override(drafts, _runner([5, 6]), torch.tensor([2]), torch.tensor([10]))
    assert got.tolist() == [[20, 21]]
    # A first token nothing was recorded for: the draft's own proposals.
    got = proposer.override(drafts, _runner([5, 6]), torch.tensor([2]), torch.tensor([12]))
    assert got.tolist() == [[999, 999]]
    # One step later the state holds output #0: the continuation must agree with it.
    got = proposer.override(drafts, _runner([5, 6], produced=[10]), torch.tensor([3]),
                            torch.tensor([30]))
    assert got.tolist() == [[999, 999]]


def test_off_without_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert TestProposer.from_env() is None


def test_replay_on_a_tree_branch(tmp_path, monkeypatch):
    from vllm_longspec.tree import BeamTree, DraftTree

    path = tmp_path / "rec.json"
    path.write_text(json.dumps({"sequences": [
        {"prompt_token_ids": [5, 6, 7], "output_token_ids": [10, 11, 12, 13, 14, 15]}]}))
    monkeypatch.setenv(ENV_VAR, json.dumps({"replay": str(path)}))
    # Root at output #1 (11): depths 1, 2, 3 should get outputs #2, #3, #4.
    # Level 1: nodes 0, 1 (children of the root); level 2: nodes 2, 3 under
    # node 1 and node 4 under node 0; level 3: node 5 under node 3.
    parents = torch.tensor([[-1, -1, 1, 1, 0, 3]])
    tokens = torch.tensor([[12, 500, 501, 13, 502, 503]])  # 12 and 13 drafted already
    beam = BeamTree(DraftTree.from_parents(tokens, parents), torch.zeros(1, 6), None)
    got = TestProposer.from_env().override_tree(beam, _runner([5, 6, 7]), torch.tensor([4]),
                                                torch.tensor([11])).tree.tokens
    # depth 1 (#2 = 12): both level-1 nodes have children; index 2 picks node 0.
    # depth 2 (#3 = 13): node 0's only child, node 4, a leaf (node 3 is on
    # another branch and may keep 13).
    assert got.tolist() == [[12, 500, 501, 13, 13, 503]]
    # One output later the path takes the second branch: nodes 1, 3, 5.
    got = TestProposer.from_env().override_tree(beam, _runner([5, 6, 7]), torch.tensor([5]),
                                                torch.tensor([12])).tree.tokens
    assert got.tolist() == [[12, 13, 501, 14, 502, 15]]

    monkeypatch.setenv(ENV_VAR, json.dumps({"replay": str(path), "corrupt_every": 2}))
    got = TestProposer.from_env().override_tree(beam, _runner([5, 6, 7]), torch.tensor([4]),
                                                torch.tensor([11])).tree.tokens
    # output #2 is corrupted: no child of the root carries 12 any more.
    assert got.tolist() == [[13, 500, 501, 13, 502, 503]]
