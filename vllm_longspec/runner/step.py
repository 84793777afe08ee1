"""One engine step of tree mode as one object, ``TreeStep``, handed to each part.

vLLM's runner drafts after sampling (step t) and verifies in the next target
forward (step t + 1), with the scheduler in between: it sends the drafts back
as ``scheduled_spec_decode_tokens`` and may cut them (token budget, model
length) or drop them (preemption). ``TreeRounds`` (one per runner, held by the
LongSpec proposer, which is the runner's ``drafter``) keeps each request's
``ProposedTree`` and, when step t + 1 is prepared, matches it with what was
scheduled: a row whose scheduled drafts are a prefix of its tree (level order
keeps any prefix a tree) is a tree row of that step's ``TreeStep``; any other
row is verified as vLLM scheduled it (a chain).

A ``TreeStep`` lives from input preparation to verification, in this order:

1. ``patches/prepare_inputs.py``: ``begin_step`` makes it; ``layout`` rotates
   the nodes at root + depth;
2. ``patches/attention_metadata.py`` hands its ``ancestor_masks`` to the
   target layers' attention metadata builders (hybrid tree attention);
3. ``verification.TreeRejectionSampler`` takes it (``end_step``), verifies its
   rows and moves the accepted paths' K/V;
4. the proposer drafts the next trees and hands them over (``propose``).

``step`` (between 1 and 3) is the one place the runner's parts find it: vLLM
calls each of them with its own arguments only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from vllm_longspec.tree import BeamTree
from vllm_longspec.tree.mask import ancestor_mask


@dataclass(frozen=True)
class ProposedTree:
    """One request's drafted tree, nodes in level order."""

    tokens: torch.Tensor  # [N] int64
    parents: torch.Tensor  # [N] int64, -1 = the root
    depths: torch.Tensor  # [N] int64, 1 = a child of the root
    # [R, V] the draft distribution at slots 0..R-1 (0: the root, i + 1: node i)
    # that each slot's children were drawn from; None when the batch was greedy
    draft_probs: torch.Tensor | None

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[0]

    def cut(self, num_nodes: int) -> ProposedTree:
        """The first ``num_nodes`` nodes (all the scheduler kept)."""
        if num_nodes == self.num_nodes:
            return self
        probs = None if self.draft_probs is None else self.draft_probs[:num_nodes]
        return ProposedTree(self.tokens[:num_nodes], self.parents[:num_nodes],
                            self.depths[:num_nodes], probs)

    def query_parents(self) -> list[int]:
        """Parents of the verification query tokens [root, nodes...] (``tree.mask``)."""
        return [-1] + (self.parents + 1).tolist()


@dataclass(frozen=True)
class TreeStep:
    """The trees one target forward verifies."""

    trees: Mapping[int, ProposedTree]  # batch row -> its tree, cut to the drafts sent
    # batch row -> [1 + N, 1 + N] bool: which of the row's query tokens
    # [root, nodes...] each one sees (itself and its ancestors)
    ancestor_masks: Mapping[int, torch.Tensor]

    @classmethod
    def of(cls, trees: Mapping[int, ProposedTree]) -> TreeStep:
        return cls(trees, {row: ancestor_mask(tree.query_parents())
                           for row, tree in trees.items()})


# (KV cache group id, the target attention layers in it)
TargetKVGroups = Sequence[tuple[int, Sequence[str]]]


class TreeRounds:
    """One runner's trees: proposed (by the proposer, per request), then the
    step verifying them (read by the runner patches and the sampler)."""

    def __init__(self):
        # The target's attention layers, which verify trees (the draft's do not),
        # by KV cache group; known once the KV cache is configured.
        self.target_kv_groups: TargetKVGroups = ()
        self._proposed: dict[str, ProposedTree] = {}
        self._step: TreeStep | None = None

    def set_target_kv_groups(self, groups: TargetKVGroups) -> None:
        self.target_kv_groups = tuple((gid, tuple(names)) for gid, names in groups)

    def propose(self, req_ids: Sequence[str], beam: BeamTree) -> None:
        """Keep the trees drafted for the batch rows ``req_ids`` (this step's)."""
        tree = beam.tree
        self._proposed = {
            req_id: ProposedTree(
                tree.tokens[row], tree.parents[row], tree.depths[row],
                None if beam.draft_probs is None else beam.draft_probs[row])
            for row, req_id in enumerate(req_ids)
        }

    def begin_step(self, scheduled_drafts: Mapping[str, Sequence[int]],
                   req_id_to_index: Mapping[str, int]) -> TreeStep | None:
        """Match the drafts the scheduler sent for this step with the trees.

        Consumes the proposed trees: a tree is verified in the step right after
        it was drafted or never.
        """
        proposed, self._proposed = self._proposed, {}
        trees = {}
        for req_id, drafts in scheduled_drafts.items():
            tree = proposed.get(req_id)
            if tree is None or len(drafts) > tree.num_nodes:
                continue
            if tree.tokens[:len(drafts)].tolist() == list(drafts):
                trees[req_id_to_index[req_id]] = tree.cut(len(drafts))
        self._step = TreeStep.of(trees) if trees else None
        return self._step

    @property
    def step(self) -> TreeStep | None:
        """The step being run, from ``begin_step`` until ``end_step``."""
        return self._step

    def end_step(self) -> TreeStep | None:
        step, self._step = self._step, None
        return step
