"""A stage's training data: documents packed into fixed-length sequences.

Documents (see sources.py) are visited in a seeded permutation, a fresh one per
epoch (``numpy.random.default_rng([seed, stage, epoch])``), concatenated, and
cut into sequences of ``seq_len`` tokens; a document that does not fit
continues in the next sequence. Each token comes with a loss mask (False for
chat prompts); the label of position t is token t+1, so the last position of a
sequence carries no loss.

The stream's position is three integers (epoch, cursor in the permutation,
tokens of the current document already used): ``state_dict()`` goes into the
trainer checkpoint and ``load_state_dict()`` continues exactly there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from vllm_longspec.train.config import StageConfig
from vllm_longspec.train.exclusions import ExclusionSet
from vllm_longspec.train.sources import DocumentReader, index_documents, needs_tokenizer


@dataclasses.dataclass
class StreamPosition:
    epoch: int = 0
    cursor: int = 0  # index into this epoch's permutation
    offset: int = 0  # tokens of the current document already packed


class PackedStream:
    def __init__(self, reader: DocumentReader, seq_len: int, seed: int, stage: int):
        self.reader = reader
        self.seq_len = seq_len
        self.seed = seed
        self.stage = stage
        self.position = StreamPosition()
        self._order: np.ndarray | None = None  # permutation of the current epoch
        self._document: tuple[int, np.ndarray, np.ndarray] | None = None

    def _permutation(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.stage, self.position.epoch])
            self._order = rng.permutation(len(self.reader.index))
        return self._order

    def _current_document(self) -> tuple[np.ndarray, np.ndarray]:
        key = (self.position.epoch, self.position.cursor)
        if self._document is None or self._document[0] != key:
            ref = self.reader.index.refs[self._permutation()[self.position.cursor]]
            self._document = (key, *self.reader.read(ref))
        return self._document[1], self._document[2]

    def _advance_document(self) -> None:
        self.position.cursor += 1
        self.position.offset = 0
        if self.position.cursor == len(self.reader.index):
            self.position = StreamPosition(epoch=self.position.epoch + 1)
            self._order = None

    def _next_sequence(self) -> tuple[np.ndarray, np.ndarray]:
        ids_parts, mask_parts, filled = [], [], 0
        empty_in_a_row = 0
        while filled < self.seq_len:
            ids, mask = self._current_document()
            start = self.position.offset
            take = min(self.seq_len - filled, len(ids) - start)
            if take > 0:
                ids_parts.append(ids[start:start + take])
                mask_parts.append(mask[start:start + take])
                filled += take
                self.position.offset += take
                empty_in_a_row = 0
            else:
                empty_in_a_row += 1
                if empty_in_a_row > len(self.reader.index):
                    raise ValueError("every training document is empty.")
            if self.position.offset >= len(ids):
                self._advance_document()
        return np.concatenate(ids_parts), np.concatenate(mask_parts)

    def next_batch(self, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [n, seq_len] int64, loss_mask [n, seq_len] bool)."""
        sequences = [self._next_sequence() for _ in range(num_sequences)]
        input_ids = torch.from_numpy(np.stack([ids for ids, _ in sequences]))
        loss_mask = torch.from_numpy(np.stack([mask for _, mask in sequences]))
        return input_ids, loss_mask

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = StreamPosition(**state)
        self._order = None
        self._document = None


def load_tokenizer(target_path: str | Path):
    """The target's tokenizer, with no length limit (documents are packed)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(target_path))
    tokenizer.model_max_length = int(1e12)
    return tokenizer


def stage_stream(
    stage: StageConfig, stage_index: int, seed: int, exclusions: ExclusionSet,
    target_path: str | Path, tokenizer=None,
) -> tuple[PackedStream, object]:
    """(the stage's packed stream, the tokenizer it uses): the trainer's and the
    feature cache's sequences are the same. ``tokenizer`` is loaded if needed."""
    if tokenizer is None and needs_tokenizer(stage.sources):
        tokenizer = load_tokenizer(target_path)
    reader = DocumentReader(index_documents(stage.sources, exclusions), tokenizer)
    return PackedStream(reader, stage.seq_len, seed, stage_index), tokenizer
