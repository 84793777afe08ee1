"""Patch: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner.__init__``.

Target: the V1 model runner's constructor (``CPUModelRunner`` inherits it).
Why: for method "draft_model" the runner builds a plain ``DraftModelProposer``;
    a LongSpec draft needs ``LongSpecProposer`` (shared embedding and LM head,
    cross-attention into the target cache, its own KV cache group). Tree mode
    also needs tree verification, which vLLM's ``RejectionSampler`` lacks, and
    the hybrid attention backend.
How: run the original constructor, then, only when the draft is a LongSpec
    draft, replace ``self.drafter``. ``LongSpecProposer`` subclasses
    ``DraftModelProposer``, so every ``isinstance`` dispatch in the runner still
    takes the draft-model branches. Nothing has been loaded at that point.
    Wrap ``self.rejection_sampler`` in ``SeededChainVerification`` (seeded
    requests get plain decoding's tokens, ``runner/seeded.py``). In tree
    mode, and for chains with ``hybrid_chains``, register the hybrid attention
    backend (before the model is built, in this process); in tree mode wrap the
    sampler in ``TreeRejectionSampler`` (the chain sampler still serves every
    step without trees). The other runner
    patches reach LongSpec's state through ``self.drafter``
    (``longspec_proposer``); nothing else is added to the runner.
When it can go: when vLLM lets plugins provide a proposer for a draft model.
"""

from __future__ import annotations

import functools

_orig___init__ = None


def longspec_proposer(runner):
    """The runner's ``LongSpecProposer``, else None (another method, no draft)."""
    from vllm_longspec.runner.proposer import LongSpecProposer

    drafter = getattr(runner, "drafter", None)
    return drafter if isinstance(drafter, LongSpecProposer) else None


def is_longspec_speculation(vllm_config) -> bool:
    from vllm_longspec.model.checkpoint import is_longspec_architecture

    spec = vllm_config.speculative_config
    if spec is None or spec.method != "draft_model" or spec.draft_model_config is None:
        return False
    return is_longspec_architecture(spec.draft_model_config.hf_config.architectures)


def apply() -> None:
    global _orig___init__
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if _orig___init__ is not None:
        return
    _orig___init__ = GPUModelRunner.__init__

    @functools.wraps(_orig___init__)
    def __init__(self, vllm_config, device, *args, **kwargs):
        _orig___init__(self, vllm_config, device, *args, **kwargs)
        if is_longspec_speculation(vllm_config) and hasattr(self, "drafter"):
            from vllm_longspec.runner.proposer import LongSpecProposer
            from vllm_longspec.runner.seeded import SeededChainVerification

            self.drafter = LongSpecProposer(self.vllm_config, self.device, self)
            self.rejection_sampler = SeededChainVerification(self.rejection_sampler, self)
            if self.drafter.tree_rounds is not None or self.drafter.hybrid_chains:
                from vllm_longspec.patches import attention_backend

                attention_backend.register()
            if self.drafter.tree_rounds is not None:
                from vllm_longspec.runner.verification import TreeRejectionSampler

                self.rejection_sampler = TreeRejectionSampler(
                    self.rejection_sampler, self, self.drafter.tree_rounds)

    GPUModelRunner.__init__ = __init__
