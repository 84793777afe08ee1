"""One micro-batch of training: target forward, draft forward, chunked loss.

    positions = AOI or plain                     [batch, T]
    target    -> embeddings, last-layer K/V (rotated at `positions`), final hidden
    draft     -> hidden [batch, T, d] (noise shift j)
    loss      =  sum over loss rows of (1-a) CE + a KL, / loss tokens in the step

The row for position t predicts token t+1; it carries a loss when token t+1
has loss_mask True. Dividing by the loss tokens of the whole optimiser step
(all micro-batches) makes gradient accumulation equal to one big batch.

The per-step randomness (AOI anchors and offsets, the noise shift j) comes from
a generator seeded by (seed, step), not from global RNG state, so any step can
be replayed exactly after a resume.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_longspec.train.loss import chunked_lm_head_loss
from vllm_longspec.train.positions import aoi_position_ids, plain_position_ids
from vllm_longspec.train.target import lm_head_weight, run_target


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


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


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
    low, high = noise_shift_range
    noise_shift = int(torch.randint(low, high + 1, (1,), generator=generator))
    return MicroBatch(input_ids, loss_mask, positions, noise_shift)


def loss_tokens(loss_mask: torch.Tensor) -> int:
    """Positions that carry a loss: those whose NEXT token is masked in."""
    return int(loss_mask[:, 1:].sum())


def micro_batch_loss(
    draft: torch.nn.Module,
    target: torch.nn.Module,
    micro_batch: MicroBatch,
    step_loss_tokens: int,
    distill_weight: float = 0.0,
    chunk_rows: int = 256,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss scalar with grad, stats [CE sum, KL sum, correct, rows])."""
    target_out = run_target(
        target, micro_batch.input_ids, micro_batch.position_ids,
        need_final_hidden=distill_weight > 0,
    )
    device_type = micro_batch.input_ids.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        # [batch, T, hidden]
        hidden = draft(
            target_out.embeddings, micro_batch.position_ids,
            target_out.last_keys, target_out.last_values, micro_batch.noise_shift,
        )
    # [batch, T-1]: the row at t predicts token t+1
    has_loss = micro_batch.loss_mask[:, 1:]
    rows = hidden[:, :-1][has_loss]
    labels = micro_batch.input_ids[:, 1:][has_loss]
    target_rows = None
    if target_out.final_hidden is not None:
        target_rows = target_out.final_hidden[:, :-1][has_loss]
    row_weights = torch.full((rows.shape[0],), 1.0 / max(1, step_loss_tokens),
                             device=rows.device)
    return chunked_lm_head_loss(
        rows, lm_head_weight(target), labels, row_weights,
        target_hidden=target_rows, distill_weight=distill_weight,
        chunk_rows=chunk_rows,
    )
