"""Speculation algorithms that need neither vLLM nor the kernels: context lookup
(``lookup``) and the per-request speculation-length policy (``policy``)."""

from vllm_longspec.speculation.lookup import (
    NO_MATCH,
    ContextLookup,
    LookupProposal,
    LookupRule,
    TokenIndex,
)

__all__ = [
    "NO_MATCH",
    "ContextLookup",
    "LookupProposal",
    "LookupRule",
    "TokenIndex",
]
