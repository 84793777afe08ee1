"""The batched sampling verifier against a one-request-at-a-time reference walk
that consumes the same noise; seeded rows; mixed greedy/sampled batches."""

from __future__ import annotations

import random

import pytest
import torch

from vllm_longspec.tree import (
    BatchSampling,
    BeamTreeBuilder,
    DraftTree,
    VerifyNoise,
    verify,
    verify_greedy,
    verify_sampling,
)


def reference_walk(tokens: list[int], parents: list[int], q_slots: torch.Tensor,
                   p_slots: torch.Tensor, accept_noise: torch.Tensor,
                   bonus_noise: torch.Tensor) -> tuple[list[int], int]:
    """The rule of verify.py for one request, written out plainly."""
    slot, path = 0, []
    p, q = p_slots[0], q_slots[0]
    while True:
        for child in (i for i, parent in enumerate(parents) if parent == slot - 1):
            token = tokens[child]
            if q[token] == 0:
                continue  # padding
            if accept_noise[child] * q[token] < p[token]:
                path.append(child)
                slot = child + 1
                p, q = p_slots[slot], q_slots[slot]
                break
            excess = (p - q).clamp(min=0)
            p = excess / excess.sum() if excess.sum() > 0 else excess
            q = q.clone()
            q[token] = 0
            q = q / q.sum() if q.sum() > 0 else q
        else:
            return path, int((p / bonus_noise).argmax())


def random_distributions(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    weights = torch.rand(shape, generator=gen, dtype=torch.float64)
    weights[torch.rand(shape, generator=gen) < 0.3] = 0
    weights[..., 0] += 1e-3  # never all zero
    return weights / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_reference_walk(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    batch, nodes, vocab = 6, 12, 5
    parents = torch.tensor([[-1] + [rng.randrange(-1, i) for i in range(1, nodes)]
                            for _ in range(batch)])
    tree = DraftTree.from_parents(torch.randint(vocab, (batch, nodes), generator=gen),
                                  parents)
    q_slots = random_distributions((batch, nodes + 1, vocab), gen)
    p_slots = random_distributions((batch, nodes + 1, vocab), gen)
    # accept noise skewed low so that paths get deep
    noise = VerifyNoise(torch.rand(batch, nodes, generator=gen, dtype=torch.float64) ** 3,
                        torch.empty(batch, vocab, dtype=torch.float64).exponential_(
                            generator=gen))
    result = verify_sampling(tree, q_slots, p_slots, noise)
    depths = []
    for b in range(batch):
        path, bonus = reference_walk(tree.tokens[b].tolist(), tree.parents[b].tolist(),
                                     q_slots[b], p_slots[b], noise.accept[b], noise.bonus[b])
        depths.append(len(path))
        emitted = tree.tokens[b, path].tolist() + [bonus]
        assert result.accepted_nodes[b].tolist() == path + [-1] * (tree.max_depth - len(path))
        assert result.num_emitted[b] == len(emitted)
        assert result.emitted_tokens[b, :len(emitted)].tolist() == emitted
        assert (result.emitted_tokens[b, len(emitted):] == -1).all()
    assert max(depths) >= 2


def test_padding_children_are_skipped():
    # the root's draft has one token; its second child (token 0, q = 0) is padding
    tree = DraftTree.from_parents(torch.tensor([[2, 0]]), torch.tensor([[-1, -1]]))
    q = torch.tensor([[[0.0, 0.0, 1.0]]])
    p = torch.tensor([[[1.0, 0.0, 0.0], [1 / 3] * 3, [1 / 3] * 3]])
    noise = VerifyNoise(torch.zeros(1, 2), torch.ones(1, 3))
    result = verify_sampling(tree, q, p, noise)
    # token 2 is rejected (p = 0); padding is not tried even though p(0) = 1
    assert result.accepted_nodes.tolist() == [[-1]]
    assert result.emitted_tokens.tolist() == [[0, -1]]


def beam_tree(sampling: BatchSampling, draft_logits: torch.Tensor):
    """Widths [2, 2] with the same draft logits at every node."""
    builder = BeamTreeBuilder([2, 2], sampling)
    while not builder.done:
        builder.expand(draft_logits[:, :builder.frontier_size])
    return builder.build()


def test_a_seeded_row_does_not_depend_on_its_batch():
    gen = torch.Generator().manual_seed(0)
    draft_logits, target_logits = torch.randn(2, 5, 6, 8, generator=gen)
    outcomes = []
    for row, batch in ((0, 3), (2, 4)):
        generators = {row: torch.Generator().manual_seed(1234)}
        sampling = BatchSampling(torch.full((batch,), 0.8), generators=generators)
        same_request = torch.zeros(batch, dtype=torch.int64)
        beam = beam_tree(sampling, draft_logits[same_request])
        result = verify(beam.tree, target_logits[same_request], sampling, beam.draft_probs)
        outcomes.append((beam.tree.tokens[row], result.emitted_tokens[row]))
    assert torch.equal(outcomes[0][0], outcomes[1][0])
    assert torch.equal(outcomes[0][1], outcomes[1][1])


def test_mixed_batch_verifies_greedy_rows_greedily():
    gen = torch.Generator().manual_seed(1)
    draft_logits, target_logits = torch.randn(2, 4, 6, 8, generator=gen)
    sampling = BatchSampling(torch.tensor([0.0, 1.0, 0.0, 0.5]))
    with torch.random.fork_rng():
        torch.manual_seed(5)
        beam = beam_tree(sampling, draft_logits)
        state = torch.get_rng_state()
        mixed = verify(beam.tree, target_logits, sampling, beam.draft_probs)
        torch.set_rng_state(state)
        noise = VerifyNoise.draw(sampling, beam.tree.num_nodes, 8, "cpu")
    greedy = verify_greedy(beam.tree, target_logits)
    sampled = verify_sampling(beam.tree, beam.draft_probs,
                              sampling.target_probs(target_logits), noise)
    for row, expected in enumerate((greedy, sampled, greedy, sampled)):
        assert torch.equal(mixed.emitted_tokens[row], expected.emitted_tokens[row])
        assert torch.equal(mixed.accepted_nodes[row], expected.accepted_nodes[row])


def test_sampled_rows_need_draft_probs():
    tree = DraftTree.chain(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="draft distributions"):
        verify(tree, torch.randn(1, 3, 4), BatchSampling(torch.ones(1)))
