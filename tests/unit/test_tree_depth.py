"""Trees are capped to the noise shifts the draft was trained with.

A tree of L levels drafts level d + 1 from its depth-d nodes with noise shift
d + 1 (``tests/unit/test_tree_draft_parity.py`` checks that against the training
model), so it needs shifts 1..L; a level beyond the trained range would run the
draft on a visibility it never saw. Start-up refuses it with the fix named.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_longspec.config import (
    DEFAULT_TRAINED_NOISE_SHIFT,
    LongSpecConfigError,
    check_tree_depth,
)
from vllm_longspec.model.checkpoint import DraftCheckpoint


def test_trained_noise_shift_is_read_from_the_summary_or_defaults():
    def shifts(longspec):
        return DraftCheckpoint(Path("."), {"longspec": longspec}, {}).trained_noise_shift

    assert shifts({}) == DEFAULT_TRAINED_NOISE_SHIFT == (1, 4)
    assert shifts({"trained": {"steps": 3}}) == (1, 4)
    assert shifts({"trained": {"noise_shift": [1, 6]}}) == (1, 6)


@pytest.mark.parametrize("tree,shifts", [
    (None, (1, 1)), ((4, 4, 4, 4), (1, 4)), ((2, 2, 2), (1, 3)), ((1, 8), (1, 2)),
    ((2,) * 6, (1, 6)),
])
def test_trees_within_the_trained_shifts_pass(tree, shifts):
    check_tree_depth(tree, shifts)


def test_a_deeper_tree_is_refused_with_the_fix():
    with pytest.raises(LongSpecConfigError) as error:
        check_tree_depth((4, 16, 16, 16, 16), (1, 4))
    message = str(error.value)
    assert "[4, 16, 16, 16, 16] has 5 levels" in message
    assert "uses noise shift 5" in message
    assert "trained with noise shifts 1..4" in message
    assert "at most 4 levels, e.g. [4, 16, 16, 16]" in message
    assert "noise_shift [1, 5]" in message
    with pytest.raises(LongSpecConfigError, match="has 4 levels"):
        check_tree_depth((2, 2, 2, 2), (1, 3))


def _engine_config(target_dir, speculative_config):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_longspec.plugin

    vllm_longspec.plugin.register()
    return EngineArgs(model=str(target_dir), dtype="float32", max_model_len=2048,
                      speculative_config=speculative_config).create_engine_config()


def test_start_up_reads_the_drafts_trained_shifts(tmp_path, target_dir, target_config):
    from vllm_longspec.model.checkpoint import random_draft_state, save_draft

    draft = save_draft(tmp_path, random_draft_state(target_config), target_config,
                       {"sliding_window": 512, "trained": {"noise_shift": [1, 3]}})
    spec = {"method": "longspec", "model": str(draft)}
    config = _engine_config(target_dir, {**spec, "tree": [2, 2, 2]})
    assert config.speculative_config.num_speculative_tokens == 6
    with pytest.raises(LongSpecConfigError, match=r"trained with noise shifts 1\.\.3"):
        _engine_config(target_dir, {**spec, "tree": [2, 2, 2, 2]})


def test_drafts_without_a_summary_get_the_reference_range(target_dir, random_draft_dir):
    spec = {"method": "longspec", "model": str(random_draft_dir)}
    config = _engine_config(target_dir, {**spec, "tree": [4, 4, 4, 4]})
    assert config.speculative_config.num_speculative_tokens == 16
    with pytest.raises(LongSpecConfigError, match="uses noise shift 5"):
        _engine_config(target_dir, {**spec, "tree": [4, 4, 4, 4, 4]})
