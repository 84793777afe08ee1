"""Tree speculation in plain torch (no vLLM): tree structures, the dynamic beam
tree builder and lossless verification. See docs/tree-speculation.md."""

from vllm_longspec.tree.beam import BeamTree, BeamTreeBuilder, TreeLevel
from vllm_longspec.tree.sampling import BatchSampling
from vllm_longspec.tree.structure import DraftTree, RaggedTrees
from vllm_longspec.tree.top_k_top_p import TopKTopP, top_k_top_p_reference
from vllm_longspec.tree.verify import (
    Verification,
    VerifyNoise,
    verify,
    verify_by_target_draws,
    verify_greedy,
    verify_sampling,
)
from vllm_longspec.tree.vocabulary import DraftVocabulary

__all__ = [
    "BatchSampling",
    "BeamTree",
    "BeamTreeBuilder",
    "DraftTree",
    "DraftVocabulary",
    "RaggedTrees",
    "TopKTopP",
    "TreeLevel",
    "Verification",
    "VerifyNoise",
    "top_k_top_p_reference",
    "verify",
    "verify_by_target_draws",
    "verify_greedy",
    "verify_sampling",
]
