"""Patch: ``vllm.v1.engine.input_processor.InputProcessor._validate_params``.

Target: the front end's per-request validation of ``SamplingParams`` (runs in
    the API server / ``LLM`` process, before a request reaches the engine).
Why: tree speculation cannot honour some sampling settings
    (``runner/sampling.py``). Refusing them here fails that one request
    with a ``VLLMValidationError`` (HTTP 400 from ``vllm serve``, raised by
    ``LLM.generate``); found in the worker, the same check could only stop the
    engine.
How: run the original, then, if the engine drafts LongSpec trees, check the
    request. Without tree mode: the original alone.
When it can go: when tree mode supports every sampling setting.
"""

from __future__ import annotations

import functools

_orig__validate_params = None


def drafts_trees(speculative_config) -> bool:
    """Whether an engine with this speculative config drafts LongSpec trees."""
    from vllm_longspec.config import LongSpecSettings

    draft_model_config = getattr(speculative_config, "draft_model_config", None)
    hf_config = getattr(draft_model_config, "hf_config", None)
    settings = LongSpecSettings.of(hf_config) if hf_config is not None else None
    return settings is not None and settings.config.tree is not None


def apply() -> None:
    global _orig__validate_params
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_longspec.runner.sampling import (
        UnsupportedTreeSamplingError,
        check_request_supported,
    )

    if _orig__validate_params is not None:
        return
    _orig__validate_params = InputProcessor._validate_params

    @functools.wraps(_orig__validate_params)
    def _validate_params(self, params, supported_tasks):
        result = _orig__validate_params(self, params, supported_tasks)
        if isinstance(params, SamplingParams) and drafts_trees(self.speculative_config):
            try:
                check_request_supported(None, params)
            except UnsupportedTreeSamplingError as error:
                raise VLLMValidationError(str(error), parameter=error.settings[0]) from None
        return result

    InputProcessor._validate_params = _validate_params
