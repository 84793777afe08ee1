"""Dynamic beam trees (spec section 4), built one draft forward per level.

Level 1 holds the ``widths[0]`` most likely children of the root; level l + 1
the ``widths[l]`` children with the highest cumulative path log-prob
``score(parent) + log q(token | parent)`` among all children of level l's nodes
(a global top-k). All widths 1 is a chain. Greedy requests (temperature 0) take
exactly these children.

Sampling requests keep the shape rule but draw the children. Frontier node u
gets m_u children, m_u being what the rule above gives it; that count depends
only on the frontier's scores and draft distributions, so it is fixed before
u's children are drawn. u's children are then its first m_u draws WITHOUT
replacement from its draft distribution q_u: the top m_u of log q_u + Gumbel
noise, in draw order (the Gumbel-top-k trick). That is the candidate law
``verify.verify_sampling`` is lossless for. When q_u has fewer than m_u tokens
of positive mass, the extra children are padding: tokens with q_u = 0 and score
-inf, which verification skips.

A level's nodes are ordered by parent, then by rank (log-prob for greedy rows,
draw order for sampled ones): a node's children are contiguous and in the order
verification tries them. Scores use the draft log-probs at each row's
temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_longspec.tree.limits import MAX_SPEC_TOKENS
from vllm_longspec.tree.sampling import BatchSampling
from vllm_longspec.tree.structure import DraftTree
from vllm_longspec.tree.vocabulary import DraftVocabulary


@dataclass(frozen=True)
class TreeLevel:
    tokens: torch.Tensor   # [B, W] int64
    parents: torch.Tensor  # [B, W] int64 parent node in the whole tree, -1 = the root
    scores: torch.Tensor   # [B, W] cumulative draft log-prob of each node's path


@dataclass(frozen=True)
class BeamTree:
    tree: DraftTree
    scores: torch.Tensor               # [B, N] cumulative draft log-prob of each path
    # [B, R, V] the draft distribution at slot s (0: root, i + 1: node i) for
    # every expanded slot: node i was drawn from draft_probs[:, parents[i] + 1].
    # Kept when some row samples, else None.
    draft_probs: torch.Tensor | None


def child_counts(scores: torch.Tensor, log_probs: torch.Tensor, width: int) -> torch.Tensor:
    """How many children each frontier node gets: [B, F], each row summing to ``width``.

    scores: [B, F] cumulative log-probs of the frontier nodes (0 for the root).
    log_probs: [B, F, V] the draft's log-probs at each of them.
    Counts of the global top-``width`` of score + child log-prob; among equal
    candidates the lower (node, rank) wins.
    """
    per_node = min(width, log_probs.shape[-1])
    best = log_probs.topk(per_node, dim=-1).values             # [B, F, per_node]
    candidates = (scores.unsqueeze(-1) + best).flatten(1)      # [B, F * per_node]
    chosen = candidates.sort(dim=1, descending=True, stable=True).indices[:, :width]
    counts = torch.zeros_like(scores, dtype=torch.int64)
    return counts.scatter_add_(1, chosen // per_node, torch.ones_like(chosen))


def select_children(scores: torch.Tensor, log_probs: torch.Tensor, width: int,
                    gumbel: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The next level: (frontier index of each node's parent, tokens, scores), each [B, W].

    gumbel: [B, F, V] Gumbel(0, 1) noise, zero on greedy rows; None: all greedy.
    """
    counts = child_counts(scores, log_probs, width)                       # [B, F]
    per_node = min(width, log_probs.shape[-1])
    keys = log_probs if gumbel is None else log_probs + gumbel
    ranked = keys.topk(per_node, dim=-1).indices                          # [B, F, per_node]
    rank = torch.arange(per_node, device=counts.device)
    selected = (rank < counts.unsqueeze(-1)).flatten(1)                    # W True per row
    # positions of the selected (parent, rank) pairs, parent-major
    picked = selected.byte().sort(dim=1, descending=True, stable=True).indices[:, :width]
    frontier_parent = picked // per_node
    tokens = ranked.flatten(1).gather(1, picked)
    child_log_probs = log_probs.gather(2, ranked).flatten(1).gather(1, picked)
    return frontier_parent, tokens, scores.gather(1, frontier_parent) + child_log_probs


