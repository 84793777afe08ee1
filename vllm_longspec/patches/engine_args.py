"""Patch: ``vllm.engine.arg_utils.EngineArgs.create_speculative_config``.

Target: the one place where both ``vllm serve`` and ``LLM(...)`` turn the user's
    ``speculative_config`` dict into vLLM's ``SpeculativeConfig``.
Why: ``SpeculativeConfig.method`` is a closed ``Literal`` checked by pydantic
    before any hook runs, so ``"longspec"`` would be rejected.
How: for ``{"method": "longspec", ...}`` validate the LongSpec keys and the draft
    directory against the target (clear errors, before anything loads), then
    let the original build a ``"draft_model"`` config for the same directory and
    mark its hf_config as a LongSpec draft: architecture, and the resolved
    settings (``LongSpecSettings``, read back by the workers). Both
    layouts get here: a published checkpoint's architecture name
    (``LlamaGlideDecoderLayer``, ...) is registered with vLLM as an alias of
    the LongSpec class (``plugin.register``), because vLLM builds the draft's
    model config from config.json, with no overrides a caller can pass. A tree
    reserves one speculative slot per node (the runner patch switches the hybrid
    tree attention backend on in the worker). Nothing is written to the
    environment. Any other config goes to the original untouched.
When it can go: when vLLM lets plugins register speculative methods.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm_longspec.config import (
    METHOD_NAME,
    LongSpecConfig,
    LongSpecSettings,
    check_tree_depth,
)

_orig_create_speculative_config = None


class UnsupportedConfigurationError(ValueError):
    """LongSpec was asked for together with a vLLM feature it does not support."""


def _longspec_request(engine_args) -> dict[str, Any] | None:
    """The user's LongSpec options, or None when LongSpec was not asked for."""
    options = dict(engine_args.speculative_config or {})
    for key, value in (
        ("method", engine_args.spec_method),
        ("model", engine_args.spec_model),
        ("num_speculative_tokens", engine_args.spec_tokens),
    ):
        if value is not None:
            options.setdefault(key, value)
    return options if options.get("method") == METHOD_NAME else None


def check_engine_supported(engine_args, target_parallel_config) -> None:
    if target_parallel_config.pipeline_parallel_size > 1:
        raise UnsupportedConfigurationError(
            "LongSpec does not support pipeline parallelism "
            "(--pipeline-parallel-size > 1): the draft reads the target's last "
            "layer cache, which lives on another rank. Use tensor parallelism."
        )
    if engine_args.kv_cache_dtype not in (None, "auto"):
        raise UnsupportedConfigurationError(
            f"LongSpec does not support --kv-cache-dtype {engine_args.kv_cache_dtype}: "
            "the draft reads the target's KV cache as stored and needs it "
            "unquantized. Drop --kv-cache-dtype."
        )
    from vllm import envs

    if envs.VLLM_USE_V2_MODEL_RUNNER:
        raise UnsupportedConfigurationError(
            "LongSpec drives vLLM's V1 model runner, but VLLM_USE_V2_MODEL_RUNNER=1 "
            "asks for V2. Unset it (LongSpec makes vLLM choose V1, "
            "patches/v2_runner.py).")


def build_longspec_speculative_config(
    engine_args, options, target_model_config, target_parallel_config
):
    from vllm_longspec.model.checkpoint import (
        ARCHITECTURE,
        check_draft_matches_target,
        read_draft_checkpoint,
    )

    config = LongSpecConfig.from_user_dict(options)
    draft = read_draft_checkpoint(config.model)
    check_draft_matches_target(draft, target_model_config.hf_text_config)
    check_tree_depth(config.tree, draft.trained_noise_shift)
    check_engine_supported(engine_args, target_parallel_config)
    if config.tree is not None:
        check_tree_platform()
    settings = LongSpecSettings(
        config.resolve(draft.sliding_window, draft.recommended_num_speculative_tokens),
        draft.draft_vocab_size)

    engine_args.spec_method = engine_args.spec_model = engine_args.spec_tokens = None
    engine_args.speculative_config = {
        "method": "draft_model",
        "model": str(draft.path),
        "num_speculative_tokens": settings.config.num_speculative_tokens,
        "draft_sample_method": config.draft_sample_method,
        # The draft is one small block run eagerly; no graphs to capture.
        "enforce_eager": True,
    }
    speculative_config = _orig_create_speculative_config(
        engine_args, target_model_config, target_parallel_config
    )
    hf_config = speculative_config.draft_model_config.hf_config
    hf_config.architectures = [ARCHITECTURE]
    settings.store(hf_config)
    speculative_config.update_arch_()
    return speculative_config


def check_tree_platform() -> None:
    """Trees are verified on vLLM's CPU backend only (the hybrid backend itself
    is registered in the worker, ``patches/model_runner.py``)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise UnsupportedConfigurationError(
            "LongSpec key 'tree' needs vLLM's CPU backend for now: the tree runner "
            "moves accepted K/V in vLLM's CPU cache layout (a GPU hybrid attention "
            "backend exists, untested, but no GPU tree runner). Leave 'tree' out to "
            "draft chains.")


def apply() -> None:
    global _orig_create_speculative_config
    from vllm.engine.arg_utils import EngineArgs

    if _orig_create_speculative_config is not None:
        return
    _orig_create_speculative_config = EngineArgs.create_speculative_config

    @functools.wraps(_orig_create_speculative_config)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        options = _longspec_request(self)
        if options is None:
            return _orig_create_speculative_config(
                self, target_model_config, target_parallel_config
            )
        return build_longspec_speculative_config(
            self, options, target_model_config, target_parallel_config
        )

    EngineArgs.create_speculative_config = create_speculative_config
