"""LongSpecConfig: every bad key or value is rejected with a message naming it."""

from __future__ import annotations

import pytest

from vllm_longspec.config import LongSpecConfig, LongSpecConfigError


def test_minimal_config_gets_defaults():
    config = LongSpecConfig.from_user_dict({"method": "longspec", "model": "/d"})
    assert config == LongSpecConfig(model="/d")
    assert config.draft_sample_method == "probabilistic"
    assert config.context_lookup and config.adaptive and config.hybrid_chains
    off = LongSpecConfig.from_user_dict({"method": "longspec", "model": "/d",
                                         "hybrid-chains": False})
    assert not off.hybrid_chains


def test_default_k_is_a_ceiling_of_8_for_adaptive_chains_and_4_otherwise():
    def resolved(**options):
        config = LongSpecConfig.from_user_dict({"method": "longspec", "model": "/d",
                                                **options})
        return config.resolve(512, None).num_speculative_tokens

    assert resolved() == 8
    assert resolved(adaptive=False) == 4
    assert resolved(num_speculative_tokens=3) == 3
    assert resolved(tree=[2, 2]) == 4          # a tree's K is its nodes
    # a draft's recommendation comes before the method's default
    config = LongSpecConfig.from_user_dict({"method": "longspec", "model": "/d"})
    assert config.resolve(512, 5).num_speculative_tokens == 5


def test_dashes_are_accepted_like_vllm():
    config = LongSpecConfig.from_user_dict(
        {"method": "longspec", "model": "/d", "num-speculative-tokens": 3,
         "sliding-window": 256, "draft-sample-method": "greedy"})
    assert (config.num_speculative_tokens, config.sliding_window) == (3, 256)
    assert config.draft_sample_method == "greedy"


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"prompt_lookup_max": 3}, "Unknown key 'prompt_lookup_max'"),
        ({"num_speculative_tokens": 0}, "'num_speculative_tokens'"),
        ({"num_speculative_tokens": 17}, "'num_speculative_tokens'"),
        ({"num_speculative_tokens": "4"}, "'num_speculative_tokens'"),
        ({"num_speculative_tokens": True}, "'num_speculative_tokens'"),
        ({"sliding_window": -1}, "'sliding_window'"),
        ({"sliding_window": 5.5}, "'sliding_window'"),
        ({"draft_sample_method": "beam"}, "'draft_sample_method'"),
        ({"hybrid_chains": "yes"}, "'hybrid_chains' must be true or false"),
        ({"adaptive": 1}, "'adaptive' must be true or false"),
        ({"model": ""}, "'model' is required"),
        ({"model": None}, "'model' is required"),
    ],
)
def test_bad_keys_and_values_are_named(extra, message):
    with pytest.raises(LongSpecConfigError, match=message):
        LongSpecConfig.from_user_dict({"method": "longspec", "model": "/d", **extra})


def test_missing_model_is_named():
    with pytest.raises(LongSpecConfigError, match="'model' is required"):
        LongSpecConfig.from_user_dict({"method": "longspec"})


def test_tree_widths_set_the_number_of_draft_tokens():
    config = LongSpecConfig.from_user_dict(
        {"method": "longspec", "model": "/d", "tree": [4, 4, 4, 4]})
    assert config.tree == (4, 4, 4, 4)
    assert config.num_draft_tokens == 16
    assert LongSpecConfig.from_user_dict(
        {"method": "longspec", "model": "/d", "tree": [2, 2], "num_speculative_tokens": 4}
    ).num_draft_tokens == 4


def test_tree_true_is_the_default_shape_and_false_a_chain():
    from vllm_longspec.config import DEFAULT_TREE

    base = {"method": "longspec", "model": "/d"}
    assert LongSpecConfig.from_user_dict({**base, "tree": True}).tree == DEFAULT_TREE
    assert LongSpecConfig.from_user_dict({**base, "tree": False}).tree is None


def test_all_ones_tree_is_a_chain():
    config = LongSpecConfig.from_user_dict(
        {"method": "longspec", "model": "/d", "tree": [1, 1, 1]})
    assert config.tree is None
    assert config.num_speculative_tokens == config.num_draft_tokens == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"tree": []}, "Key 'tree' must be a non-empty list"),
        ({"tree": [2, 0]}, "Key 'tree' must be a non-empty list"),
        ({"tree": [2, 1.5]}, "Key 'tree' must be a non-empty list"),
        ({"tree": "4,4"}, "Key 'tree' must be a non-empty list"),
        ({"tree": [True, 2]}, "Key 'tree' must be a non-empty list"),
        ({"tree": [64, 64]}, "Key 'tree' .* has 128 nodes"),
        ({"tree": [2, 2], "num_speculative_tokens": 3}, "'num_speculative_tokens' is 3"),
        ({"tree": [1, 1], "num_speculative_tokens": 3}, "'num_speculative_tokens' is 3"),
        ({"tree": [2, 2], "draft_sample_method": "greedy"},
         "Key 'tree' needs 'draft_sample_method'"),
    ],
)
def test_bad_trees_are_named(extra, message):
    with pytest.raises(LongSpecConfigError, match=message):
        LongSpecConfig.from_user_dict({"method": "longspec", "model": "/d", **extra})


def test_tree_node_limit_matches_the_attention_kernels():
    from vllm_longspec.config import MAX_TREE_NODES
    from vllm_longspec.kernels.checks import MAX_SPEC_TOKENS

    assert MAX_TREE_NODES == MAX_SPEC_TOKENS - 1
