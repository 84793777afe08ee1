"""The training-side draft and the vLLM-side draft compute the same logits.

One engine run records, for its first drafting rounds, the logits the vLLM
draft produced at every drafting step (``DraftRecorder``). The training-side
``LongSpecDraft`` with the same weights, fed the same tokens and the target's
last-layer K/V from transformers, must reproduce them: draft step k of a round
whose bonus token sits at position c reads target positions <= c-1, which is
the training model's noise shift j = k + 1 at row c + k.

The draft's writers are scaled up (std 0.1) so that its self- and
cross-attention visibly move the logits; the test also checks that a wrong
noise shift gives different logits, so agreement is not an accident of a draft
that ignores the target cache. The draft carries a draft vocabulary (a random
half of the target's), so the same run checks that the vLLM draft's LM head
covers exactly those tokens.

Tree levels (node at depth d: position root + d, shift d + 1) are checked the
same way without an engine, in ``tests/unit/test_tree_draft_parity.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import run_engine_job

K = 3
ROUNDS = 6


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory, target_dir, target_config, long_prompts):
    from vllm_longspec.model.checkpoint import random_draft_state, save_draft
    from vllm_longspec.train.draft_vocab import write_draft_vocab

    state = random_draft_state(target_config, seed=3, std=0.1)
    draft_dir = save_draft(tmp_path_factory.mktemp("parity_draft"), state,
                           target_config, {"sliding_window": 512})
    vocab_size = target_config["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    draft_vocab = torch.randperm(vocab_size, generator=generator)[:vocab_size // 2].sort()
    write_draft_vocab(draft_dir, draft_vocab.values.numpy())
    record_dir = tmp_path_factory.mktemp("parity_rounds")
    prompt = long_prompts[3]  # 3.5k tokens: longer than the window, two prefill chunks
    result = run_engine_job(tmp_path_factory.mktemp("parity_job"), {
        "model": str(target_dir), "prompts": [prompt], "max_tokens": 24,
        "enable_prefix_caching": False,
        "speculative_config": {"method": "longspec", "model": str(draft_dir),
                               "num_speculative_tokens": K},
        "env": {"VLLM_LONGSPEC_RECORD_DRAFTS": json.dumps(
            {"dir": str(record_dir), "max_rounds": ROUNDS})},
        "phases": [{"name": "single", "mode": "single"}],
    })
    outputs = result["phases"]["single"]["token_ids"][0]
    rounds = [torch.load(path) for path in sorted(record_dir.glob("round-*.pt"))]
    return state, draft_vocab.values, prompt, outputs, rounds


class TrainingSide:
    """The training-side draft over one token sequence's target K/V (float32)."""

    def __init__(self, target_dir, target_config, state, sequence):
        from vllm_longspec.train.model import LongSpecDraft
        from vllm_longspec.train.target import lm_head_weight, load_target, run_target

        target = load_target(target_dir, torch.float32)
        self.draft = LongSpecDraft(target_config, sliding_window=512)
        self.draft.load_state_dict(state)
        self.embed = target.get_input_embeddings()
        self.lm_head = lm_head_weight(target).float()
        # Causal: the K/V at positions < c depend only on the committed tokens,
        # which every drafting round shares with the final sequence.
        self.target = run_target(target, torch.tensor([sequence]),
                                 torch.arange(len(sequence))[None])

    @torch.no_grad()
    def logits(self, tokens: list[int], row: int, shift: int) -> torch.Tensor:
        positions = torch.arange(len(tokens))[None]
        hidden = self.draft(self.embed(torch.tensor([tokens])), positions,
                            self.target.last_keys, self.target.last_values, shift)
        return hidden[0, row] @ self.lm_head.T


def test_draft_logits_match_training_model(parity_run, target_dir, target_config):
    state, draft_vocab, prompt, outputs, rounds = parity_run
    sequence = prompt + outputs
    decode_rounds = [r for r in rounds if int(r["committed_lens"][0]) >= len(prompt)]
    assert len(decode_rounds) >= 3, "too few decode rounds were recorded"
    training = TrainingSide(target_dir, target_config, state, sequence)
    errors, off_by_one = [], []
    for record in decode_rounds[:3]:
        assert record["prompt_token_ids"][0] == prompt
        committed = int(record["committed_lens"][0])  # position of the bonus token
        drafts = record["draft_token_ids"][0].tolist()
        for k in range(K):
            tokens = sequence[:committed + 1] + drafts[:k]
            full = record["logits"][k][0]
            assert torch.equal(torch.isfinite(full).nonzero()[:, 0], draft_vocab)
            vllm_logits = full[draft_vocab]
            scale = vllm_logits.abs().max()
            train_logits = training.logits(tokens, committed + k, k + 1)[draft_vocab]
            errors.append(float((vllm_logits - train_logits).abs().max() / scale))
            assert int(vllm_logits.argmax()) == int(train_logits.argmax())
            assert int(draft_vocab[vllm_logits.argmax()]) == drafts[k]
            # Letting the draft see one more (or one fewer) target position
            # must fit worse: the agreement is exact enough to pin visibility.
            off_by_one.append(min(
                float((vllm_logits - training.logits(tokens, committed + k, shift)[
                    draft_vocab]).abs().max() / scale)
                for shift in {k, k + 2} - {0}))
    print(f"relative logit error: max {max(errors):.2e}; "
          f"off-by-one visibility: min {min(off_by_one):.2e}")
    assert max(errors) < 1e-4
    assert all(e < 0.5 * o for e, o in zip(errors, off_by_one, strict=True))
