"""The throughput bench's cached mode runs the real trainer on cache epochs."""

from __future__ import annotations

import json

import torch

from vllm_longspec.train.bench import main
from vllm_longspec.train.tiny_target import save_tiny_llama


def test_cached_bench_reports_trainer_steps(tmp_path, capsys):
    threads = torch.get_num_threads()
    target = save_tiny_llama(tmp_path / "target")
    prefix = tmp_path / "out" / "tp"
    try:
        assert main(["--cached", "--target", str(target), "--seq-len", "32", "--steps", "3",
                     "--cache-sequences", "2", "--draft-vocab", "none", "--threads", "1",
                     "--write", str(prefix)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(prefix.with_suffix(".json").read_text())
    assert result["mode"] == "cached" and result["timed_steps"] == 3
    assert result["epochs_over_cache"] == 2.0  # 1 warm-up + 3 steps over 2 sequences
    # tokens per step / mean timed step; step_seconds are rounded to 1 ms, so
    # the true mean is within 0.5 ms of theirs (steps here take a few ms)
    mean = sum(result["step_seconds"]) / 3
    assert 32 / (mean + 0.0005) <= result["tokens_per_s"] <= 32 / max(mean - 0.0005, 1e-4)
    assert "training tokens/s" in prefix.with_suffix(".md").read_text()
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["draft_vocab"] == 256
