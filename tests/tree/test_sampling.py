"""Per-request sampling settings: target distributions and random draws."""

from __future__ import annotations

import pytest
import torch

from vllm_longspec.tree import BatchSampling


def naive_target_probs(logits: torch.Tensor, temperature: float, top_k: int,
                       top_p: float) -> torch.Tensor:
    """One row, vLLM's rule: temperature; keep every token whose logit is at
    least the k-th largest; then drop the least likely tokens while their
    total mass is at most 1 - top_p, keeping the most likely one."""
    probs = torch.softmax(logits.double() / (temperature or 1.0), -1)
    if top_k > 0:
        kth_largest = sorted(logits.tolist(), reverse=True)[top_k - 1]
        probs = probs * (logits >= kth_largest)
        probs = probs / probs.sum()
    dropped = 0.0
    for token in probs.argsort().tolist()[:-1]:
        if probs[token] == 0:
            continue
        if dropped + float(probs[token]) > 1 - top_p:
            break
        dropped += float(probs[token])
        probs[token] = 0.0
    return probs / probs.sum()


def test_target_probs_apply_temperature_top_k_top_p_per_row():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 10, generator=gen) * 2
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.5, 3, 1.0), (1.3, 0, 0.6), (0.8, 4, 0.5)]
    temperature, top_k, top_p = (torch.tensor(c) for c in zip(*settings, strict=True))
    probs = BatchSampling(temperature, top_k, top_p).target_probs(logits)
    for row, (t, k, p) in enumerate(settings):
        for slot in range(3):
            expected = naive_target_probs(logits[row, slot], t, k, p)
            torch.testing.assert_close(probs[row, slot].double(), expected,
                                       atol=1e-6, rtol=0)


def test_top_k_keeps_every_token_tied_with_the_kth():
    """bf16-rounded logits on a coarse grid, so the k-th logit is tied with the
    next in most rows (top-p is left out: which tied tokens it keeps follows
    torch.sort's order, checked against vLLM in tests/unit)."""
    gen = torch.Generator().manual_seed(3)
    logits = ((torch.randn(64, 12, generator=gen) * 2).round() / 2).bfloat16().float()
    top_k = torch.randint(1, 12, (64,), generator=gen)
    temperature = torch.rand(64, generator=gen) + 0.5
    probs = BatchSampling(temperature, top_k).target_probs(logits)
    more_than_k = 0
    for row in range(64):
        expected = naive_target_probs(logits[row], float(temperature[row]),
                                      int(top_k[row]), 1.0)
        torch.testing.assert_close(probs[row].double(), expected, atol=1e-6, rtol=0)
        more_than_k += int((expected > 0).sum() > top_k[row])
    assert more_than_k > 16


def test_the_issue_example():
    """Logits [3, 2, 2, 1, 0] with top_k 2 keep both tokens tied at 2."""
    probs = BatchSampling(torch.ones(1), torch.tensor([2])).target_probs(
        torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]]))
    torch.testing.assert_close(probs, torch.tensor([[0.58, 0.21, 0.21, 0.0, 0.0]]),
                               atol=5e-3, rtol=0)


def test_draft_log_probs_use_the_temperature_only():
    logits = torch.randn(2, 4, 6)
    sampling = BatchSampling(torch.tensor([0.0, 0.5]), top_k=torch.tensor([1, 1]))
    log_probs = sampling.draft_log_probs(logits)
    torch.testing.assert_close(log_probs[0], torch.log_softmax(logits[0], -1))
    torch.testing.assert_close(log_probs[1], torch.log_softmax(logits[1] / 0.5, -1))


@pytest.mark.parametrize("draw", ["uniforms", "exponentials"])
def test_seeded_rows_draw_from_their_own_generator(draw):
    def draws(batch: int, row: int) -> torch.Tensor:
        sampling = BatchSampling(torch.ones(batch),
                                 generators={row: torch.Generator().manual_seed(42)})
        return getattr(sampling, draw)(3, 4, device="cpu")

    first, second = draws(2, 0), draws(5, 3)
    assert first.shape == (2, 3, 4)
    assert torch.equal(first[0], second[3])
    assert not torch.equal(first[1], second[4])
    assert (first > 0).all() if draw == "exponentials" else (first < 1).all()


def test_select_keeps_each_rows_settings_and_generator():
    gens = {1: torch.Generator().manual_seed(1), 3: torch.Generator().manual_seed(3)}
    sampling = BatchSampling(torch.tensor([0.0, 0.5, 1.0, 2.0]), torch.tensor([0, 1, 2, 3]),
                             torch.tensor([1.0, 0.9, 0.8, 0.7]), gens)
    chosen = sampling.select([3, 0])
    assert chosen.temperature.tolist() == [2.0, 0.0]
    assert chosen.top_k.tolist() == [3, 0]
    torch.testing.assert_close(chosen.top_p, torch.tensor([0.7, 1.0]))
    assert chosen.generators == {0: gens[3]}
    assert chosen.top_k_top_p is sampling.top_k_top_p
    assert BatchSampling(torch.zeros(2)).select([1]).top_k is None
