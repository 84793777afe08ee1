"""The target-feature cache: what a stage's training reads from the target,
computed once (``vllm-longspec features build``), reused across epochs and stages.

A cache is a directory (default ``~/.cache/vllm-longspec/features/<stage>``):

    index.json                  spec (what it was built from), shards done, the
                                data stream's position after the last shard
    shard-00000.safetensors     SHARD_SEQUENCES sequences each:
      input_ids      [n, T] int32     the stage's packed sequences, in stream order
      loss_mask      [n, T] bool
      anchors        [n] int64        AOI anchor count a (0 without AOI)
      offsets        [n] int64        AOI offset o (0 without AOI)
      keys           [n, H_kv, T, D]  target's last-layer keys BEFORE RoPE (target dtype)
      values         [n, H_kv, T, D]
      top_k_logits   [n, T, k]        the target's k largest logits, largest first
      top_k_ids      [n, T, k] int32  their token ids           (only with k > 0)

SmolLM2-135M in bfloat16: 768 bytes/token of K/V, 192 of top-32 logits + ids.

Positions. The target (RoPE only) depends on relative positions alone, so its
unrotated K and V are the same for positions P and P + d (any pure shift d);
keys are stored before RoPE and rotated at training time, at the stored AOI
positions plus a fresh pure shift d per sequence and step (``CachedStream``,
AOI stages only): exactly the keys a live forward at P + d gives. Anchors are
different: they change relative positions (anchor tokens vs. the rest), so
each cached sequence keeps the (a, o) drawn once at build time; over epochs a
sequence is seen with one anchor pattern, not a fresh one per step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm_longspec.train.config import TrainConfig
from vllm_longspec.train.positions import anchored_position_ids, draw_anchors_offsets
from vllm_longspec.train.step import TargetFeatures

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SHARD_SEQUENCES = 16
DEFAULT_TOP_K = 32
FEATURES_ROOT = Path("~/.cache/vllm-longspec/features")
SEQUENCE_TENSORS = ("input_ids", "loss_mask", "anchors", "offsets", "keys", "values",
                    "top_k_logits", "top_k_ids")


class FeatureCacheError(ValueError):
    """A feature cache is missing, incomplete, or was built for something else."""


def default_features_dir(stage_name: str) -> Path:
    return FEATURES_ROOT.expanduser() / stage_name


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def sequence_anchors_offsets(
    seed: int, stage_index: int, first: int, count: int, seq_len: int, aoi: bool,
    max_positions: int, max_anchors: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors [count], offsets [count]) of cached sequences first..first+count-1:
    one fixed AOI draw per sequence (zeros without AOI)."""
    if not aoi:
        return torch.zeros(count, dtype=torch.int64), torch.zeros(count, dtype=torch.int64)
    draws = [
        draw_anchors_offsets(1, seq_len, max_positions, max_anchors,
                             torch.Generator().manual_seed(
                                 (seed * 1_000_003 + stage_index) * 1_000_033 + number))
        for number in range(first, first + count)
    ]
    return torch.cat([a for a, _ in draws]), torch.cat([o for _, o in draws])


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """What a cache was built from; a cache is used only where it matches."""

    target: str  # resolved target directory
    target_config_sha: str  # sha256 of the target's config.json dict
    target_dtype: str
    stage: str
    stage_index: int
    seed: int
    sources: list[Any]
    seq_len: int
    aoi: bool
    aoi_max_anchors: int
    max_positions: int
    top_k: int
    num_sequences: int
    shard_sequences: int

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FeatureSpec:
        return cls(**raw)

    @classmethod
    def for_stage(
        cls, config: TrainConfig, stage_index: int, target_path: Path,
        target_config: dict[str, Any], top_k: int = 0, num_sequences: int = 0,
        shard_sequences: int = SHARD_SEQUENCES,
    ) -> FeatureSpec:
        stage = config.stages[stage_index]
        canonical = json.dumps(target_config, sort_keys=True).encode()
        return cls(
            target=str(Path(target_path).resolve()),
            target_config_sha=hashlib.sha256(canonical).hexdigest(),
            target_dtype=config.target_dtype, stage=stage.name, stage_index=stage_index,
            seed=config.seed,
            # paths as expanded ("~/x" and "/home/u/x" are the same source)
            sources=json.loads(json.dumps([{**dataclasses.asdict(s),
                                            "paths": s.expanded_paths()}
                                           for s in stage.sources])),
            seq_len=stage.seq_len, aoi=stage.aoi, aoi_max_anchors=config.aoi_max_anchors,
            max_positions=target_config["max_position_embeddings"], top_k=top_k,
            num_sequences=num_sequences, shard_sequences=shard_sequences,
        )


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FeatureIndex:
    """index.json: the spec, the finished shards, the stream position after them.

    A shard is listed only after its file was written (to a temporary name,
    then renamed), so after a crash the listed shards are complete and the
    build resumes at the next one.
    """

    def __init__(self, directory: Path, spec: FeatureSpec, shards: list[dict[str, Any]],
                 stream_state: dict[str, int] | None):
        self.directory = directory
        self.spec = spec
        self.shards = shards
        self.stream_state = stream_state

    @classmethod
    def read(cls, directory: str | Path) -> FeatureIndex:
        directory = Path(directory).expanduser()
        path = directory / INDEX_NAME
        if not path.is_file():
            raise FeatureCacheError(
                f"no feature cache in {str(directory)!r} (no {INDEX_NAME}): build it "
                "with `vllm-longspec features build --config CONFIG --stage NAME`.")
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise FeatureCacheError(f"{path} has format {raw.get('format_version')}, "
                                    f"this code reads {FORMAT_VERSION}: rebuild it.")
        return cls(directory, FeatureSpec.from_dict(raw["spec"]), raw["shards"],
                   raw.get("stream"))

    @property
    def sequences_done(self) -> int:
        return sum(shard["sequences"] for shard in self.shards)

    @property
    def complete(self) -> bool:
        return self.sequences_done >= self.spec.num_sequences

    def write(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(self.directory / INDEX_NAME, {
            "format_version": FORMAT_VERSION, "spec": dataclasses.asdict(self.spec),
            "shards": self.shards, "stream": self.stream_state,
        })

    def add_shard(self, tensors: dict[str, torch.Tensor],
                  stream_state: dict[str, int]) -> None:
        from safetensors.torch import save_file

        name = shard_name(len(self.shards))
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.directory)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, self.directory / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.shards.append({"file": name, "sequences": int(tensors["input_ids"].shape[0])})
        self.stream_state = stream_state
        self.write()


