"""The exact distribution of the second generated token, and how far samples may stray.

Shared by the sampled losslessness tests (chains and trees). The first token
after the prompt comes from prefill; the second is the first one emitted by
speculative verification. For a fixed prompt and sampling settings,
P(t2) = sum_t1 P(t1) P(t2 | t1) is computed from the target with transformers
in float64 over the most likely first tokens, each distribution filtered with
vLLM's own top-k / top-p function (its definition of the settings). Tokens are
grouped into the ``BUCKETS`` most likely ones plus "any other"; the acceptance
bound is the 99.9th percentile of the total-variation distance that N exact
samples reach over those buckets (Monte Carlo), so a correct sampler fails with
probability 1e-3. ``detectable_tv`` says how large a bias the test then catches
with 90% power (asserted <= ``MAX_DETECTABLE_TV``).

The acceptance path: an oracle (the replaying test proposer, fed the target's
likeliest second token after each likely first token) makes the first draft
right often. Its proposals are deterministic, so vLLM accepts one with the
target's probability of it: the observed acceptance rate must match that
exactly computed rate, which a bug confined to the acceptance branch breaks.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

# 132 tokens: its first block of 128 is a prefix-cache hit, so each of the
# thousands of sampled requests computes 4 prompt tokens (with the last sentence
# alone, 13, prefill cost about three times the verification). With it, 6000
# samples catch a bias of 0.029 (temperature 0.7, top-k, top-p) and 0.026
# (temperature 1) with 90% power.
PROMPT = (
    "My favourite bedtime story, the one my father read to me every night for "
    "years until the pages of the book fell apart, always started with the same"
    " words. I still know them by heart, and now I read them to my own "
    "daughter, who listens with her eyes wide open and her old teddy bear "
    "pressed against her cheek, ready to fall asleep. She knows the whole story"
    " as well as I do and corrects me whenever I change even a single word of "
    "it. So tonight, once again, I opened the worn old book, turned to the "
    "first page and read aloud:"
    "\n\nOnce upon a time, in a small village by the sea,"
)
TOP_FIRST_TOKENS = 48  # first tokens enumerated exactly; their mass is checked
BUCKETS = 24  # most likely second tokens compared one by one; the rest pooled
MAX_DETECTABLE_TV = 0.03  # end to end, with 90% power
NUM_SAMPLES = 6000  # requests per sampled phase: the cost of a 0.03 bias
SETTINGS = {  # name -> vLLM sampling settings of a phase
    "t1.0": {"temperature": 1.0},
    "t0.7-topk-topp": {"temperature": 0.7, "top_k": 40, "top_p": 0.9},
    # Trees: top-p sorts the whole vocabulary for every tree slot (about 40% of
    # the phase's time); tree mode's top-p is vLLM's own function, tested with
    # ties in tests/unit/test_tree_target_distribution.py and through the whole
    # verification step in tests/unit/test_tree_step_monte_carlo.py.
    "t0.7-topk": {"temperature": 0.7, "top_k": 40},
}


def filtered_probs(logits: torch.Tensor, settings: dict) -> torch.Tensor:
    """[n, V] float64 logits -> the distribution vLLM samples from."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    n = logits.shape[0]
    top_k = settings.get("top_k")
    top_p = settings.get("top_p")
    scaled = logits / settings["temperature"]
    scaled = apply_top_k_top_p_pytorch(
        scaled.clone(), None if top_k is None else torch.full((n,), top_k),
        None if top_p is None else torch.full((n,), top_p, dtype=scaled.dtype))
    return torch.softmax(scaled, -1)


class SecondToken:
    """The exact law of (t1, t2) for ``settings`` over the top first tokens."""

    def __init__(self, target_dir, prompt_ids: list[int], settings: dict):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float64).eval()
        with torch.no_grad():
            first = filtered_probs(model(torch.tensor([prompt_ids])).logits[:, -1],
                                   settings)[0]
            top = torch.topk(first, TOP_FIRST_TOKENS)
            keep = top.values > 0
            first_p, first_ids = top.values[keep], top.indices[keep]
            batch = torch.tensor([prompt_ids + [t] for t in first_ids.tolist()])
            second = filtered_probs(model(batch).logits[:, -1], settings)  # [T1, V]
        self.covered = float(first_p.sum())
        self.first_tokens = set(first_ids.tolist())
        self.marginal = ((first_p[:, None] * second).sum(0) / self.covered).numpy()
        # the oracle: after each first token, the likeliest second token
        self.oracle = dict(zip(first_ids.tolist(), second.argmax(-1).tolist(), strict=True))
        # first token -> P(t1) * p(oracle(t1) | t1)
        self._oracle_mass = dict(zip(first_ids.tolist(),
                                     (first_p * second.max(-1).values).tolist(), strict=True))

    def oracle_acceptance(self) -> float:
        """P(the first draft is accepted) when the oracle proposes after the
        first tokens in ``self.oracle`` (after any other, ~0: a random draft)."""
        return sum(self._oracle_mass[t1] for t1 in self.oracle)


