"""LongSpec settings: parsed and validated once, at engine start-up, then handed down.

A user asks for LongSpec with ``--speculative-config '{"method": "longspec", ...}'``
(or ``LLM(speculative_config={...})``). Only the keys below are accepted; anything
else is rejected with a message that names the key, before any model is loaded.

``LongSpecConfig`` is what the user asked for. At start-up
(``patches/engine_args.py``) it is completed from the draft checkpoint
(``LongSpecConfig.resolve``: every default applied there, once) and travels, as
``LongSpecSettings``, to every vLLM process inside the draft's hf_config; the
draft model, the proposer and request validation read it back with
``LongSpecSettings.of(hf_config)``, the one reader.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from vllm_longspec.tree.limits import MAX_NUM_SPECULATIVE_TOKENS, MAX_TREE_NODES

__all__ = ["MAX_NUM_SPECULATIVE_TOKENS", "MAX_TREE_NODES"]  # bounds of the keys below

METHOD_NAME = "longspec"

# Defaults of the method (paper and reference code).
DEFAULT_SLIDING_WINDOW = 512
DEFAULT_NUM_SPECULATIVE_TOKENS = 4
# With adaptive chains K is a ceiling: the policy picks each request's K below
# it every step. 8 lets a long context-lookup match propose 8 tokens, which
# verify for little more than 4 at batch 1 (benchmarks/paired_speed.py against
# K = 4, bfloat16: 0.99-1.28x at batch 1 on 4k-7k code and document QA, 1.01-1.04x
# at batch 8; 16 was within 5% of 8; docs/configuration.md).
DEFAULT_ADAPTIVE_NUM_SPECULATIVE_TOKENS = 8
# `"tree": true`: the shape measured best on the development machine (2-core
# CPU, shipped draft, 4k-7k prompts; docs/tree-speculation.md, "Measured").
DEFAULT_TREE = (2, 2, 2)
# Noise shifts j a draft was trained with (spec section 2: the reference draws
# j in 1..4; so does `vllm-longspec train` by default) when its config.json
# records none (``longspec.trained.noise_shift``): published drafts, random ones.
DEFAULT_TRAINED_NOISE_SHIFT = (1, 4)

DraftSampleMethod = Literal["greedy", "probabilistic"]


class LongSpecConfigError(ValueError):
    """A bad ``--speculative-config`` for method "longspec"."""


@dataclasses.dataclass(frozen=True)
class LongSpecConfig:
    """Validated LongSpec options.

    Attributes:
        model: directory of the draft (config.json + safetensors).
        num_speculative_tokens: draft tokens proposed per step (chain length K;
            with ``adaptive``, the most a request proposes). ``None`` means: the
            draft's recommendation, else 8 with ``adaptive``, else 4.
        sliding_window: tokens before the current one that the draft's
            self-attention sees. ``None`` means: the value the draft was trained
            with (config.json), else 512.
        draft_sample_method: "probabilistic" samples draft tokens from the draft
            distribution and hands its probabilities to the rejection sampler;
            "greedy" proposes the draft's argmax. Both are lossless; greedy
            requests always draft greedily.
        tree: level widths of the dynamic beam tree drafted each step, e.g.
            ``(4, 16, 16)`` (docs/tree-speculation.md); ``None`` drafts a chain.
            All widths 1 is a chain and is stored as ``None``.
        context_lookup: chains: propose what followed the latest tokens earlier
            in the request (prompt + output) when that match is long enough,
            instead of the draft's chain (``runner/adaptive_chains.py``).
        adaptive: chains: choose each request's number of speculative tokens
            (0..num_speculative_tokens) every step from its measured acceptance
            and the measured cost of drafting and verifying
            (``speculation/policy.py``); off: always the full chain.
        hybrid_chains: chains: verify each request's proposed tokens with the
            hybrid attention kernel trees use (``attention/cpu_backend.py``: one
            pass over the cached prefix for all of a row's tokens, bf16 dot
            products) instead of vLLM's CPU kernel. CPU only; on a GPU the hybrid
            backend runs only with ``VLLM_LONGSPEC_GPU=1``. Off: vLLM's kernel.
    """

    model: str
    num_speculative_tokens: int | None = None
    sliding_window: int | None = None
    draft_sample_method: DraftSampleMethod = "probabilistic"
    tree: tuple[int, ...] | None = None
    context_lookup: bool = True
    adaptive: bool = True
    hybrid_chains: bool = True

    @classmethod
    def allowed_keys(cls) -> tuple[str, ...]:
        return ("method",) + tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_user_dict(cls, user: dict[str, Any]) -> LongSpecConfig:
        """Parse the user's speculative-config dict (keys may use '-' or '_')."""
        options = {str(k).replace("-", "_"): v for k, v in user.items()}
        unknown = sorted(set(options) - set(cls.allowed_keys()))
        if unknown:
            raise LongSpecConfigError(
                f"Unknown key {unknown[0]!r} in --speculative-config for method "
                f"{METHOD_NAME!r}. Allowed keys: {', '.join(cls.allowed_keys())}."
            )
        if options.get("method") != METHOD_NAME:
            raise LongSpecConfigError(
                f"'method' must be {METHOD_NAME!r}, got {options.get('method')!r}."
            )
        options.pop("method")

        model = options.get("model")
        if not isinstance(model, str) or not model:
            raise LongSpecConfigError(
                "Key 'model' is required: the directory of a LongSpec draft "
                "(config.json + safetensors), e.g. one exported by "
                "`vllm-longspec train`."
            )
        k = options.get("num_speculative_tokens")
        if k is not None and (
            isinstance(k, bool)
            or not isinstance(k, int)
            or not 1 <= k <= MAX_NUM_SPECULATIVE_TOKENS
        ):
            raise LongSpecConfigError(
                f"Key 'num_speculative_tokens' must be an integer in "
                f"1..{MAX_NUM_SPECULATIVE_TOKENS}, got {k!r}."
            )
        window = options.get("sliding_window")
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise LongSpecConfigError(
                f"Key 'sliding_window' must be a positive integer, got {window!r}."
            )
        sample = options.get("draft_sample_method", "probabilistic")
        if sample not in ("greedy", "probabilistic"):
            raise LongSpecConfigError(
                "Key 'draft_sample_method' must be 'greedy' or 'probabilistic', "
                f"got {sample!r}."
            )
        switches = {}
        for key in ("context_lookup", "adaptive", "hybrid_chains"):
            value = options.get(key, True)
            if not isinstance(value, bool):
                raise LongSpecConfigError(f"Key {key!r} must be true or false, got {value!r}.")
            switches[key] = value
        tree = _parse_tree(options.get("tree"))
        if tree is not None and all(width == 1 for width in tree):
            # A width-1 tree is the chain of its depth.
            if k is not None and k != len(tree):
                raise LongSpecConfigError(
                    f"Key 'tree' {list(tree)} is a chain of {len(tree)} tokens but "
                    f"'num_speculative_tokens' is {k}; give only one of them.")
            tree, k = None, len(tree)
        if tree is not None:
            if k is not None and k != sum(tree):
                raise LongSpecConfigError(
                    f"Key 'tree' {list(tree)} drafts {sum(tree)} tokens per step but "
                    f"'num_speculative_tokens' is {k}; leave "
                    "'num_speculative_tokens' out when giving a tree.")
            if sample != "probabilistic":
                raise LongSpecConfigError(
                    "Key 'tree' needs 'draft_sample_method' 'probabilistic': sampled "
                    "requests draw each node's children from the draft distribution, "
                    "which tree verification needs (greedy requests always take the "
                    "beam's most likely children).")
        return cls(
            model=model,
            num_speculative_tokens=k,
            sliding_window=window,
            draft_sample_method=sample,
            tree=tree,
            **switches,
        )

    @property
    def num_draft_tokens(self) -> int | None:
        """Tokens drafted per step: the tree's nodes or the chain's length."""
        return sum(self.tree) if self.tree is not None else self.num_speculative_tokens

    def resolve(self, draft_sliding_window: int,
                draft_num_speculative_tokens: int | None) -> LongSpecConfig:
        """Every ``None`` filled: the draft checkpoint's window and recommended K
        (``DraftCheckpoint``), else the method's default K (a ceiling of 8 for
        adaptive chains, 4 for fixed ones). A tree's K is its number of nodes."""
        default = (DEFAULT_ADAPTIVE_NUM_SPECULATIVE_TOKENS if self.adaptive and not self.tree
                   else DEFAULT_NUM_SPECULATIVE_TOKENS)
        return dataclasses.replace(
            self,
            num_speculative_tokens=(self.num_draft_tokens or draft_num_speculative_tokens
                                    or default),
            sliding_window=self.sliding_window or draft_sliding_window,
        )


