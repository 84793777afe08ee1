"""The exact distribution of the second generated token, and how far samples may stray.

Shared by the sampled losslessness tests (chains and trees). The first token
after the prompt comes from prefill; the second is the first one emitted by
speculative verification. For a fixed prompt, P(t2) = sum_t1 P(t1) P(t2 | t1)
is computed from the target with transformers in float64 over the most likely
first tokens. Tokens are grouped into the ``BUCKETS`` most likely ones plus
"any other" (the statistic measures the head of the distribution, not tail
noise); the acceptance bound is the 99.9th percentile of the total-variation
distance that N exact samples reach over those buckets (Monte Carlo), so a test
fails for a biased sampler and passes for a correct one except with
probability 1e-3.
"""

from __future__ import annotations

import json

import numpy as np
import torch

TEMPERATURE = 1.0
PROMPT = "Once upon a time, in a small village by the sea,"
TOP_FIRST_TOKENS = 48  # first tokens enumerated exactly; their mass is checked
BUCKETS = 24  # most likely second tokens compared one by one; the rest pooled


def exact_second_token_distribution(target_dir, prompt_ids):
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


def bucket(probabilities: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Probabilities of the `head` tokens, then of everything else."""
    return np.append(probabilities[head], max(0.0, 1.0 - probabilities[head].sum()))


def tv_quantile(p: np.ndarray, n: int, q: float = 0.999, trials: int = 4000) -> float:
    rng = np.random.default_rng(0)
    counts = rng.multinomial(n, p, size=trials)
    return float(np.quantile(0.5 * np.abs(counts / n - p).sum(1), q))


def assert_follows(token_ids: list[list[int]], exact: np.ndarray, first_tokens: set[int],
                   num_samples: int) -> None:
    """The second tokens of the samples ``token_ids`` follow ``exact``."""
    # Condition on the enumerated first tokens (the exact marginal does too).
    seconds = [ids[1] for ids in token_ids if ids[0] in first_tokens]
    assert len(seconds) > 0.5 * num_samples
    empirical = np.bincount(seconds, minlength=len(exact)) / len(seconds)
    head = np.argsort(exact)[::-1][:BUCKETS]
    exact_buckets, empirical_buckets = bucket(exact, head), bucket(empirical, head)
    tv = 0.5 * np.abs(empirical_buckets - exact_buckets).sum()
    bound = tv_quantile(exact_buckets / exact_buckets.sum(), len(seconds))
    print(json.dumps({"tv": tv, "bound": bound, "n": len(seconds)}))
    assert tv < bound


def assert_speculation_keeps_distribution(tmp_path, target_dir, tokenizer,
                                          speculative_config: dict,
                                          num_samples: int = 1500) -> None:
    """Seeded samples of the first two tokens under ``speculative_config``
    follow the target's exact distribution (and speculation did run)."""
    from .conftest import run_engine_job

    prompt_ids = tokenizer(PROMPT)["input_ids"]
    exact, first_tokens, covered = exact_second_token_distribution(target_dir, prompt_ids)
    assert covered > 0.6, "enumerated first tokens must carry most of the mass"
    result = run_engine_job(tmp_path, {
        "model": str(target_dir), "max_tokens": 2, "max_num_seqs": 128,
        "max_model_len": 512, "speculative_config": speculative_config,
        "phases": [{"name": "s", "mode": "seeded", "prompt": prompt_ids,
                    "num_samples": num_samples, "temperature": TEMPERATURE,
                    "max_tokens": 2}],
    })
    phase = result["phases"]["s"]
    assert phase["counters"]["vllm:spec_decode_num_draft_tokens"] > 0
    assert_follows(phase["token_ids"], exact, first_tokens, num_samples)