class FeatureCache:
    """Random access to the sequences of a complete cache."""

    def __init__(self, directory: str | Path):
        self.index = FeatureIndex.read(directory)
        if not self.index.complete:
            raise FeatureCacheError(
                f"the feature cache in {str(self.index.directory)!r} is incomplete "
                f"({self.index.sequences_done} of {self.index.spec.num_sequences} "
                "sequences): run the same `vllm-longspec features build` again to "
                "finish it.")
        # [num_shards + 1]: first sequence of each shard
        sizes = [shard["sequences"] for shard in self.index.shards]
        self._starts = np.concatenate(([0], np.cumsum(sizes)))
        self._open: dict[int, Any] = {}

    @property
    def spec(self) -> FeatureSpec:
        return self.index.spec

    def __len__(self) -> int:
        return self.spec.num_sequences

    def _shard(self, number: int):
        if number not in self._open:
            from safetensors import safe_open

            path = self.index.directory / self.index.shards[number]["file"]
            self._open[number] = safe_open(str(path), framework="pt")
        return self._open[number]

    def sequences(self, numbers: list[int]) -> dict[str, torch.Tensor]:
        """The stored tensors of these sequences, stacked in this order."""
        parts: dict[str, list[torch.Tensor]] = {}
        for number in numbers:
            shard = int(np.searchsorted(self._starts, number, side="right") - 1)
            row = number - int(self._starts[shard])
            handle = self._shard(shard)
            for name in handle.keys():
                parts.setdefault(name, []).append(handle.get_slice(name)[row:row + 1])
        return {name: torch.cat(tensors) for name, tensors in parts.items()}


@dataclasses.dataclass
class CachedBatch:
    input_ids: torch.Tensor  # [batch, T] int64
    loss_mask: torch.Tensor  # [batch, T] bool
    position_ids: torch.Tensor  # [batch, T] stored AOI positions, before any shift
    features: TargetFeatures


class CachedStream:
    """A stage's sequences from a cache, a seeded permutation per epoch.

    ``state_dict()`` (epoch, cursor) goes into the trainer checkpoint, like
    ``PackedStream``'s, so a resumed run reads the same sequences.
    """

    def __init__(self, cache: FeatureCache, seed: int, stage: int):
        self.cache = cache
        self.seed, self.stage = seed, stage
        self.epoch, self.cursor = 0, 0
        self._order: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.stage, self.epoch, 1])
            self._order = rng.permutation(len(self.cache))
        return self._order

    def next_batch(self, num_sequences: int) -> CachedBatch:
        numbers = []
        for _ in range(num_sequences):
            numbers.append(int(self._permutation()[self.cursor]))
            self.cursor += 1
            if self.cursor == len(self.cache):
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        stored = self.cache.sequences(numbers)
        seq_len = stored["input_ids"].shape[1]
        top_k = "top_k_logits" in stored
        return CachedBatch(
            input_ids=stored["input_ids"].long(),
            loss_mask=stored["loss_mask"].bool(),
            position_ids=anchored_position_ids(stored["anchors"], stored["offsets"],
                                               seq_len),
            features=TargetFeatures(
                keys_unrotated=stored["keys"], values=stored["values"],
                top_k_logits=stored["top_k_logits"] if top_k else None,
                top_k_ids=stored["top_k_ids"].long() if top_k else None,
            ),
        )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor, self._order = state["epoch"], state["cursor"], None


def pure_shift(
    positions: torch.Tensor,  # [batch, T]
    max_positions: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """positions + d per row, d ~ U{0 .. max_positions - 1 - max(row)}: the same
    relative positions (so the same target K/V before RoPE), other absolute ones."""
    # [batch, 1]
    room = max_positions - positions.max(dim=1, keepdim=True).values
    shift = (torch.rand(room.shape, generator=generator) * room).long()
    return positions + shift


def check_cache_for_stage(
    spec: FeatureSpec, expected: FeatureSpec, need_top_k: int,
) -> None:
    """Raise FeatureCacheError unless a cache built as ``spec`` can stand in for
    the stage described by ``expected`` (its other fields are not compared)."""
    fields = ("target_config_sha", "target_dtype", "seq_len", "aoi", "aoi_max_anchors",
              "max_positions")
    wrong = [f"{field}: cache {getattr(spec, field)!r}, stage "
             f"{getattr(expected, field)!r}" for field in fields
             if getattr(spec, field) != getattr(expected, field)]
    if spec.top_k < need_top_k:
        wrong.append(f"top_k: cache {spec.top_k}, distill_top_k {need_top_k}")
    if wrong:
        raise FeatureCacheError(
            f"the feature cache for stage {spec.stage!r} does not fit stage "
            f"{expected.stage!r} ({'; '.join(wrong)}): rebuild it with "
            "`vllm-longspec features build`.")
