"""Speculation algorithms that need neither vLLM nor the kernels: context lookup
(``lookup``), step cost (``cost``) and the per-request speculation length policy
(``policy``)."""

from vllm_longspec.speculation.cost import CostModel, CostPrior
from vllm_longspec.speculation.lookup import (
    NO_MATCH,
    ContextLookup,
    LookupProposal,
    LookupRule,
    TokenIndex,
)
from vllm_longspec.speculation.policy import (
    DRAFT,
    LOOKUP,
    PolicyConfig,
    Request,
    SpeculationPolicy,
    StepPlan,
    static_schedule,
)

__all__ = [
    "DRAFT",
    "LOOKUP",
    "NO_MATCH",
    "ContextLookup",
    "CostModel",
    "CostPrior",
    "LookupProposal",
    "LookupRule",
    "PolicyConfig",
    "Request",
    "SpeculationPolicy",
    "StepPlan",
    "TokenIndex",
    "static_schedule",
]