@dataclasses.dataclass(frozen=True)
class LongSpecSettings:
    """What an engine's LongSpec parts read: the resolved ``LongSpecConfig`` and
    the one fact of the draft checkpoint the draft model needs before loading.

    It rides in the draft's hf_config (vLLM ships that to every process) as a
    plain dict under ``HF_ATTRIBUTE``, so the hf_config stays JSON-serialisable;
    ``store`` writes it at start-up, ``of`` reads it back.
    """

    config: LongSpecConfig  # resolved: no None but ``tree`` (a chain)
    draft_vocab_size: int  # 0: the draft proposes over the target's whole vocabulary

    HF_ATTRIBUTE = "longspec_settings"

    def store(self, hf_config) -> None:
        setattr(hf_config, self.HF_ATTRIBUTE, dataclasses.asdict(self))

    @classmethod
    def of(cls, hf_config) -> LongSpecSettings | None:
        """The settings ``store`` wrote into ``hf_config``; None if it holds none
        (not a LongSpec draft)."""
        stored = getattr(hf_config, cls.HF_ATTRIBUTE, None)
        if stored is None:
            return None
        config = dict(stored["config"])
        if config["tree"] is not None:
            config["tree"] = tuple(config["tree"])
        return cls(LongSpecConfig(**config), int(stored["draft_vocab_size"]))


