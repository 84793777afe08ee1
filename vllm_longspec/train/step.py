"""One micro-batch of training: target features, draft forward, chunked loss.

    positions = AOI or plain                     [batch, T]
    features  -> last-layer K (before RoPE) and V, the teacher (distillation):
                 from a live target forward (``live_features``) or a feature
                 cache (``features.py``), the same tensors either way
    keys      =  RoPE(K, positions)              rotated here, in float32
    draft     -> hidden [batch, T, d] (noise shift j)
    loss      =  sum over loss rows of (1-a) CE + a KL, / loss tokens in the step

The row for position t predicts token t+1; it carries a loss when token t+1
has loss_mask True. Dividing by the loss tokens of the whole optimiser step
(all micro-batches) makes gradient accumulation equal to one big batch. The
softmax runs over the draft vocabulary's rows (``VocabMap``).

The per-step randomness (AOI anchors and offsets, the noise shift j) comes from
a generator seeded by (seed, step), not from global RNG state, so any step can
be replayed exactly after a resume.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_longspec.train.loss import Teacher, chunked_lm_head_loss
from vllm_longspec.train.positions import aoi_position_ids, plain_position_ids
from vllm_longspec.train.rope import apply_rope, rope_cos_sin
from vllm_longspec.train.target import lm_head_weight, run_target, teacher_top_k
from vllm_longspec.train.vocab_map import VocabMap


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor  # [batch, T] int64
    loss_mask: torch.Tensor  # [batch, T] bool
    position_ids: torch.Tensor  # [batch, T] int64
    noise_shift: int

    def to(self, device: torch.device) -> MicroBatch:
        return dataclasses.replace(
            self, input_ids=self.input_ids.to(device),
            loss_mask=self.loss_mask.to(device),
            position_ids=self.position_ids.to(device))


@dataclasses.dataclass(frozen=True)
class TargetFeatures:
    """What the draft's loss reads from the target for one micro-batch."""

    keys_unrotated: torch.Tensor  # [batch, num_kv_heads, T, head_dim], before RoPE
    values: torch.Tensor  # [batch, num_kv_heads, T, head_dim]
    final_hidden: torch.Tensor | None = None  # [batch, T, hidden]: full teacher
    top_k_logits: torch.Tensor | None = None  # [batch, T, k]: top-k teacher
    top_k_ids: torch.Tensor | None = None  # [batch, T, k] target token ids

    def to(self, device: torch.device) -> TargetFeatures:
        return TargetFeatures(*(None if t is None else t.to(device)
                                for t in dataclasses.astuple(self)))


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def draw_noise_shift(generator: torch.Generator, noise_shift_range: tuple[int, int]) -> int:
    low, high = noise_shift_range
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def make_micro_batch(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    generator: torch.Generator,
    aoi: bool,
    max_positions: int,
    max_anchors: int,
    noise_shift_range: tuple[int, int],
) -> MicroBatch:
    batch, seq_len = input_ids.shape
    if aoi:
        positions = aoi_position_ids(batch, seq_len, max_positions, max_anchors,
                                     generator)
    else:
        positions = plain_position_ids(batch, seq_len)
    noise_shift = draw_noise_shift(generator, noise_shift_range)
    return MicroBatch(input_ids, loss_mask, positions, noise_shift)


def loss_mask_for(loss_on: str, source_mask: torch.Tensor) -> torch.Tensor:
    """The stage's loss positions: the source's mask ("source": a chat record's
    answers, every token of a text) or every position ("all")."""
    return torch.ones_like(source_mask) if loss_on == "all" else source_mask


def loss_tokens(loss_mask: torch.Tensor) -> int:
    """Positions that carry a loss: those whose NEXT token is masked in."""
    return int(loss_mask[:, 1:].sum())


def live_features(
    target, micro_batch: MicroBatch, teacher: str | None = None,
    top_k: int | None = None,
) -> TargetFeatures:
    """Run the target. teacher: None (no distillation), "full" (final hidden)
    or "top_k" (its ``top_k`` largest logits)."""
    out = run_target(target, micro_batch.input_ids, micro_batch.position_ids,
                     need_final_hidden=teacher is not None)
    if teacher == "top_k":
        logits, ids = teacher_top_k(out.final_hidden, lm_head_weight(target), top_k)
        return TargetFeatures(out.last_keys_unrotated, out.last_values,
                              top_k_logits=logits, top_k_ids=ids)
    return TargetFeatures(out.last_keys_unrotated, out.last_values,
                          final_hidden=out.final_hidden)


def rotate_target_keys(
    draft: torch.nn.Module,
    keys_unrotated: torch.Tensor,  # [batch, num_kv_heads, T, head_dim]
    positions: torch.Tensor,  # [batch, T]
) -> torch.Tensor:
    """Keys as the target's attention (and vLLM's KV cache) holds them: rotated
    at ``positions`` with the target's RoPE tables (the draft's), in float32,
    returned in the keys' dtype."""
    cos, sin = rope_cos_sin(positions, draft.inv_freq, draft.attention_scaling)
    return apply_rope(keys_unrotated, cos, sin)


def _teacher_rows(features: TargetFeatures, has_loss: torch.Tensor,
                  vocab: VocabMap, top_k: int | None) -> Teacher | None:
    if features.final_hidden is not None:
        return Teacher(final_hidden=features.final_hidden[:, :-1][has_loss])
    if features.top_k_logits is None:
        return None
    k = top_k or features.top_k_logits.shape[-1]
    # [rows, k]: the cache may hold more than k, largest first
    logits = features.top_k_logits[:, :-1][has_loss][:, :k]
    ids = features.top_k_ids[:, :-1][has_loss][:, :k]
    return Teacher(top_k_logits=logits, top_k_rows=vocab.rows(ids))


def micro_batch_loss(
    draft: torch.nn.Module,
    target: torch.nn.Module,
    micro_batch: MicroBatch,
    features: TargetFeatures,
    step_loss_tokens: int,
    vocab: VocabMap,
    head: torch.Tensor,  # [draft_vocab, hidden] = vocab.head(lm_head_weight(target))
    distill_weight: float = 0.0,
    distill_top_k: int | None = None,
    chunk_rows: int = 256,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss scalar with grad, stats [CE sum, KL sum, correct, rows, outside rows])."""
    with torch.no_grad():
        # [batch, T, hidden]
        embeddings = target.get_input_embeddings()(micro_batch.input_ids)
        keys = rotate_target_keys(draft, features.keys_unrotated,
                                  micro_batch.position_ids)
    device_type = micro_batch.input_ids.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        # [batch, T, hidden]
        hidden = draft(embeddings, micro_batch.position_ids, keys, features.values,
                       micro_batch.noise_shift)
    # [batch, T-1]: the row at t predicts token t+1
    has_loss = micro_batch.loss_mask[:, 1:]
    rows = hidden[:, :-1][has_loss]
    labels = vocab.rows(micro_batch.input_ids[:, 1:][has_loss])
    teacher = _teacher_rows(features, has_loss, vocab, distill_top_k) \
        if distill_weight > 0 else None
    row_weights = torch.full((rows.shape[0],), 1.0 / max(1, step_loss_tokens),
                             device=rows.device)
    return chunked_lm_head_loss(
        rows, head, labels, row_weights, distill_weight=distill_weight,
        chunk_rows=chunk_rows, teacher=teacher,
    )
