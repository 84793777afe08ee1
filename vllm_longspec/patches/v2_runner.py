"""Patch: ``vllm.config.VllmConfig._get_v2_model_runner_unsupported_features``.

Target: the list of features the V2 model runner lacks, which
    ``VllmConfig.use_v2_model_runner`` reads (in every process) to fall back to
    the V1 runner when ``VLLM_USE_V2_MODEL_RUNNER`` is unset.
Why: LongSpec's runner patches and proposer target the V1 runner; on a GPU with
    Triton vLLM would pick V2. (On CPU vLLM has no Triton and picks V1 anyway.)
How: run the original, then add LongSpec to the list when the speculative
    config is a LongSpec draft. vLLM then logs why and uses V1. An explicit
    ``VLLM_USE_V2_MODEL_RUNNER=1`` is refused at start-up
    (``engine_args.check_engine_supported``).
When it can go: when LongSpec has a V2 proposer.
"""

from __future__ import annotations

import functools

V2_UNSUPPORTED = "LongSpec speculative decoding"

_orig__get_v2_model_runner_unsupported_features = None


def apply() -> None:
    global _orig__get_v2_model_runner_unsupported_features
    from vllm.config import VllmConfig

    from vllm_longspec.patches.model_runner import is_longspec_speculation

    if _orig__get_v2_model_runner_unsupported_features is not None:
        return
    _orig__get_v2_model_runner_unsupported_features = (
        VllmConfig._get_v2_model_runner_unsupported_features)

    @functools.wraps(_orig__get_v2_model_runner_unsupported_features)
    def _get_v2_model_runner_unsupported_features(self) -> list[str]:
        unsupported = _orig__get_v2_model_runner_unsupported_features(self)
        if is_longspec_speculation(self):
            unsupported.append(V2_UNSUPPORTED)
        return unsupported

    VllmConfig._get_v2_model_runner_unsupported_features = (
        _get_v2_model_runner_unsupported_features)