def bucket(probabilities: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Probabilities of the `head` tokens, then of everything else."""
    return np.append(probabilities[head], max(0.0, 1.0 - probabilities[head].sum()))


def sample_tvs(p: np.ndarray, n: int, trials: int, rng) -> np.ndarray:
    counts = rng.multinomial(n, p, size=trials)
    return 0.5 * np.abs(counts / n - p).sum(1)


def tv_quantile(p: np.ndarray, n: int, q: float = 0.999, trials: int = 4000) -> float:
    return float(np.quantile(sample_tvs(p, n, trials, np.random.default_rng(0)), q))


def detectable_tv(p: np.ndarray, n: int, bound: float, power: float = 0.9,
                  trials: int = 1000) -> float:
    """The smallest bias the test catches with ``power``: the sampler moves
    mass d from the likeliest bucket to the second (TV d), n samples from that
    biased law exceed ``bound`` in at least ``power`` of the trials; d found by
    bisection over Monte Carlo power estimates (d capped at p's top mass)."""
    rng = np.random.default_rng(1)
    order = np.argsort(p)[::-1]
    low, high = 0.0, float(p[order[0]])
    for _ in range(14):
        d = 0.5 * (low + high)
        biased = p.copy()
        biased[order[0]] -= d
        biased[order[1]] += d
        caught = np.mean(0.5 * np.abs(
            rng.multinomial(n, biased, size=trials) / n - p).sum(1) > bound)
        low, high = (d, high) if caught < power else (low, d)
    return high


def assert_follows(token_ids: list[list[int]], law: SecondToken, num_samples: int) -> dict:
    """The second tokens of the samples ``token_ids`` follow ``law``."""
    # Condition on the enumerated first tokens (the exact marginal does too).
    seconds = [ids[1] for ids in token_ids if ids[0] in law.first_tokens]
    assert len(seconds) > 0.5 * num_samples
    exact = law.marginal
    empirical = np.bincount(seconds, minlength=len(exact)) / len(seconds)
    head = np.argsort(exact)[::-1][:BUCKETS]
    exact_buckets, empirical_buckets = bucket(exact, head), bucket(empirical, head)
    exact_buckets = exact_buckets / exact_buckets.sum()
    tv = 0.5 * np.abs(empirical_buckets - exact_buckets).sum()
    bound = tv_quantile(exact_buckets, len(seconds))
    detectable = detectable_tv(exact_buckets, len(seconds), bound)
    stats = {"tv": tv, "bound": bound, "n": len(seconds), "detectable_tv_90": detectable}
    print(json.dumps(stats))
    assert detectable <= MAX_DETECTABLE_TV, f"too few samples to see a bias: {stats}"
    assert tv < bound, stats
    return stats


def assert_oracle_accepted_as_expected(counters: dict, law: SecondToken) -> None:
    """The first draft (the oracle's) is accepted at the exact rate p(proposal)."""
    drafts = counters["vllm:spec_decode_num_drafts"]
    accepted = counters["vllm:spec_decode_num_accepted_tokens_per_pos"][0]
    expected = law.oracle_acceptance()
    # binomial noise; a random draft's lucky hits add at most ~1e-3
    spread = 5 * math.sqrt(expected * (1 - expected) / drafts) + 2e-3
    rate = accepted / drafts
    print(json.dumps({"acceptance": rate, "expected": expected}))
    assert expected > 0.3, "the oracle must make acceptance common"
    assert abs(rate - expected) < spread, (rate, expected, spread)


def oracle_sequences(prompt_ids: list[int], law: SecondToken) -> list[dict]:
    """Recorded continuations for the replaying test proposer: after each
    enumerated first token, the oracle's second token."""
    return [{"prompt_token_ids": prompt_ids, "output_token_ids": [t1, t2]}
            for t1, t2 in law.oracle.items()]


def sampled_phase(name: str, prompt_ids: list[int], num_samples: int = NUM_SAMPLES) -> dict:
    """An engine-job phase: ``num_samples`` requests (unseeded: they go through
    the rejection sampler) for the first two tokens of ``prompt_ids`` under
    ``SETTINGS[name]``."""
    return {"name": name, "mode": "samples", "prompt": prompt_ids,
            "num_samples": num_samples, "max_tokens": 2, **SETTINGS[name]}


def assert_phase_keeps_distribution(phase: dict, law: SecondToken,
                                    num_samples: int = NUM_SAMPLES, oracle: bool = False,
                                    min_first_acceptance: float = 0.0) -> None:
    """A sampled phase's second tokens follow ``law`` and speculation ran; with
    ``oracle`` the test proposer proposed the oracle's tokens and their
    acceptance rate is checked; otherwise at least ``min_first_acceptance`` of
    the first drafts must be accepted."""
    counters = phase["counters"]
    assert counters["vllm:spec_decode_num_draft_tokens"] > 0
    assert_follows(phase["token_ids"], law, num_samples)
    if oracle:
        assert_oracle_accepted_as_expected(counters, law)
    else:
        first = (counters["vllm:spec_decode_num_accepted_tokens_per_pos"][0]
                 / counters["vllm:spec_decode_num_drafts"])
        print(json.dumps({"first_draft_acceptance": first}))
        assert first >= min_first_acceptance, first
