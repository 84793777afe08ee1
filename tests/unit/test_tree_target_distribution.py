"""Tree mode's target distribution is vLLM's: temperature, then vLLM's own
top-k / top-p function (ties with the k-th logit kept), then softmax.

Logits are rounded to bfloat16 and ties are forced where they decide the
result: the k-th and (k + 1)-th logits, and tied groups straddling the top-p
boundary (which of them vLLM keeps follows its ``torch.sort``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.sample.ops import topk_topp_sampler

from vllm_longspec.runner.sampling import batch_sampling
from vllm_longspec.tree import BatchSampling, top_k_top_p_reference


def vllm_filter(logits, top_k, top_p):
    return topk_topp_sampler.apply_top_k_top_p(logits.clone(), top_k, top_p)


def tied_logits(rows: int, vocab: int, top_k: torch.Tensor,
                gen: torch.Generator) -> torch.Tensor:
    """[rows, vocab] bf16-rounded logits, half of the rows on a coarse grid
    (tied groups everywhere), and the k-th largest logit of every row tied
    with the (k + 1)-th."""
    logits = torch.randn(rows, vocab, generator=gen) * 3
    coarse = torch.arange(rows) % 2 == 0
    logits[coarse] = (logits[coarse] * 2).round() / 2
    logits = logits.bfloat16().float()
    order = logits.argsort(dim=-1, descending=True)
    kth = order.gather(1, (top_k.long() - 1).unsqueeze(1))
    after = order.gather(1, top_k.long().clamp(max=vocab - 1).unsqueeze(1))
    logits.scatter_(1, after, logits.gather(1, kth))
    return logits


def settings(rows: int, vocab: int, which: str, gen: torch.Generator):
    """vLLM's per-row format: top_k int32 in 1..V (V: off), top_p float32 (1: off)."""
    top_k = torch.randint(1, vocab + 1, (rows,), generator=gen, dtype=torch.int32)
    top_k[::7] = vocab
    top_p = torch.rand(rows, generator=gen) * 0.95 + 0.05
    top_p[::5] = 1.0
    return (top_k if which in ("top_k", "both") else None,
            top_p if which in ("top_p", "both") else None)


@pytest.mark.parametrize("vocab", [5, 64, 1000])
@pytest.mark.parametrize("which", ["top_k", "top_p", "both"])
def test_the_reference_is_vllms_filter(which, vocab):
    gen = torch.Generator().manual_seed(vocab)
    rows = 512
    top_k, top_p = settings(rows, vocab, which, gen)
    logits = tied_logits(rows, vocab, torch.randint(1, vocab, (rows,), generator=gen)
                         if top_k is None else top_k.clamp(max=vocab - 1), gen)
    expected = vllm_filter(logits, top_k, top_p)
    got = top_k_top_p_reference(logits.clone(), top_k, top_p)
    assert torch.equal(got, expected)
    # The cases that decide between filters happened. Both filters keep the
    # most likely tokens, so a tied group straddles the cut iff the largest
    # dropped logit equals the smallest kept one.
    kept = expected > -torch.inf
    straddling = (logits.masked_fill(kept, -torch.inf).amax(1)
                  == logits.masked_fill(~kept, torch.inf).amin(1))
    if which == "top_k":
        assert not straddling.any()  # ties with the k-th are kept whole
        assert int((kept.sum(1) > top_k).sum()) > rows // 4
    if which == "both":
        assert (kept.sum(1) > top_k).any()
    if top_p is not None:
        assert straddling.any()  # top-p cut inside a tied group
        assert int((kept.sum(1) < vocab).sum()) > rows // 4


def test_the_issue_example():
    """Logits [3, 2, 2, 1, 0], top_k 2: vLLM keeps both tokens tied at 2."""
    metadata = SimpleNamespace(all_greedy=False, temperature=torch.tensor([1.0]),
                               top_k=torch.tensor([2], dtype=torch.int32), top_p=None,
                               generators={})
    sampling = batch_sampling(metadata, 1)
    assert sampling.top_k_top_p is topk_topp_sampler.apply_top_k_top_p
    probs = sampling.target_probs(torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]]))
    torch.testing.assert_close(probs, torch.tensor([[0.58, 0.21, 0.21, 0.0, 0.0]]),
                               atol=5e-3, rtol=0)
    torch.testing.assert_close(BatchSampling(torch.ones(1), torch.tensor([2])).target_probs(
        torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]])), probs, atol=0, rtol=0)


@pytest.mark.parametrize("which", ["top_k", "top_p", "both"])
def test_target_probs_are_vllms(which):
    """[B, S, V] per-row settings from vLLM's metadata (greedy rows, rows
    with the filters off) against vLLM's filter applied slot by slot."""
    gen = torch.Generator().manual_seed(7)
    batch, slots, vocab = 24, 3, 40
    top_k, top_p = settings(batch, vocab, which, gen)
    temperature = torch.tensor([0.0, 0.5, 0.7, 1.0, 1.3, 1.0] * 4)
    row_k = top_k if top_k is not None else torch.full((batch,), vocab - 1)
    logits = tied_logits(batch * slots, vocab, row_k.repeat_interleave(slots), gen)
    logits = logits.view(batch, slots, vocab) * temperature.clamp(min=1).view(-1, 1, 1)
    metadata = SimpleNamespace(all_greedy=False, temperature=temperature, top_k=top_k,
                               top_p=top_p, generators={})
    probs = batch_sampling(metadata, batch).target_probs(logits)
    for row in range(batch):
        for slot in range(slots):
            row_logits = logits[row, slot].unsqueeze(0)
            if temperature[row] == 0:
                expected = row_logits.softmax(-1)
            else:
                expected = vllm_filter(
                    row_logits / temperature[row],
                    None if top_k is None else top_k[row:row + 1],
                    None if top_p is None else top_p[row:row + 1]).softmax(-1)
            assert torch.equal(probs[row, slot] > 0, expected[0] > 0), (row, slot)
            torch.testing.assert_close(probs[row, slot], expected[0], atol=1e-6, rtol=0)
