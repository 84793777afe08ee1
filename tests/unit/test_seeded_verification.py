"""Seeded requests verified by the target's own draws (no engine).

``tree.verify_by_target_draws`` walks a tree with one draw per emitted token;
``runner/seeded.py`` draws as vLLM's sampler does in plain decoding, so a
seeded request's tokens are plain decoding's whatever is drafted. The
end-to-end checks (plain vLLM's tokens, alone, batched, again) are in
``tests/e2e/test_seeded_requests.py``.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.sampler import Sampler

from vllm_longspec.runner import seeded
from vllm_longspec.runner.step import ProposedTree
from vllm_longspec.runner.verification import verify_step
from vllm_longspec.tree import BatchSampling, verify_by_target_draws

VOCAB = 50


class Draws:
    """A draw that returns scripted tokens per slot and records its calls."""

    def __init__(self, tokens_by_slot: dict[int, int]):
        self.tokens_by_slot = tokens_by_slot
        self.slots: list[int] = []

    def __call__(self, slot: int) -> int:
        self.slots.append(slot)
        return self.tokens_by_slot[slot]


def test_walk_accepts_the_child_that_holds_the_draw():
    # root -> nodes 0 (5) and 1 (6); node 0 -> node 2 (7); node 1 -> node 3 (8)
    parents, tokens = [-1, -1, 0, 1], [5, 6, 7, 8]
    draws = Draws({0: 6, 2: 8, 4: 9})
    assert verify_by_target_draws(parents, tokens, draws) == ([6, 8, 9], [1, 3])
    assert draws.slots == [0, 2, 4]  # one draw per emitted token, along the path


def test_walk_stops_at_the_first_draw_no_child_holds():
    draws = Draws({0: 3})
    assert verify_by_target_draws([-1, 0, 1], [4, 5, 6], draws) == ([3], [])
    assert draws.slots == [0]
    everything = Draws({0: 4, 1: 5, 2: 6, 3: 1})
    assert verify_by_target_draws([-1, 0, 1], [4, 5, 6], everything) == (
        [4, 5, 6, 1], [0, 1, 2])


def _metadata(temperature: list[float], top_k=None, top_p=None,
              generators=None) -> SamplingMetadata:
    n = len(temperature)
    return SamplingMetadata(
        temperature=torch.tensor(temperature), all_greedy=False,
        all_random=all(t > 0 for t in temperature),
        top_p=None if top_p is None else torch.tensor(top_p),
        top_k=None if top_k is None else torch.tensor(top_k),
        generators=generators or {}, max_num_logprobs=None, no_penalties=True,
        prompt_token_ids=None, frequency_penalties=torch.zeros(n),
        presence_penalties=torch.zeros(n), repetition_penalties=torch.ones(n),
        output_token_ids=[[] for _ in range(n)], allowed_token_ids_mask=None,
        bad_words_token_ids={}, logitsprocs=LogitsProcessors())


def _bf16_logits(rows: int, seed: int) -> torch.Tensor:
    # bf16-rounded logits: ties at the top-k / top-p boundary are common
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    return logits.bfloat16().float()


def test_plain_draws_are_plain_vllms_samples_step_by_step():
    """n draws for one row equal n steps of vLLM's own Sampler on that row alone,
    with the same generator: the tokens plain decoding gives for the seed."""
    sampler = Sampler()
    for settings in ({}, {"top_k": [7]}, {"top_p": [0.8]}, {"top_k": [5], "top_p": [0.9]}):
        logits = _bf16_logits(6, seed=len(settings))
        ours = torch.Generator().manual_seed(11)
        got = seeded.plain_draws(sampler, logits, 0, _metadata([0.7], **settings), ours)
        plain = torch.Generator().manual_seed(11)
        want = [int(sampler(logits[i:i + 1].clone(),
                            _metadata([0.7], generators={0: plain}, **settings))
                    .sampled_token_ids[0, 0]) for i in range(6)]
        assert got.tolist() == want, settings
        assert torch.equal(ours.get_state(), plain.get_state())  # the same draws used


def test_coupled_draft_token_is_the_draw_the_target_will_make_there():
    sampler = Sampler()
    metadata = _metadata([1.0, 0.8], top_k=[0, 10])
    logits = _bf16_logits(2, seed=3)
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    ahead = seeded.plain_draws(sampler, logits[1].expand(3, -1), 1, metadata,
                               torch.Generator().manual_seed(5))
    for position in (1, 2, 3):
        coupled = seeded.coupled_draft_tokens(sampler, logits, position, {1: generator},
                                              metadata)
        assert coupled == {1: int(ahead[position - 1])}
        assert torch.equal(generator.get_state(), state)  # peeked, not drawn


def test_verify_step_takes_seeded_rows_out_of_the_rejection_sampler():
    """A mixed step: a greedy chain, a sampled chain, a seeded tree. The seeded
    row emits the target's draws; the others are verified as without it."""
    num_drafts = [2, 2, 3]
    drafts = torch.tensor([1, 2, 3, 4, 7, 8, 9])
    logits = _bf16_logits(sum(num_drafts) + 3, seed=9)
    sampling = BatchSampling(torch.tensor([0.0, 1.0, 1.0]))
    tree = ProposedTree(torch.tensor([7, 8, 9]), torch.tensor([-1, -1, 0]),
                        torch.tensor([1, 1, 2]), None)
    draws = Draws({0: 8, 2: 5})  # accepts node 1 (token 8), then draws 5
    result = verify_step({2: tree}, num_drafts, drafts, logits, sampling, {2: draws})
    assert result.sampled_token_ids[2].tolist() == [8, 5, -1, -1]
    assert result.accepted_paths == {2: [1]}
    assert draws.slots == [0, 2]
    alone = verify_step({}, [2], drafts[:2], logits[:3], BatchSampling(torch.zeros(1)))
    assert torch.equal(result.sampled_token_ids[0, :3], alone.sampled_token_ids[0])


def test_a_step_without_drafts_is_sampled_as_plain_decoding_samples():
    """No request verifies a draft: vLLM's sampler alone, once, on the logits;
    with logprobs (or penalties) the rejection sampler still runs."""
    from types import SimpleNamespace

    from vllm_longspec.runner.seeded import SeededChainVerification, samples_as_plain

    calls = []
    runner = SimpleNamespace(sampler=lambda logits, sampling_metadata: calls.append(
        "plain") or "plain output")

    def chain_sampler(*args):
        calls.append("rejection")
        return "rejection output"

    verification = SeededChainVerification.__new__(SeededChainVerification)
    verification.__dict__.update(runner=runner, chain_sampler=chain_sampler)
    no_drafts = SimpleNamespace(max_spec_len=0)
    plain = SimpleNamespace(max_num_logprobs=None, no_penalties=True,
                            bad_words_token_ids={}, thinking_budget_state_holder=None)
    assert verification.forward(no_drafts, None, "logits", plain) == "plain output"
    assert calls == ["plain"]
    calls.clear()
    with_logprobs = SimpleNamespace(**{**vars(plain), "max_num_logprobs": 2})
    assert samples_as_plain(plain) and not samples_as_plain(with_logprobs)
    assert not samples_as_plain(SimpleNamespace(**{**vars(plain), "no_penalties": False}))
