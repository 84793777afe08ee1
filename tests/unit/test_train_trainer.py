"""The trainer on a tiny random Llama: exact resume, export, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vllm_longspec.model.checkpoint import (
    check_draft_matches_target,
    read_draft_checkpoint,
)
from vllm_longspec.train.config import config_from_dict
from vllm_longspec.train.model import LongSpecDraft, draft_logits
from vllm_longspec.train.target import load_target, read_target_config, run_target
from vllm_longspec.train.tiny_target import save_tiny_llama
from vllm_longspec.train.trainer import Trainer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    save_tiny_llama(root / "target")
    tokens = np.random.default_rng(0).integers(0, 256, 30_000).astype(np.uint32)
    np.save(root / "tokens.npy", tokens)
    return root


def _config(root: Path, output: str, **overrides) -> dict:
    stage = {
        "name": "short", "sources": [{"type": "tokens", "paths": [str(root / "tokens.npy")]}],
        "seq_len": 48, "batch_tokens": 192, "grad_accum": 2, "steps": 4, "lr": 3e-3,
    }
    raw = {
        "target": str(root / "target"), "output_dir": str(root / output),
        "checkpoint_every": 2, "loss_chunk_rows": 32, "exclude_list_file": None,
        "num_threads": 1,
        "stages": [stage, {**stage, "name": "long", "seq_len": 96, "aoi": False,
                           "steps": 2, "lr": 1e-3}],
    }
    return {**raw, **overrides}


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.draft.state_dict().items()}


def test_resume_is_exact_and_export_round_trips(workspace):
    straight = Trainer(config_from_dict(_config(workspace, "straight")))
    straight_dir = straight.run()
    # 3 steps, "crash", resume in a new trainer, finish (crosses the stage edge)
    config = config_from_dict(_config(workspace, "resumed"))
    assert Trainer(config).run(max_steps=3) is None
    resumed = Trainer(config, resume=True)
    assert resumed.progress.global_step == 3
    resumed_dir = resumed.run()

    straight_weights, resumed_weights = _weights(straight), _weights(resumed)
    assert all(torch.equal(straight_weights[k], resumed_weights[k])
               for k in straight_weights)
    initial = LongSpecDraft(read_target_config(workspace / "target"), 512).state_dict()
    assert not torch.equal(straight_weights["mlp.up_proj.weight"],
                           initial["mlp.up_proj.weight"])  # it did train
    losses = [json.loads(line)["loss"] for line in
              (workspace / "straight" / "metrics.jsonl").read_text().splitlines()]
    resumed_losses = [json.loads(line)["loss"] for line in
                      (workspace / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses == resumed_losses
    assert (workspace / "resumed" / "loss_curve.png").stat().st_size > 0
    assert sorted(p.name for p in (workspace / "resumed").iterdir()) == [
        "checkpoint-last.pt", "draft", "loss_curve.png", "metrics.jsonl"]

    # export: the serving side reads it and accepts it for this target
    from transformers import AutoConfig

    draft_info = read_draft_checkpoint(resumed_dir)
    check_draft_matches_target(draft_info, AutoConfig.from_pretrained(workspace / "target"))
    assert draft_info.sliding_window == 512
    assert draft_info.longspec["trained"]["steps"] == 6
    assert Path(straight_dir).is_dir()

    # the exported tensors load back into the training model: identical logits
    target_config = read_target_config(workspace / "target")
    reloaded = LongSpecDraft(target_config, draft_info.sliding_window)
    reloaded.load_state_dict(load_file(resumed_dir / "model.safetensors"))
    target = load_target(workspace / "target", torch.float32)
    input_ids = torch.randint(0, 256, (2, 40))
    positions = torch.arange(40).expand(2, 40) + 7
    out = run_target(target, input_ids, positions)
    args = (out.embeddings, positions, out.last_keys, out.last_values, 2)
    head = target.lm_head.weight
    assert torch.equal(draft_logits(reloaded(*args), head),
                       draft_logits(resumed.draft(*args), head))


def test_an_existing_run_is_not_overwritten(workspace):
    config = config_from_dict(_config(workspace, "exists"))
    Trainer(config).run(max_steps=1)
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(config)


def test_cli_train_and_resume(workspace, capsys):
    from vllm_longspec.cli import main

    raw = _config(workspace, "cli", distill_weight=0.5)
    config_file = workspace / "cli.json"
    config_file.write_text(json.dumps(raw))
    point = workspace / "cli-step-2"
    assert main(["train", "--config", str(config_file), "--export-checkpoint",
                 str(point)]) == 2   # nothing to export yet
    assert "no checkpoint-last.pt" in capsys.readouterr().err
    assert main(["train", "--config", str(config_file), "--max-steps", "2"]) == 0
    assert "--resume" in capsys.readouterr().out
    assert main(["train", "--config", str(config_file), "--export-checkpoint",
                 str(point)]) == 0
    assert json.loads((point / "config.json").read_text())["longspec"]["trained"][
        "steps"] == 2
    assert not (workspace / "cli" / "draft").exists()
    assert main(["train", "--config", str(config_file), "--resume"]) == 0
    assert (workspace / "cli" / "draft" / "model.safetensors").is_file()
    records = [json.loads(line) for line in
               (workspace / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["kl"] > 0 for r in records)  # distillation was on
    bad = workspace / "bad.json"
    bad.write_text(json.dumps({**raw, "typo": 1}))
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown key 'typo'" in capsys.readouterr().err


def test_init_from_fine_tunes_an_exported_draft(workspace):
    from vllm_longspec.model.checkpoint import DraftCheckpointError

    source = Trainer(config_from_dict(_config(workspace, "source"))).run()
    exported = {k: v for k, v in load_file(source / "model.safetensors").items()}
    tuned = Trainer(config_from_dict(_config(workspace, "tuned", init_from=str(source))))
    assert all(torch.equal(tuned.draft.state_dict()[k], exported[k]) for k in exported)
    fresh = Trainer(config_from_dict(_config(workspace, "fresh")))
    assert not torch.equal(fresh.draft.state_dict()["mlp.up_proj.weight"],
                           exported["mlp.up_proj.weight"])

    # a draft whose sizes belong to another target is refused, by name
    save_tiny_llama(workspace / "wide", hidden_size=96)
    with pytest.raises(DraftCheckpointError, match="another target"):
        Trainer(config_from_dict(_config(workspace, "wrong", init_from=str(source),
                                         target=str(workspace / "wide"))))


def test_init_from_target_layer_copies_the_layer_and_trains_from_it(workspace):
    from vllm_longspec.train.init_from_target import LINEAR_SOURCES, NORM_SOURCES

    target = load_target(workspace / "target", torch.float32)
    last = dict(target.model.layers[-1].named_parameters())
    # the weights come from the target as loaded (target_dtype): float32 keeps them exact
    config = config_from_dict(_config(workspace, "from-layer", init_from_target_layer=-1,
                                      target_dtype="float32"))
    trainer = Trainer(config)
    start = _weights(trainer)
    for draft_name, target_name in LINEAR_SOURCES.items():
        assert torch.equal(start[f"{draft_name}.weight"], last[f"{target_name}.weight"])
        if f"{draft_name}.bias" in start:  # Llama has no attention biases: zeros
            assert not torch.any(start[f"{draft_name}.bias"])
    for draft_name, target_name in NORM_SOURCES.items():
        assert torch.equal(start[f"{draft_name}.weight"], last[f"{target_name}.weight"])
    # the cross-attention asks the last layer's K/V with that layer's own queries
    assert torch.equal(start["cross_attn.q_proj.weight"], start["self_attn.q_proj.weight"])
    # another layer index lands another layer (the tiny target's first)
    first = Trainer(config_from_dict(_config(workspace, "from-first",
                                             init_from_target_layer=0,
                                             target_dtype="float32")))
    assert torch.equal(first.draft.state_dict()["mlp.up_proj.weight"],
                       target.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(first.draft.state_dict()["mlp.up_proj.weight"],
                           start["mlp.up_proj.weight"])

    # training starts from these weights: one step moves them only by an AdamW step
    trainer.run(max_steps=1)
    after = _weights(trainer)
    step = (after["mlp.up_proj.weight"] - start["mlp.up_proj.weight"]).abs().max()
    assert 0 < step <= 2 * config.stages[0].lr
    draft_dir = Trainer(config, resume=True).run()
    summary = json.loads((draft_dir / "config.json").read_text())["longspec"]["trained"]
    assert summary["init"] == "target-layer:-1"


def test_init_from_target_layer_is_validated(workspace):
    from vllm_longspec.train.config import TrainConfigError

    with pytest.raises(TrainConfigError, match="set one of them"):
        config_from_dict(_config(workspace, "both", init_from="somewhere",
                                 init_from_target_layer=-1))
    with pytest.raises(TrainConfigError, match="layer index"):
        config_from_dict(_config(workspace, "bad", init_from_target_layer="last"))
    with pytest.raises(ValueError, match="has 2 decoder layers"):
        Trainer(config_from_dict(_config(workspace, "far", init_from_target_layer=2)))


def test_loss_on_all_trains_on_the_prompts_of_distill_records(workspace, monkeypatch):
    """A distill record's prompt is context by default; loss_on "all" puts a loss
    on every position (the packed sequences are the same either way)."""
    # token-id records need no tokenizer, and the tiny target has none
    monkeypatch.setattr("vllm_longspec.train.data.needs_tokenizer", lambda sources: False)
    rng = np.random.default_rng(1)
    with (workspace / "distill.jsonl").open("w") as f:
        for _ in range(40):
            f.write(json.dumps({"prompt_token_ids": rng.integers(0, 256, 40).tolist(),
                                "output_token_ids": rng.integers(0, 256, 8).tolist()})
                    + "\n")
    loss_tokens = {}
    for loss_on in ("source", "all"):
        stage = {"name": "d", "sources": [{"type": "jsonl",
                                           "paths": [str(workspace / "distill.jsonl")]}],
                 "seq_len": 48, "batch_tokens": 96, "grad_accum": 1, "steps": 1,
                 "loss_on": loss_on}
        Trainer(config_from_dict(_config(workspace, f"loss-on-{loss_on}",
                                         stages=[stage]))).run()
        metrics = (workspace / f"loss-on-{loss_on}" / "metrics.jsonl").read_text()
        loss_tokens[loss_on] = json.loads(metrics.splitlines()[0])["loss_tokens"]
    assert loss_tokens["all"] == 2 * 47  # two sequences, every position but the last
    assert 0 < loss_tokens["source"] <= 2 * 9  # the 8 answer tokens of each record
