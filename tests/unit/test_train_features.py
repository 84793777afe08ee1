"""The target-feature cache: keys before RoPE re-rotate to any pure shift, a step
from the cache equals a step with the target live, builds resume per shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vllm_longspec.train.config import config_from_dict
from vllm_longspec.train.features import (
    CachedStream,
    FeatureCache,
    FeatureCacheError,
    FeatureSpec,
    pure_shift,
)
from vllm_longspec.train.features_build import build_features
from vllm_longspec.train.model import new_draft
from vllm_longspec.train.positions import anchored_position_ids
from vllm_longspec.train.step import (
    MicroBatch,
    live_features,
    micro_batch_loss,
    rotate_target_keys,
)
from vllm_longspec.train.target import (
    lm_head_weight,
    load_target,
    read_target_config,
    run_target,
    teacher_top_k,
)
from vllm_longspec.train.tiny_target import save_tiny_llama
from vllm_longspec.train.trainer import Trainer
from vllm_longspec.train.vocab_map import VocabMap

SEQ_LEN = 24


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    save_tiny_llama(root / "target")
    tokens = np.random.default_rng(0).integers(0, 256, 2_000).astype(np.uint32)
    np.save(root / "tokens.npy", tokens)
    np.save(root / "vocab.npy", np.arange(0, 256, 2))  # even ids only
    return root


def _config(root: Path, features: str | None, stage_overrides: dict | None = None,
            **overrides):
    stage = {"name": "s", "sources": [{"type": "tokens", "paths": [str(root / "tokens.npy")]}],
             "seq_len": SEQ_LEN, "batch_tokens": 2 * SEQ_LEN, "steps": 4, "lr": 3e-3,
             "features": features, **(stage_overrides or {})}
    raw = {"target": str(root / "target"), "output_dir": str(root / "run"),
           "exclude_list_file": None, "num_threads": 1, "target_dtype": "float32",
           "loss_chunk_rows": 16, "distill_weight": 0.5, "distill_top_k": 8,
           "draft_vocab": str(root / "vocab.npy"), "stages": [stage]}
    return config_from_dict({**raw, **overrides})


@pytest.fixture(scope="module")
def cache_dir(workspace):
    out = workspace / "cache"
    build_features(_config(workspace, str(out)), "s", num_sequences=6, top_k=16,
                   shard_sequences=4, batch_size=3)
    return out


def test_unrotated_keys_rotate_to_the_live_keys_at_any_pure_shift(workspace):
    """RoPE is relative: the target's K before RoPE and V at positions P + d are
    those at P; rotating the former at P + d gives the live keys at P + d."""
    target = load_target(workspace / "target", torch.float32)
    draft = new_draft(read_target_config(workspace / "target"), 512, seed=0)
    input_ids = torch.randint(0, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    positions = anchored_position_ids(torch.tensor([3, 0]), torch.tensor([700, 90]), SEQ_LEN)
    base = run_target(target, input_ids, positions, need_final_hidden=True)
    shifted_positions = positions + torch.tensor([[1000], [57]])
    shifted = run_target(target, input_ids, shifted_positions, need_final_hidden=True)

    rotated = rotate_target_keys(draft, base.last_keys_unrotated, shifted_positions)
    torch.testing.assert_close(rotated, shifted.last_keys, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(base.last_values, shifted.last_values, rtol=1e-4, atol=1e-4)
    head = lm_head_weight(target)
    assert torch.equal(teacher_top_k(base.final_hidden, head, 5)[1],
                       teacher_top_k(shifted.final_hidden, head, 5)[1])
    # the unrotated keys are the ones the target's attention rotated
    rotated_here = rotate_target_keys(draft, base.last_keys_unrotated, positions)
    torch.testing.assert_close(rotated_here, base.last_keys, rtol=1e-5, atol=1e-5)
    # anchors are not a pure shift: another anchor pattern changes K before RoPE,
    # which is why each cached sequence keeps its anchor draw
    moved_anchors = anchored_position_ids(torch.tensor([1, 2]), torch.tensor([700, 90]),
                                          SEQ_LEN)
    other = run_target(target, input_ids, moved_anchors).last_keys_unrotated
    assert (other - base.last_keys_unrotated).abs().max() > 1e-3


def test_pure_shift_keeps_relative_positions_within_range():
    # the last row already reaches position 2047: it has no room to move
    positions = anchored_position_ids(torch.tensor([2, 0, 4]), torch.tensor([5, 0, 2032]), 16)
    shifts = set()
    for seed in range(30):
        shifted = pure_shift(positions, 2048, torch.Generator().manual_seed(seed))
        delta = shifted - positions
        assert (delta == delta[:, :1]).all() and (delta >= 0).all()
        assert shifted.max() <= 2047 and delta[2, 0] == 0
        shifts.add(int(delta[0, 0]))
    assert len(shifts) > 20  # a fresh shift each time


def _loss_and_grads(draft, target, micro_batch, features, vocab, head):
    draft.zero_grad(set_to_none=True)
    loss, stats = micro_batch_loss(
        draft, target, micro_batch, features, 2 * (SEQ_LEN - 1), vocab, head,
        distill_weight=0.5, distill_top_k=8, chunk_rows=16, autocast_dtype=None)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in draft.named_parameters()}, stats


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_step_from_the_cache_equals_one_step_with_the_target_live(
        workspace, dtype, tmp_path):
    """Same micro-batch (cached sequences at their AOI positions + a pure shift):
    loss and every gradient from cached features == from a live target forward.
    float32: to rounding; bfloat16: the live target at the shifted positions
    rounds differently, so within bf16 tolerance."""
    out = tmp_path / "cache"
    config = _config(workspace, str(out), target_dtype=dtype)
    build_features(config, "s", num_sequences=2, top_k=16, shard_sequences=2)
    target = load_target(workspace / "target", getattr(torch, dtype))
    target_config = read_target_config(workspace / "target")
    draft = new_draft(target_config, 8, seed=0)
    vocab = VocabMap.build(256, np.arange(0, 256, 2))
    head = vocab.head(lm_head_weight(target))

    cached = CachedStream(FeatureCache(out), seed=0, stage=0).next_batch(2)
    positions = pure_shift(cached.position_ids, 2048, torch.Generator().manual_seed(3))
    assert (positions != cached.position_ids).all()
    micro_batch = MicroBatch(cached.input_ids, cached.loss_mask, positions, noise_shift=2)
    loss_cached, grads_cached, stats = _loss_and_grads(
        draft, target, micro_batch, cached.features, vocab, head)
    live = live_features(target, micro_batch, "top_k", 16)
    loss_live, grads_live, _ = _loss_and_grads(draft, target, micro_batch, live, vocab, head)

    tolerance = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]  # measured: 5e-7, 6e-3
    torch.testing.assert_close(loss_cached, loss_live, rtol=tolerance, atol=tolerance)
    for name, grad in grads_live.items():
        scale = grad.abs().max().clamp(min=1e-6)
        assert (grads_cached[name] - grad).abs().max() / scale < tolerance, name
    assert stats[4] > 0 and stats[1] > 0  # odd labels were dropped; KL ran


def test_build_resumes_at_the_next_unwritten_shard(workspace, cache_dir, tmp_path):
    out = tmp_path / "cache"
    config = _config(workspace, str(out))
    partial = build_features(config, "s", num_sequences=6, top_k=16, shard_sequences=4,
                             batch_size=3, max_shards=1)
    assert [s["sequences"] for s in partial.shards] == [4] and not partial.complete
    with pytest.raises(FeatureCacheError, match="incomplete"):
        FeatureCache(out)
    (out / ".shard-00001.safetensors.crashed").write_bytes(b"torn")  # a crash mid-shard
    finished = build_features(config, "s", num_sequences=6, top_k=16, shard_sequences=4,
                              batch_size=3)
    assert [s["sequences"] for s in finished.shards] == [4, 2] and finished.complete
    assert not list(out.glob(".shard-*"))
    for shard in ("shard-00000.safetensors", "shard-00001.safetensors"):
        resumed, straight = load_file(out / shard), load_file(cache_dir / shard)
        assert resumed.keys() == straight.keys()
        assert all(torch.equal(resumed[k], straight[k]) for k in straight), shard
    with pytest.raises(FeatureCacheError, match="top_k"):
        build_features(config, "s", num_sequences=6, top_k=4, shard_sequences=4)


def test_a_larger_count_extends_a_cache_with_the_same_stream(workspace, cache_dir,
                                                             tmp_path):
    out = tmp_path / "cache"
    config = _config(workspace, str(out))
    build_features(config, "s", num_sequences=3, top_k=16, shard_sequences=4, batch_size=3)
    extended = build_features(config, "s", num_sequences=6, top_k=16, shard_sequences=4,
                              batch_size=3)
    assert [s["sequences"] for s in extended.shards] == [3, 3] and extended.complete
    grown, straight = FeatureCache(out), FeatureCache(cache_dir)
    assert len(grown) == len(straight) == 6
    for name, tensor in straight.sequences(list(range(6))).items():
        assert torch.equal(grown.sequences(list(range(6)))[name], tensor), name
    with pytest.raises(FeatureCacheError, match="num_sequences"):
        build_features(config, "s", num_sequences=4, top_k=16, shard_sequences=4)


def test_cache_holds_the_stage_stream_and_its_features(workspace, cache_dir):
    cache = FeatureCache(cache_dir)
    stored = cache.sequences(list(range(6)))
    tokens = np.load(workspace / "tokens.npy")
    # the stage's packed stream: the first six sequences of its first epoch,
    # documents being 8192-token pieces (this file is one piece)
    assert stored["input_ids"].shape == (6, SEQ_LEN) and stored["keys"].shape == (6, 2,
                                                                                   SEQ_LEN, 16)
    assert np.isin(stored["input_ids"].numpy(), tokens).all()
    assert torch.equal(stored["input_ids"][0].long(), torch.from_numpy(tokens[:SEQ_LEN]
                                                                        .astype(np.int64)))
    assert stored["top_k_logits"].shape == (6, SEQ_LEN, 16)
    # logits largest first; anchors/offsets are AOI draws, fixed per sequence
    assert (stored["top_k_logits"][..., :-1] >= stored["top_k_logits"][..., 1:]).all()
    assert (stored["anchors"] <= 4).all() and (stored["offsets"] <= 2048 - SEQ_LEN).all()
    assert len(set(stored["offsets"].tolist())) > 1
    index = json.loads((cache_dir / "index.json").read_text())
    assert index["spec"]["seq_len"] == SEQ_LEN and len(index["shards"]) == 2


def test_cached_stream_visits_every_sequence_each_epoch_and_resumes(cache_dir):
    cache = FeatureCache(cache_dir)
    stream = CachedStream(cache, seed=0, stage=0)
    first = [stream.next_batch(1).input_ids for _ in range(6)]
    all_ids = cache.sequences(list(range(6)))["input_ids"].long()
    assert sorted(map(tuple, torch.cat(first).tolist())) == sorted(map(tuple, all_ids.tolist()))
    stream.next_batch(2)
    state = stream.state_dict()
    assert state == {"epoch": 1, "cursor": 2}
    expected = stream.next_batch(3).input_ids
    resumed = CachedStream(cache, seed=0, stage=0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch(3).input_ids, expected)


def test_trainer_from_the_cache_resumes_exactly_and_exports_the_draft_vocab(
        workspace, cache_dir):
    def config(name):
        return _config(workspace, str(cache_dir), output_dir=str(workspace / name))

    straight = Trainer(config("straight"))
    draft_dir = straight.run()
    assert Trainer(config("resumed")).run(max_steps=2) is None
    resumed = Trainer(config("resumed"), resume=True)
    resumed.run()
    resumed_state = resumed.draft.state_dict()
    assert all(torch.equal(t, resumed_state[k]) for k, t in straight.draft.state_dict().items())
    records = [json.loads(line) for line in
               (workspace / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["kl"] > 0 and r["outside_vocab"] > 0 for r in records)

    from vllm_longspec.model.checkpoint import read_draft_checkpoint

    exported = load_file(draft_dir / "model.safetensors")
    assert torch.equal(exported["draft_vocab"], torch.arange(0, 256, 2))
    assert read_draft_checkpoint(draft_dir).draft_vocab_size == 128


def test_a_cache_that_does_not_fit_the_stage_is_refused(workspace, cache_dir):
    with pytest.raises(FeatureCacheError, match="seq_len: cache 24, stage 48"):
        Trainer(_config(workspace, str(cache_dir),
                        {"seq_len": 2 * SEQ_LEN, "batch_tokens": 2 * SEQ_LEN}))
    with pytest.raises(FeatureCacheError, match="aoi: cache True, stage False"):
        Trainer(_config(workspace, str(cache_dir), {"aoi": False}))
    with pytest.raises(FeatureCacheError, match="top_k: cache 16, distill_top_k 32"):
        Trainer(_config(workspace, str(cache_dir), distill_top_k=32))
    with pytest.raises(FeatureCacheError, match="no feature cache"):
        Trainer(_config(workspace, str(workspace / "missing")))


def test_features_cli_builds_and_reports(workspace, tmp_path, capsys):
    from vllm_longspec.cli import main

    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps(_config(workspace, None).to_dict()))
    out = tmp_path / "cli-cache"
    assert main(["features", "build", "--config", str(config_file), "--stage", "s",
                 "--out", str(out), "--sequences", "1", "--top-k", "0"]) == 0
    assert str(out) in capsys.readouterr().out
    assert main(["features", "info", str(out)]) == 0
    assert "1 of 1 sequences" in capsys.readouterr().out
    assert "top_k_logits" not in load_file(out / "shard-00000.safetensors")
    assert main(["features", "build", "--config", str(config_file), "--stage", "x"]) == 2


def test_a_source_under_home_is_one_spec_written_either_way(tmp_path, monkeypatch):
    """A cache built from "/home/u/d.jsonl" serves a config that says "~/d.jsonl"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    specs = []
    for path in ("~/d.jsonl", str(tmp_path / "d.jsonl")):
        config = config_from_dict({"stages": [{
            "name": "s", "sources": [{"type": "jsonl", "paths": [path]}], "steps": 1}]})
        specs.append(FeatureSpec.for_stage(config, 0, tmp_path / "target",
                                           {"max_position_embeddings": 2048}))
    assert specs[0] == specs[1]
    assert specs[0].sources[0]["paths"] == [str(tmp_path / "d.jsonl")]
