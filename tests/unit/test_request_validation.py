"""Requests that tree mode cannot honour are refused alone, at submission.

vLLM's front end (``InputProcessor``, what ``LLM.generate`` and ``vllm serve``
run for every request) built from a real engine config, without an engine:
with a LongSpec tree, a request with penalties fails with vLLM's
``VLLMValidationError`` (HTTP 400 from ``vllm serve``); chains and plain
sampling pass. (In an engine that keeps serving: ``tests/e2e/test_tree_lossless.py``.)
"""

from __future__ import annotations

import pytest


def _input_processor(target_dir, speculative_config):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.input_processor import InputProcessor

    import vllm_longspec.plugin

    vllm_longspec.plugin.register()
    config = EngineArgs(model=str(target_dir), dtype="float32", max_model_len=2048,
                        speculative_config=speculative_config).create_engine_config()
    return InputProcessor(config)


def _validate(processor, **settings):
    from vllm.sampling_params import SamplingParams

    processor._validate_params(SamplingParams(max_tokens=4, **settings), ("generate",))


def test_tree_refuses_unsupported_settings(target_dir, random_draft_dir):
    from vllm.exceptions import VLLMValidationError

    processor = _input_processor(target_dir, {"method": "longspec",
                                              "model": str(random_draft_dir),
                                              "tree": [2, 2]})
    with pytest.raises(VLLMValidationError, match="sets repetition_penalty"):
        _validate(processor, repetition_penalty=1.1)
    with pytest.raises(VLLMValidationError, match="sets logprobs"):
        _validate(processor, temperature=0.7, logprobs=2)
    _validate(processor, temperature=0.7, top_k=40, top_p=0.9)  # supported: passes
    _validate(processor, temperature=0.0)


def test_chains_accept_every_setting(target_dir, random_draft_dir):
    processor = _input_processor(target_dir, {"method": "longspec",
                                              "model": str(random_draft_dir)})
    _validate(processor, repetition_penalty=1.1)
    _validate(processor, temperature=0.7, logprobs=2)
