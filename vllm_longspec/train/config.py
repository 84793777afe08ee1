"""Training configuration: one dataclass tree, read from a JSON or YAML file.

    TrainConfig            run-wide settings (target, optimiser, draft, output)
      stages: StageConfig  one phase of the recipe (data, length, AOI, lr, budget)
        sources: SourceConfig   where that phase's documents come from

Unknown keys are rejected with the key's name; every field has a default except
``stages`` (and each stage's ``name`` and ``sources``). Relative paths are taken
relative to the working directory; ``{stdlib}`` in a source path expands to the
running Python's standard-library directory. See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sysconfig
from pathlib import Path
from typing import Any, Literal

SourceType = Literal["text", "jsonl", "tokens"]
SOURCE_TYPES = ("text", "jsonl", "tokens")
DTYPES = ("bfloat16", "float32")


class TrainConfigError(ValueError):
    """A bad training config; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Documents of one kind.

    type: "text" (each file is one document), "jsonl" (one document per line:
        a "text" field, or chat "messages" rendered with the target's chat
        template, loss on assistant tokens only), "tokens" (.npy/.bin of uint32
        token ids, already packed; read in pieces).
    paths: glob patterns (``**`` allowed; ``{stdlib}`` and ``{site}`` expand to the
        running Python's standard library and site-packages).
    exclude: glob patterns matched against each file's resolved path.
    """

    type: SourceType
    paths: tuple[str, ...]
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in SOURCE_TYPES:
            raise TrainConfigError(
                f"source type {self.type!r} is not one of {', '.join(SOURCE_TYPES)}."
            )
        if not self.paths:
            raise TrainConfigError("a source needs at least one entry in 'paths'.")

    def expanded_paths(self) -> list[str]:
        places = sysconfig.get_paths()
        return [os.path.expanduser(p.replace("{stdlib}", places["stdlib"])
                                   .replace("{site}", places["purelib"]))
                for p in self.paths]


LOSS_ON = ("source", "all")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One training phase. Give exactly one of ``steps`` and ``tokens``.

    batch_tokens: tokens per optimiser step, split into ``grad_accum``
        micro-batches of ``batch_tokens / (grad_accum * seq_len)`` sequences.
    """

    name: str
    sources: tuple[SourceConfig, ...]
    seq_len: int = 1024
    aoi: bool = True
    lr: float = 5e-4
    warmup_fraction: float = 0.1
    steps: int | None = None
    tokens: int | None = None
    batch_tokens: int = 1024
    grad_accum: int = 1
    features: str | None = None  # a feature cache (features.py) to train from
    # "source": the positions each source marks (a chat record's answers, all of a
    # text); "all": every position (a chat record's prompt too)
    loss_on: str = "source"

    def features_path(self) -> Path | None:
        return Path(os.path.expanduser(self.features)) if self.features else None

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        if not self.sources:
            raise TrainConfigError(f"{where} has no sources.")
        if (self.steps is None) == (self.tokens is None):
            raise TrainConfigError(f"{where}: give exactly one of 'steps' and 'tokens'.")
        if self.seq_len < 2:
            raise TrainConfigError(f"{where}: seq_len must be at least 2.")
        per_step = self.grad_accum * self.seq_len
        if self.grad_accum < 1 or self.batch_tokens % per_step:
            raise TrainConfigError(
                f"{where}: batch_tokens ({self.batch_tokens}) must be a multiple of "
                f"grad_accum x seq_len ({self.grad_accum} x {self.seq_len})."
            )
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise TrainConfigError(f"{where}: warmup_fraction must be in [0, 1).")
        if self.loss_on not in LOSS_ON:
            raise TrainConfigError(
                f"{where}: loss_on must be one of {', '.join(LOSS_ON)}, not "
                f"{self.loss_on!r}.")

    @property
    def num_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / self.batch_tokens)

    @property
    def sequences_per_micro_batch(self) -> int:
        return self.batch_tokens // (self.grad_accum * self.seq_len)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training run (see docs/training.md for each field)."""

    stages: tuple[StageConfig, ...]
    target: str | None = None  # None: vllm_longspec.assets.default_target_path()
    init_from: str | None = None  # an exported draft directory to fine-tune
    init_from_target_layer: int | None = None  # a target decoder layer (-1: last)
    output_dir: str = "runs/longspec-draft"
    seed: int = 0
    sliding_window: int = 512
    noise_shift: tuple[int, int] = (1, 4)  # inclusive range of j
    aoi_max_anchors: int = 4  # anchors a drawn from 0..aoi_max_anchors
    distill_weight: float = 0.0  # loss = (1-w) CE + w KL(target || draft)
    distill_top_k: int | None = None  # teacher: the target's top-k logits; None: all
    draft_vocab: str | None = None  # draft dir or .npy of ids: the LM head's rows
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of the stage's lr
    checkpoint_every: int = 100
    log_every: int = 1
    loss_chunk_rows: int = 256
    autocast_dtype: str = "bfloat16"  # draft matmuls; master weights stay fp32
    target_dtype: str = "bfloat16"
    num_threads: int | None = 2  # torch intra-op threads; None: torch default
    device: str = "cpu"  # "cuda", "cuda:1", ...: untested on a GPU so far
    exclude_paths: tuple[str, ...] = ()
    exclude_list_file: str | None = "benchmarks/sources.txt"

    def __post_init__(self) -> None:
        if not self.stages:
            raise TrainConfigError("the config has no stages.")
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise TrainConfigError(f"stage names must be unique: {names}.")
        low, high = self.noise_shift
        if not 1 <= low <= high:
            raise TrainConfigError(
                f"noise_shift {list(self.noise_shift)} must be [low, high] with "
                "1 <= low <= high (j=0 would let the draft see the target's K/V "
                "of the token it predicts from)."
            )
        if self.init_from and self.init_from_target_layer is not None:
            raise TrainConfigError(
                "init_from and init_from_target_layer both say where the draft "
                "starts: set one of them (null for the other)."
            )
        if self.init_from_target_layer is not None and (
                isinstance(self.init_from_target_layer, bool)
                or not isinstance(self.init_from_target_layer, int)):
            raise TrainConfigError(
                "init_from_target_layer must be a decoder layer index of the target "
                f"(-1: the last), or null; got {self.init_from_target_layer!r}."
            )
        if not 0.0 <= self.distill_weight <= 1.0:
            raise TrainConfigError("distill_weight must be in [0, 1].")
        if self.distill_top_k is not None and self.distill_top_k < 1:
            raise TrainConfigError("distill_top_k must be >= 1 (or null: all logits).")
        cached = [s.name for s in self.stages if s.features]
        if cached and self.distill_weight > 0 and self.distill_top_k is None:
            raise TrainConfigError(
                f"stages {cached} train from a feature cache, which holds the "
                "target's top-k logits only: set distill_top_k (at most the "
                "cache's k), or distill_weight 0."
            )
        for field in ("autocast_dtype", "target_dtype"):
            if getattr(self, field) not in DTYPES:
                raise TrainConfigError(f"{field} must be one of {', '.join(DTYPES)}.")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise TrainConfigError(
                f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}.")
        if self.sliding_window < 0 or self.checkpoint_every < 1 or self.log_every < 1:
            raise TrainConfigError(
                "sliding_window must be >= 0, checkpoint_every and log_every >= 1."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _build(cls: type, raw: Any, where: str) -> Any:
    """Dataclass from a dict: unknown keys rejected, lists made tuples."""
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{where} must be a mapping, got {type(raw).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise TrainConfigError(
            f"unknown key {unknown[0]!r} in {where}; allowed: {', '.join(fields)}."
        )
    values = {}
    for name, value in raw.items():
        if name == "stages":
            value = tuple(
                _build(StageConfig, s, f"stages[{i}]") for i, s in enumerate(value)
            )
        elif name == "sources":
            value = tuple(
                _build(SourceConfig, s, f"{where}.sources[{i}]")
                for i, s in enumerate(value)
            )
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    try:
        return cls(**values)
    except TypeError as err:  # a required field is missing
        raise TrainConfigError(f"{where}: {err}") from None


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, raw, "the config")


def load_config(path: str | Path) -> TrainConfig:
    """Read a config file: ``.yaml``/``.yml`` with PyYAML, anything else as JSON."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise TrainConfigError(f"cannot read config {str(path)!r}: {err}") from err
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise TrainConfigError(
                f"{path.name} is YAML but PyYAML is not installed: "
                "`pip install pyyaml`, or write the config as JSON."
            ) from None
        raw = yaml.safe_load(text)
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise TrainConfigError(f"{str(path)!r} is not valid JSON: {err}") from err
    return config_from_dict(raw)
