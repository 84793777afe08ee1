"""Patch: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner._build_attention_metadata``.

Target: the runner's build of the target forward's attention metadata (every
    KV cache group's builder), inherited by ``CPUModelRunner``.
Why: in LongSpec tree mode the hybrid tree attention backend must see the
    step's trees while its builders run, and only then (the draft's own builds,
    during drafting, use the same backend class).
How: run the original inside ``spec_trees(step.attention)`` when the step
    verifies trees (``TreeRounds.step``); the batch names the target's layers,
    so the draft group's builder in this same build ignores it. Otherwise the
    original alone.
When it can go: when vLLM verifies speculative trees itself.
"""

from __future__ import annotations

import functools

_orig__build_attention_metadata = None


def apply() -> None:
    global _orig__build_attention_metadata
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_longspec.patches.model_runner import tree_rounds_of

    if _orig__build_attention_metadata is not None:
        return
    _orig__build_attention_metadata = GPUModelRunner._build_attention_metadata

    @functools.wraps(_orig__build_attention_metadata)
    def _build_attention_metadata(self, *args, **kwargs):
        rounds = tree_rounds_of(self)
        step = rounds.step if rounds is not None else None
        if step is None:
            return _orig__build_attention_metadata(self, *args, **kwargs)
        from vllm_longspec.attention.spec_trees import spec_trees

        with spec_trees(step.attention):
            return _orig__build_attention_metadata(self, *args, **kwargs)

    GPUModelRunner._build_attention_metadata = _build_attention_metadata
