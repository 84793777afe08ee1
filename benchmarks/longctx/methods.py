"""The decoding methods the suite compares, as vLLM speculative configs.

Every method runs with the same engine settings and prompts; only
``speculative_config`` differs. A method that cannot run here (a missing
package, no draft) is recorded in the results with the reason instead of
failing the suite. Adding a method is one entry in ``METHODS``.

A *method spec* (an entry of ``--methods``) is a method's name, optionally with
parameters after a colon: ``longspec:2`` is a LongSpec chain of K=2 tokens,
``longspec_tree:4,4,4,4`` a LongSpec tree with those level widths. A bare
``longspec`` / ``longspec_tree`` takes K / the widths from ``--k`` / ``--tree``.
The canonical spec string (``parse_spec``) is the method's identity in cell
keys, results, tables and plots; ``spec_slug`` turns it into a file name.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm_longspec.config import (
    DEFAULT_TREE,  # the plugin's `"tree": true`
    MAX_NUM_SPECULATIVE_TOKENS,
    MAX_TREE_NODES,
)

SpeculativeConfig = dict[str, Any] | None

# Prompt lookup with the same verification budget as LongSpec's default K=4.
# A 1-token match is mostly noise on prose, so matches need 2 to 5 tokens
# (vLLM tries the longest first; its default is exactly 5).
NGRAM_CONFIG = {"method": "ngram", "num_speculative_tokens": 4,
                "prompt_lookup_min": 2, "prompt_lookup_max": 5}
# Suffix decoding (Arctic Inference) sizes its drafts itself; vLLM's defaults.
SUFFIX_CONFIG = {"method": "suffix"}


@dataclass(frozen=True)
class MethodOptions:
    draft: str | None  # LongSpec draft directory
    num_speculative_tokens: int | None  # K for LongSpec chains (None: the plugin's)
    tree: tuple[int, ...] = DEFAULT_TREE  # level widths for LongSpec trees


class MethodSpecError(ValueError):
    """A malformed method spec or parameter (the message says what is wrong)."""


@dataclass(frozen=True)
class Parameters:
    """How a method takes parameters after the colon of its spec."""

    syntax: str  # how ``--help`` shows them, e.g. "K"
    # Text after the colon -> (its canonical text, MethodOptions overrides);
    # raises MethodSpecError.
    parse: Callable[[str], tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class Method:
    name: str
    summary: Callable[[MethodOptions], str]
    config: Callable[[MethodOptions], SpeculativeConfig]
    unavailable: Callable[[MethodOptions], str | None] = lambda options: None
    parameters: Parameters | None = None  # None: the method takes none

    @property
    def syntax(self) -> str:
        return f"{self.name}:{self.parameters.syntax}" if self.parameters else self.name


def _package_missing(module: str, install_hint: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as error:  # an installed package can fail to import, too
        return f"{module} does not import ({error!r}); {install_hint}"
    return None


def _longspec_config(options: MethodOptions, **switches: bool) -> SpeculativeConfig:
    """A LongSpec chain with the plugin's defaults, or with ``switches``
    (``context_lookup``, ``adaptive``, ``hybrid_chains``) set: the ablation variants."""
    k = options.num_speculative_tokens
    return {"method": "longspec", "model": options.draft,
            **({"num_speculative_tokens": k} if k else {}), **switches}


def _chain_summary(options: MethodOptions, what: str) -> str:
    k = options.num_speculative_tokens
    return f"LongSpec chain, {f'K<={k}' if k else 'the default K'}, {what}"


def _longspec_variant(name: str, what: str, **switches: bool) -> Method:
    return Method(name, lambda options: _chain_summary(options, what),
                  lambda options: _longspec_config(options, **switches),
                  _no_draft, Parameters("K", _parse_k))


def _no_draft(options: MethodOptions) -> str | None:
    if options.draft is None:
        return ("no LongSpec draft: none ships in vllm_longspec/drafts/ yet; pass "
                "--draft DIR (or --draft random for an untrained one)")
    return None


def _tree_config(options: MethodOptions) -> SpeculativeConfig:
    return {"method": "longspec", "model": options.draft, "tree": list(options.tree)}


def _tree_summary(options: MethodOptions) -> str:
    widths = options.tree
    if all(width == 1 for width in widths):  # vllm_longspec/config.py: a chain
        return f"LongSpec tree {_dashed(widths)} (width 1: a chain of K={len(widths)})"
    return (f"LongSpec tree {_dashed(widths)} (dynamic beam tree, {sum(widths)} "
            f"nodes, depth {len(widths)})")


def _dashed(widths: tuple[int, ...]) -> str:
    return "-".join(map(str, widths))


def _positive(text: str, what: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise MethodSpecError(f"{what} must be a positive integer, got {text!r}")
    return int(text)


def chain_length(text: str) -> int:
    """K of a LongSpec chain, as vllm_longspec/config.py accepts it."""
    k = _positive(text, "K")
    if k > MAX_NUM_SPECULATIVE_TOKENS:
        raise MethodSpecError(f"K must be at most {MAX_NUM_SPECULATIVE_TOKENS}, got {k}")
    return k


def tree_widths(items: list[str]) -> tuple[int, ...]:
    """Level widths of a LongSpec tree, as vllm_longspec/config.py accepts them."""
    if not items:
        raise MethodSpecError("a tree needs at least one level width")
    widths = tuple(_positive(item, "a level width") for item in items)
    if sum(widths) > MAX_TREE_NODES:
        raise MethodSpecError(f"tree {_dashed(widths)} has {sum(widths)} nodes; at "
                              f"most {MAX_TREE_NODES} fit one verification forward")
    return widths


def _parse_k(text: str) -> tuple[str, dict[str, Any]]:
    k = chain_length(text)
    return str(k), {"num_speculative_tokens": k}


def _parse_tree(text: str) -> tuple[str, dict[str, Any]]:
    widths = tree_widths(text.split(","))
    return ",".join(map(str, widths)), {"tree": widths}


def _fixed(summary: str) -> Callable[[MethodOptions], str]:
    return lambda options: summary


METHODS: dict[str, Method] = {method.name: method for method in (
    Method("plain", _fixed("vLLM without speculative decoding"), lambda options: None),
    Method("ngram", _fixed("vLLM prompt lookup (K=4, n-grams of 2-5 tokens)"),
           lambda options: dict(NGRAM_CONFIG)),
    Method("suffix", _fixed("vLLM suffix decoding (Arctic Inference)"),
           lambda options: dict(SUFFIX_CONFIG),
           lambda options: _package_missing(
               "arctic_inference", "pip install arctic-inference==0.1.1")),
    Method("longspec",
           lambda options: _chain_summary(
               options, "the plugin's defaults (context lookup + adaptive policy)"),
           _longspec_config, _no_draft, Parameters("K", _parse_k)),
    # The ablation of issue 14: the draft alone, and one feature at a time.
    _longspec_variant("longspec_draft", "the draft alone, every step",
                      context_lookup=False, adaptive=False),
    _longspec_variant("longspec_lookup", "context lookup, no policy",
                      context_lookup=True, adaptive=False),
    _longspec_variant("longspec_policy", "adaptive policy, no lookup",
                      context_lookup=False, adaptive=True),
    _longspec_variant("longspec_stock_kernel",
                      "the defaults, chains verified with vLLM's attention kernel",
                      hybrid_chains=False),
    Method("longspec_tree", _tree_summary, _tree_config, _no_draft,
           Parameters("W1,W2,...", _parse_tree)),
)}
BASELINE = "plain"
# Method names are plain identifiers, so that ``spec_slug`` is reversible.
assert all(re.fullmatch(r"[a-z][a-z0-9_]*", name) for name in METHODS)


@dataclass(frozen=True)
class MethodSpec:
    """A method with its parameters: one entry of ``--methods``."""

    spec: str  # canonical, e.g. "longspec_tree:4,4,4,4": the method's identity
    method: Method
    overrides: tuple[tuple[str, Any], ...] = ()  # MethodOptions fields it sets

    def options(self, options: MethodOptions) -> MethodOptions:
        """The run's options (``--draft``, ``--k``, ``--tree``) with this spec's."""
        return dataclasses.replace(options, **dict(self.overrides))

    def summary(self, options: MethodOptions) -> str:
        return self.method.summary(self.options(options))

    def config(self, options: MethodOptions) -> SpeculativeConfig:
        return self.method.config(self.options(options))

    def unavailable(self, options: MethodOptions) -> str | None:
        return self.method.unavailable(self.options(options))


def method_syntax() -> str:
    return ", ".join(f"{m.name}[:{m.parameters.syntax}]" if m.parameters else m.name
                     for m in METHODS.values())


def parse_spec(spec: str) -> MethodSpec:
    """``NAME`` or ``NAME:PARAMETERS``; raises MethodSpecError when malformed."""
    name, colon, text = spec.partition(":")
    method = METHODS.get(name)
    if method is None:
        raise MethodSpecError(f"unknown method {name!r}"
                              + (f" in {spec!r}" if colon else "")
                              + f"; methods: {method_syntax()}")
    if not colon:
        return MethodSpec(name, method)
    if method.parameters is None:
        raise MethodSpecError(f"method {name!r} takes no parameters, got {spec!r}")
    try:
        canonical, overrides = method.parameters.parse(text)
    except MethodSpecError as error:
        raise MethodSpecError(f"bad {spec!r} (expected {method.syntax}): {error}"
                              ) from None
    return MethodSpec(f"{name}:{canonical}", method, tuple(sorted(overrides.items())))


def spec_slug(spec: str) -> str:
    """A file name for a canonical spec: ``longspec_tree:4,4,4,4`` ->
    ``longspec_tree-4-4-4-4``. Method names hold no '-' and parameters are
    numbers, so ``spec_from_slug`` recovers the spec (no two specs share one)."""
    return spec.replace(":", "-").replace(",", "-")


def spec_from_slug(slug: str) -> str:
    name, dash, parameters = slug.partition("-")
    return f"{name}:{parameters.replace('-', ',')}" if dash else name
