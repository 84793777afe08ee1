"""Draft vocabulary: choosing the ids, writing them, and the checkpoint checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vllm_longspec.model.checkpoint import (
    DraftCheckpointError,
    check_draft_matches_target,
    random_draft_state,
    read_draft_checkpoint,
    save_draft,
)
from vllm_longspec.train.draft_vocab import (
    choose_draft_vocab,
    count_tokens,
    coverage,
    write_draft_vocab,
)


def test_count_and_choose_most_frequent_with_specials():
    counts = count_tokens([[5, 5, 5, 1, 2, 2], [7, 2]], vocab_size=10)
    assert counts.tolist() == [0, 1, 3, 0, 0, 3, 0, 1, 0, 0]
    ids = choose_draft_vocab(counts, size=3, always=[9])
    # 2 and 5 tie at 3 counts; then the special 9 takes the last slot
    assert ids.tolist() == [2, 5, 9]
    assert coverage(counts, ids) == pytest.approx(6 / 8)
    # ties broken by the lower id, result sorted
    assert choose_draft_vocab(counts, size=4).tolist() == [1, 2, 5, 7]


def test_choose_rejects_bad_sizes():
    counts = np.ones(10, dtype=np.int64)
    with pytest.raises(ValueError, match="size"):
        choose_draft_vocab(counts, size=0)
    with pytest.raises(ValueError, match="size"):
        choose_draft_vocab(counts, size=11)
    with pytest.raises(ValueError, match="size"):
        choose_draft_vocab(counts, size=1, always=[1, 2])


def test_written_vocabulary_is_read_and_checked(tmp_path, target_config):
    from types import SimpleNamespace

    directory = save_draft(tmp_path / "draft", random_draft_state(target_config),
                           target_config, {"sliding_window": 512})
    write_draft_vocab(directory, np.array([0, 3, 17, 4000]))
    draft = read_draft_checkpoint(directory)
    assert draft.draft_vocab_size == 4
    assert draft.shapes["draft_vocab"] == (4,)
    target = SimpleNamespace(**target_config)
    check_draft_matches_target(draft, target)

    # a config that disagrees with the stored ids is refused with the fix named
    config = json.loads((directory / "config.json").read_text())
    config["longspec"]["draft_vocab_size"] = 5
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(DraftCheckpointError, match="vllm-longspec draft-vocab"):
        check_draft_matches_target(read_draft_checkpoint(directory), target)
