"""From a target model to a served draft: train, export, load in vLLM, decode.

A tiny random Llama target (head size 64, which vLLM's CPU attention supports),
a few trainer steps on token data, ``export()``, then vLLM with the exported
directory, restricted to a draft vocabulary, as the LongSpec draft: greedy
output must equal plain decoding token for token, and the draft must have been
run (speculative counters rise). (Drafts without a draft vocabulary, the
shipped one among them, serve in the other end-to-end tests.)
"""

from __future__ import annotations

import numpy as np

from .conftest import run_engine_job

TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=2048)


def test_trained_and_exported_draft_serves_losslessly(tmp_path):
    from vllm_longspec.train.config import config_from_dict
    from vllm_longspec.train.draft_vocab import choose_draft_vocab, write_draft_vocab
    from vllm_longspec.train.tiny_target import save_tiny_llama
    from vllm_longspec.train.trainer import Trainer

    target = save_tiny_llama(tmp_path / "target", **TINY)
    rng = np.random.default_rng(0)
    # A repeating corpus gives the draft something learnable in a few steps.
    motif = rng.integers(3, 256, 300)
    corpus = np.tile(motif, 80).astype(np.uint32)
    np.save(tmp_path / "tokens.npy", corpus)
    stage = {"name": "short", "seq_len": 256, "batch_tokens": 1024, "grad_accum": 1,
             "steps": 6, "lr": 3e-3,
             "sources": [{"type": "tokens", "paths": [str(tmp_path / "tokens.npy")]}]}
    trainer = Trainer(config_from_dict({
        "target": str(target), "output_dir": str(tmp_path / "run"),
        "exclude_list_file": None, "num_threads": 1, "loss_chunk_rows": 64,
        "stages": [stage],
    }))
    draft_dir = trainer.run()
    assert (draft_dir / "config.json").is_file()

    prompts = [rng.integers(3, 256, n).tolist() for n in (700, 1300)]
    job = {"model": str(target), "prompts": prompts, "max_tokens": 32,
           "ignore_eos": True, "max_model_len": 2048,
           "engine_args": {"skip_tokenizer_init": True},
           "phases": [{"name": "batch", "mode": "batch"}]}
    plain = run_engine_job(tmp_path / "plain", job)
    counts = np.bincount(corpus, minlength=256)
    write_draft_vocab(draft_dir, choose_draft_vocab(counts, size=128))
    restricted = run_engine_job(tmp_path / "restricted", {**job, "speculative_config": {
        "method": "longspec", "model": str(draft_dir), "num_speculative_tokens": 3}})
    assert (restricted["phases"]["batch"]["token_ids"]
            == plain["phases"]["batch"]["token_ids"])
    assert restricted["phases"]["batch"]["counters"]["vllm:spec_decode_num_drafts"] > 0
