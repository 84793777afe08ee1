"""The trainer's checkpoint: one file, written atomically, the latest only.

``output_dir/checkpoint-last.pt`` holds everything an exact resume needs: draft
weights, AdamW state, the step counters (the learning rate is a function of
them), the data stream position, the RNG states, and the config it was made
with. It is written to a temporary file in the same directory, flushed to disk,
and renamed over the previous one, so a crash leaves either the old or the new
checkpoint, never a torn one. (Not to be confused with the exported draft,
``output_dir/draft``, see ``vllm_longspec.model.checkpoint``.)
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint-last.pt"


def checkpoint_path(output_dir: str | Path) -> Path:
    return Path(output_dir).expanduser() / CHECKPOINT_NAME


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    # Our own file; it holds numpy/python RNG states, hence weights_only=False.
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_states() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
