"""``vllm-longspec train --layout published``: the trained draft in the reference
code's layout, and back to ours by resuming the finished run."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from tests.published_drafts import glide_layer_shapes
from vllm_longspec.cli import main
from vllm_longspec.model.checkpoint import read_draft_checkpoint
from vllm_longspec.train.tiny_target import save_tiny_llama
from vllm_longspec.train.trainer_checkpoint import checkpoint_path, load_checkpoint


def _config_file(root, output, **overrides):
    if not (root / "target").is_dir():
        save_tiny_llama(root / "target")
        tokens = np.random.default_rng(0).integers(0, 256, 5_000).astype(np.uint32)
        np.save(root / "tokens.npy", tokens)
    stage = {"name": "s", "sources": [{"type": "tokens", "paths": [str(root / "tokens.npy")]}],
             "seq_len": 48, "batch_tokens": 96, "grad_accum": 1, "steps": 2, "lr": 3e-3}
    raw = {"target": str(root / "target"), "output_dir": str(root / output),
           "loss_chunk_rows": 32, "exclude_list_file": None, "num_threads": 1,
           "stages": [stage], **overrides}
    path = root / f"{output}.json"
    path.write_text(json.dumps(raw))
    return path


def test_export_published_then_ours_by_resuming(tmp_path):
    config_file = _config_file(tmp_path, "run")
    assert main(["train", "--config", str(config_file), "--layout", "published"]) == 0
    draft_dir = tmp_path / "run" / "draft"
    target_config = json.loads((tmp_path / "target" / "config.json").read_text())
    written = json.loads((draft_dir / "config.json").read_text())
    assert written == {**target_config, "architectures": ["LlamaGlideDecoderLayer"]}
    tensors = load_file(str(draft_dir / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == glide_layer_shapes(
        target_config)
    trained = load_checkpoint(checkpoint_path(tmp_path / "run"))["draft"]
    for name, value in trained.items():
        assert torch.equal(tensors[name], value), name
    assert read_draft_checkpoint(draft_dir).layout == "published"

    # A finished run resumed only exports again.
    assert main(["train", "--config", str(config_file), "--resume"]) == 0
    draft = read_draft_checkpoint(draft_dir)
    assert draft.layout == "longspec"
    assert draft.longspec["trained"]["steps"] == 2
    tensors = load_file(str(draft_dir / "model.safetensors"))
    assert set(tensors) == set(trained)
    assert all(torch.equal(tensors[name], value) for name, value in trained.items())


def test_published_layout_refused_before_training(tmp_path, capsys):
    config_file = _config_file(tmp_path, "window", sliding_window=256)
    assert main(["train", "--config", str(config_file), "--layout", "published"]) == 2
    assert "trained with 256" in capsys.readouterr().err
    assert not checkpoint_path(tmp_path / "window").exists()
