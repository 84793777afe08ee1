"""Per-request sampling settings: target distributions and random draws."""

from __future__ import annotations

import pytest
import torch

from vllm_longspec.tree import BatchSampling


def naive_target_probs(logits: torch.Tensor, temperature: float, top_k: int,
                       top_p: float) -> torch.Tensor:
    """One row: temperature, keep the top_k, then the smallest head of mass >= top_p."""
    probs = torch.softmax(logits.double() / (temperature or 1.0), -1)
    order = probs.argsort(descending=True).tolist()
    if top_k > 0:
        order = order[:top_k]
    kept, mass, total = [], 0.0, float(probs[order].sum())
    for token in order:
        if mass >= top_p:
            break
        kept.append(token)
        mass += float(probs[token]) / total
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


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
    assert BatchSampling(torch.zeros(2)).select([1]).top_k is None