class BeamTreeBuilder:
    """Builds a batch's trees level by level, one draft forward per level::

        builder = BeamTreeBuilder([4, 16, 16, 16, 16], sampling)
        logits = draft(root tokens)                    # [B, 1, V]
        while True:
            level = builder.expand(logits)
            if builder.done:
                break
            logits = draft(level.tokens, ...)         # [B, W, V], tree-masked
        beam = builder.build()

    ``tree`` gives the tree so far between levels (e.g. for the ancestor mask
    of the newest level). With a ``vocabulary`` the logits are the draft's N
    columns (``DraftVocabulary``): levels hold token ids all the same, and the
    tree's draft distributions cover the whole vocabulary.
    """

    def __init__(self, widths: Sequence[int], sampling: BatchSampling,
                 vocabulary: DraftVocabulary | None = None):
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be positive level sizes, got {list(widths)}")
        if sum(widths) + 1 > MAX_SPEC_TOKENS:
            raise ValueError(f"a tree of widths {list(widths)} has {sum(widths)} nodes; "
                             f"with its root at most {MAX_SPEC_TOKENS} tokens fit a "
                             f"verification forward")
        self.widths = tuple(widths)
        self.sampling = sampling
        self.vocabulary = vocabulary
        self._any_sampled = not bool(sampling.is_greedy.all())
        self._levels: list[TreeLevel] = []
        self._draft_probs: list[torch.Tensor] = []

    @property
    def done(self) -> bool:
        return len(self._levels) == len(self.widths)

    @property
    def frontier_size(self) -> int:
        return self.widths[len(self._levels) - 1] if self._levels else 1

    def expand(self, draft_logits: torch.Tensor) -> TreeLevel:
        """Adds the next level, given the draft's logits [B, F, V] (or [B, F, N]
        with a vocabulary) at the frontier:
        the root on the first call, then the level the previous call added."""
        if self.done:
            raise RuntimeError(f"all {len(self.widths)} levels are built")
        batch, frontier, vocab = draft_logits.shape
        width = self.widths[len(self._levels)]
        if (batch, frontier) != (self.sampling.batch_size, self.frontier_size):
            raise ValueError(f"draft_logits must be [{self.sampling.batch_size}, "
                             f"{self.frontier_size}, V], got {tuple(draft_logits.shape)}")
        if width > frontier * vocab:
            raise ValueError(f"level of width {width} exceeds the {frontier * vocab} "
                             f"children of its frontier")
        log_probs = self.sampling.draft_log_probs(draft_logits.float())
        if self._any_sampled:
            self._draft_probs.append(log_probs.exp())
        frontier_parent, tokens, scores = select_children(
            self._frontier_scores(batch, log_probs.device), log_probs, width,
            self._gumbel(frontier, vocab, log_probs.device))
        if self.vocabulary is not None:
            tokens = self.vocabulary.tokens(tokens)
        level = TreeLevel(tokens, self._node_index(frontier_parent), scores)
        self._levels.append(level)
        return level

    def tree(self) -> DraftTree:
        """The tree of the levels built so far (no scores, no distributions)."""
        if not self._levels:
            raise RuntimeError("no level built yet")
        depths = torch.cat([torch.full_like(level.tokens, depth)
                            for depth, level in enumerate(self._levels, start=1)], dim=1)
        return DraftTree(self._along_levels("tokens"), self._along_levels("parents"), depths)

    def build(self) -> BeamTree:
        """The tree of the levels built so far, with its scores and draft distributions."""
        tree = self.tree()
        draft_probs = torch.cat(self._draft_probs, dim=1) if self._any_sampled else None
        if draft_probs is not None and self.vocabulary is not None:
            draft_probs = self.vocabulary.to_vocabulary(draft_probs)
        return BeamTree(tree, self._along_levels("scores"), draft_probs)

    def _along_levels(self, name: str) -> torch.Tensor:
        return torch.cat([getattr(level, name) for level in self._levels], dim=1)

    def _frontier_scores(self, batch: int, device: torch.device) -> torch.Tensor:
        if self._levels:
            return self._levels[-1].scores
        return torch.zeros(batch, 1, device=device)

    def _node_index(self, frontier_parent: torch.Tensor) -> torch.Tensor:
        """Frontier index -> node index in the whole tree (-1 for the root)."""
        if not self._levels:
            return torch.full_like(frontier_parent, -1)
        first_frontier_node = sum(self.widths[:len(self._levels) - 1])
        return frontier_parent + first_frontier_node

    def _gumbel(self, frontier: int, vocab: int, device: torch.device) -> torch.Tensor | None:
        """[B, F, V] Gumbel(0, 1) noise, zero on greedy rows; None when all are greedy."""
        if not self._any_sampled:
            return None
        gumbel = -self.sampling.exponentials(frontier, vocab, device=device).log()
        return gumbel.masked_fill_(self.sampling.is_greedy.view(-1, 1, 1), 0.0)
