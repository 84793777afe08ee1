"""Sampled LongSpec decoding keeps the target's output distribution.

The first token after the prompt comes from prefill; the second is the first
one emitted by speculative verification (an accepted draft, a token resampled
from the residual after a rejection, or the bonus token). For a fixed prompt
we draw it N times (one seeded request each) with LongSpec and compare its
empirical distribution with the exact marginal P(t2) = sum_t1 P(t1) P(t2 | t1)
computed from the target with transformers in float64. Tokens are grouped into
the 24 most likely ones plus "any other" (so the statistic measures the head
of the distribution, not tail noise); the acceptance bound is the 99.9th
percentile of the total-variation distance that N exact samples reach over
those buckets (Monte Carlo), so the test fails for a biased sampler and passes
for a correct one except with probability 1e-3.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from .conftest import run_engine_job

pytestmark = pytest.mark.e2e

NUM_SAMPLES = 1500
TEMPERATURE = 1.0
PROMPT = "Once upon a time, in a small village by the sea,"
TOP_FIRST_TOKENS = 48  # first tokens enumerated exactly; their mass is checked
BUCKETS = 24  # most likely second tokens compared one by one; the rest pooled


def _exact_second_token_distribution(target_dir, prompt_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt_ids])).logits[0, -1]
                              / TEMPERATURE, -1)
        top = torch.topk(first, TOP_FIRST_TOKENS)
        batch = torch.tensor([prompt_ids + [t] for t in top.indices.tolist()])
        second = torch.softmax(model(batch).logits[:, -1] / TEMPERATURE, -1)
    covered = float(top.values.sum())
    marginal = (top.values[:, None] * second).sum(0) / covered
    return marginal.numpy(), set(top.indices.tolist()), covered


def _bucket(probabilities: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Probabilities of the `head` tokens, then of everything else."""
    return np.append(probabilities[head], max(0.0, 1.0 - probabilities[head].sum()))


def _tv_quantile(p: np.ndarray, n: int, q: float = 0.999, trials: int = 4000) -> float:
    rng = np.random.default_rng(0)
    counts = rng.multinomial(n, p, size=trials)
    return float(np.quantile(0.5 * np.abs(counts / n - p).sum(1), q))


@pytest.mark.parametrize("draft_sample_method", ["probabilistic", "greedy"])
def test_second_token_follows_target_distribution(
        tmp_path, target_dir, tokenizer, random_draft_dir, draft_sample_method):
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    exact, first_tokens, covered = _exact_second_token_distribution(target_dir,
                                                                    prompt_ids)
    assert covered > 0.6, "enumerated first tokens must carry most of the mass"

    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "max_tokens": 2, "max_num_seqs": 128,
        "max_model_len": 512,
        "speculative_config": {"method": "longspec", "model": str(random_draft_dir),
                               "num_speculative_tokens": 3,
                               "draft_sample_method": draft_sample_method},
        "phases": [{"name": "s", "mode": "seeded", "prompt": prompt_ids,
                    "num_samples": NUM_SAMPLES, "temperature": TEMPERATURE,
                    "max_tokens": 2}],
    })
    phase = result["phases"]["s"]
    assert phase["counters"]["vllm:spec_decode_num_draft_tokens"] > 0
    # Condition on the enumerated first tokens (the exact marginal does too).
    seconds = [ids[1] for ids in phase["token_ids"] if ids[0] in first_tokens]
    assert len(seconds) > 0.5 * NUM_SAMPLES
    empirical = np.bincount(seconds, minlength=len(exact)) / len(seconds)
    head = np.argsort(exact)[::-1][:BUCKETS]
    exact_buckets, empirical_buckets = _bucket(exact, head), _bucket(empirical, head)
    tv = 0.5 * np.abs(empirical_buckets - exact_buckets).sum()
    bound = _tv_quantile(exact_buckets / exact_buckets.sum(), len(seconds))
    print(json.dumps({"tv": tv, "bound": bound, "n": len(seconds)}))
    assert tv < bound