def check_tree_depth(tree: tuple[int, ...] | None, noise_shift: tuple[int, int]) -> None:
    """Refuse trees deeper than the draft's trained noise shifts.

    The root's children are drafted with noise shift 1 (the chain's first step)
    and the children of a depth-d node with shift d + 1, so a tree of L levels
    needs shifts 1..L: e.g. [4, 4, 4, 4] uses 1..4, a fifth level would use 5.
    """
    if tree is None or len(tree) <= noise_shift[1]:
        return
    high = noise_shift[1]
    raise LongSpecConfigError(
        f"Key 'tree' {list(tree)} has {len(tree)} levels: drafting level {len(tree)} "
        f"uses noise shift {len(tree)}, but the draft was trained with noise shifts "
        f"{noise_shift[0]}..{high} (config.json longspec.trained.noise_shift, "
        f"default {list(DEFAULT_TRAINED_NOISE_SHIFT)}). Give at most {high} levels, "
        f"e.g. {list(tree[:high])}, or train the draft with noise_shift "
        f"[1, {len(tree)}].")


def _parse_tree(tree: Any) -> tuple[int, ...] | None:
    if tree is None or tree is False:
        return None
    if tree is True:
        return DEFAULT_TREE
    if (not isinstance(tree, (list, tuple)) or not tree
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in tree)):
        raise LongSpecConfigError(
            "Key 'tree' must be a non-empty list of positive level widths, e.g. "
            f"[4, 16, 16], or true for the default {list(DEFAULT_TREE)}, got {tree!r}.")
    if sum(tree) > MAX_TREE_NODES:
        raise LongSpecConfigError(
            f"Key 'tree' {list(tree)} has {sum(tree)} nodes; at most "
            f"{MAX_TREE_NODES} fit one verification forward (with the root).")
    return tuple(tree)
