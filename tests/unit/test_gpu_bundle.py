"""Training on a lent GPU (train/gpu_bundle.py), exercised on CPU with a tiny
target: the parts, the device calls, the checks before unpacking, the time fit
and a whole timed run."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest

from vllm_longspec.model.checkpoint import read_draft_checkpoint
from vllm_longspec.train import gpu_bundle
from vllm_longspec.train.config import config_from_dict
from vllm_longspec.train.tiny_target import save_tiny_llama
from vllm_longspec.train.trainer import Trainer

PART_BYTES = 256 << 10


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_bundle")
    save_tiny_llama(root / "target")
    tokens = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint32)
    np.save(root / "tokens.npy", tokens)
    stage = {"name": "aoi", "sources": [{"type": "tokens", "paths": [str(root / "tok*.npy")]}],
             "seq_len": 48, "batch_tokens": 192, "grad_accum": 2, "tokens": 1920}
    config = {"target": str(root / "target"), "output_dir": str(root / "unused"),
              "exclude_list_file": None, "checkpoint_every": 4,
              "stages": [stage, {**stage, "name": "plain", "aoi": False, "tokens": 960}]}
    (root / "config.json").write_text(json.dumps(config))
    manifest = gpu_bundle.pack(root / "config.json", root / "bundle", PART_BYTES)
    return root, manifest


def test_pack_cuts_parts_and_points_the_config_into_the_bundle(packed):
    root, manifest = packed
    parts = manifest["parts"]
    assert len(parts) > 1 and all(p["bytes"] <= PART_BYTES for p in parts)
    assert sorted(p.name for p in (root / "bundle").iterdir()) == sorted(
        [p["name"] for p in parts] + ["manifest.json"])
    unpacked = gpu_bundle.unpack(root / "bundle")
    raw = json.loads((unpacked / "config.json").read_text())
    assert raw["target"] == "{bundle}/target" and raw["device"] == "cuda"
    (shipped,) = raw["stages"][0]["sources"][0]["paths"]
    assert shipped.startswith("{bundle}/data/") and shipped.endswith("tokens.npy")
    assert (unpacked / shipped.removeprefix("{bundle}/")).read_bytes() == (
        root / "tokens.npy").read_bytes()
    assert (unpacked / "target" / "model.safetensors").read_bytes() == (
        root / "target" / "model.safetensors").read_bytes()


def test_device_calls_carry_every_part_once_and_end_with_training(packed):
    _, manifest = packed
    calls = gpu_bundle.device_calls(manifest, minutes=7)
    carried = [path for call in calls for path in call["carry"]]
    assert sorted(carried) == sorted([f".gpu_bundle/{p['name']}" for p in manifest["parts"]]
                                     + [".gpu_bundle/manifest.json"])
    assert "smoke" in calls[0]["command"] and ".gpu_bundle/manifest.json" in calls[0]["carry"]
    assert " train .gpu_bundle --minutes 7 " in calls[-1]["command"]
    assert all(len(call["command"]) <= 2000 and len(call["carry"]) <= 8 for call in calls)


def test_unpack_names_missing_and_corrupt_parts(packed, tmp_path):
    root, manifest = packed
    bundle = tmp_path / "bundle"
    shutil.copytree(root / "bundle", bundle, ignore=shutil.ignore_patterns("unpacked"))
    (bundle / "part-00").unlink()
    (bundle / "part-01").write_bytes(b"not the part")
    with pytest.raises(gpu_bundle.BundleError, match=r"missing: \['part-00'\].*"
                       r"corrupt: \['part-01'\]"):
        gpu_bundle.unpack(bundle)


def test_pack_refuses_a_feature_cache(packed, tmp_path):
    root, _ = packed
    raw = json.loads((root / "config.json").read_text())
    raw["stages"][0]["features"] = str(tmp_path / "cache")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(gpu_bundle.BundleError, match="caches do not travel"):
        gpu_bundle.pack(tmp_path / "config.json", tmp_path / "bundle", PART_BYTES)


def test_fit_to_time_scales_every_stage_by_one_factor_at_most_one(packed):
    root, _ = packed
    config = config_from_dict(json.loads((root / "config.json").read_text()))
    # 1920 tokens at 1 ms + 960 at 2 ms = 3.84 s planned (10 + 5 steps of 192)
    def steps(seconds):
        fitted = gpu_bundle.fit_to_time(config, [1e-3, 2e-3], seconds)
        return [stage.num_steps for stage in fitted.stages]

    assert steps(1.92) == [5, 2]
    assert steps(100.0) == [10, 5]   # the config's budgets are the most
    assert steps(1e-3) == [1, 1]


def test_a_timed_run_trains_both_stages_and_delivers_the_draft(packed, tmp_path):
    root, _ = packed
    bundle = tmp_path / "bundle"
    shutil.copytree(root / "bundle", bundle)
    summary = gpu_bundle.train(bundle, tmp_path / "out", minutes=5, device="cpu",
                               margin_s=1.0)
    assert summary["finished"] and [s["steps"] for s in summary["stages"]] == [10, 5]
    assert summary["steps"] == 15 and summary["tokens"] == 15 * 192
    assert len(summary["calibrated_tokens_per_s"]) == 2
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl")
               .read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 16))
    assert read_draft_checkpoint(tmp_path / "out" / "draft") is not None
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_a_deadline_stops_after_the_step_that_crosses_it(packed, tmp_path):
    root, _ = packed
    raw = json.loads((root / "config.json").read_text())
    trainer = Trainer(config_from_dict({**raw, "output_dir": str(tmp_path / "run")}))
    assert trainer.run(max_seconds=0.0) is None
    assert trainer.progress.global_step == 1
    assert (tmp_path / "run" / "checkpoint-last.pt").is_file()


def test_smoke_runs_the_whole_path_on_a_tiny_target(tmp_path):
    summary = gpu_bundle.smoke(tmp_path, device="cpu", minutes=5)
    assert summary["finished"] and summary["steps"] == 16
    assert (tmp_path / "draft" / "model.safetensors").is_file()


def test_the_bundle_is_a_plain_tar(packed, tmp_path):
    root, manifest = packed
    whole = tmp_path / "whole.tar"
    with whole.open("wb") as out:
        for part in manifest["parts"]:
            out.write((root / "bundle" / part["name"]).read_bytes())
    with tarfile.open(whole) as tar:
        names = tar.getnames()
    assert names[0] == "config.json" and "target/config.json" in names
