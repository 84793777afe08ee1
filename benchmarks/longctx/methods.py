"""The decoding methods the suite compares, as vLLM speculative configs.

Every method runs with the same engine settings and prompts; only
``speculative_config`` differs. A method that cannot run here (a missing
package, no draft) is recorded in the results with the reason instead of
failing the suite. Adding a method is one entry in ``METHODS``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SpeculativeConfig = dict[str, Any] | None

# Prompt lookup with the same verification budget as LongSpec's default K=4.
# A 1-token match is mostly noise on prose, so matches need 2 to 5 tokens
# (vLLM tries the longest first; its default is exactly 5).
NGRAM_CONFIG = {"method": "ngram", "num_speculative_tokens": 4,
                "prompt_lookup_min": 2, "prompt_lookup_max": 5}
# Suffix decoding (Arctic Inference) sizes its drafts itself; vLLM's defaults.
SUFFIX_CONFIG = {"method": "suffix"}


DEFAULT_TREE = (4, 4, 4, 4)  # beam widths per level (docs/tree-speculation.md)


@dataclass(frozen=True)
class MethodOptions:
    draft: str | None  # LongSpec draft directory
    num_speculative_tokens: int  # K for LongSpec chains
    tree: tuple[int, ...] = DEFAULT_TREE  # level widths for LongSpec trees


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    config: Callable[[MethodOptions], SpeculativeConfig]
    unavailable: Callable[[MethodOptions], str | None] = lambda options: None


def _package_missing(module: str, install_hint: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as error:  # an installed package can fail to import, too
        return f"{module} does not import ({error!r}); {install_hint}"
    return None


def _longspec_config(options: MethodOptions) -> SpeculativeConfig:
    return {"method": "longspec", "model": options.draft,
            "num_speculative_tokens": options.num_speculative_tokens}


def _no_draft(options: MethodOptions) -> str | None:
    if options.draft is None:
        return ("no LongSpec draft: none ships in vllm_longspec/drafts/ yet; pass "
                "--draft DIR (or --draft random for an untrained one)")
    return None


def _tree_config(options: MethodOptions) -> SpeculativeConfig:
    return {"method": "longspec", "model": options.draft, "tree": list(options.tree)}


METHODS: dict[str, Method] = {method.name: method for method in (
    Method("plain", "vLLM without speculative decoding", lambda options: None),
    Method("ngram", "vLLM prompt lookup (K=4, n-grams of 2-5 tokens)",
           lambda options: dict(NGRAM_CONFIG)),
    Method("suffix", "vLLM suffix decoding (Arctic Inference)",
           lambda options: dict(SUFFIX_CONFIG),
           lambda options: _package_missing(
               "arctic_inference", "pip install arctic-inference==0.1.1")),
    Method("longspec", "LongSpec chain drafting", _longspec_config, _no_draft),
    Method("longspec_tree", "LongSpec tree drafting (dynamic beam tree)",
           _tree_config, _no_draft),
)}
BASELINE = "plain"
