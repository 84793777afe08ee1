"""benchmarks.learning_curve on a tiny target: stretches, exported points, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import learning_curve
from vllm_longspec.train.tiny_target import save_tiny_llama


def fake_evaluation(name, draft, directory):
    """The evaluation's fields, from the exported draft's own training summary."""
    trained = json.loads((Path(draft) / "config.json").read_text())["longspec"]["trained"]
    accepted = 1.0 + trained["steps"] / 10
    return {"sources": {"draft": {"tokens_per_round": accepted}},
            "acceptance_per_position": {"draft": [0.5, 0.4, 0.3, 0.2]},
            "by_task": {"code_completion": {"draft": accepted}},
            "command": f"evaluate {name}"}


@pytest.fixture
def config_file(tmp_path):
    save_tiny_llama(tmp_path / "target")
    np.save(tmp_path / "tokens.npy",
            np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint32))
    stage = {"name": "short", "sources": [{"type": "tokens",
                                           "paths": [str(tmp_path / "tokens.npy")]}],
             "seq_len": 48, "batch_tokens": 96, "grad_accum": 1, "steps": 5, "lr": 1e-3}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({
        "target": str(tmp_path / "target"), "output_dir": str(tmp_path / "run"),
        "checkpoint_every": 100, "loss_chunk_rows": 32, "exclude_list_file": None,
        "num_threads": 1, "stages": [stage]}))
    return path


def test_points_every_stretch_then_the_final_draft(config_file, tmp_path, monkeypatch):
    monkeypatch.setattr(learning_curve, "evaluate_draft", fake_evaluation)
    out = tmp_path / "curve"
    assert learning_curve.main(["--config", str(config_file), "--every", "2",
                                "--out", str(out)]) == 0
    points = json.loads((out / "curve.json").read_text())["points"]
    # stretches of 2 steps: exported at 2 and 4; the 5th step finishes the run
    assert [p["step"] for p in points] == [2, 4, 5]
    assert [p["tokens"] for p in points] == [192, 384, 480]
    assert [p["accepted_length"] for p in points] == pytest.approx([1.2, 1.4, 1.5])
    assert points[-1]["draft"] == str(tmp_path / "run" / "draft")
    assert all(p["train_seconds"] > 0 for p in points)
    assert (out / "curve.png").stat().st_size > 0
    assert "| 4 | 384 |" in (out / "curve.md").read_text()

    # a finished curve is read back, not redone
    monkeypatch.setattr(learning_curve, "run", lambda *a: pytest.fail("trained again"))
    assert learning_curve.main(["--config", str(config_file), "--every", "2",
                                "--out", str(out)]) == 0
    assert len(json.loads((out / "curve.json").read_text())["points"]) == 3
