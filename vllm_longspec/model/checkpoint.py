"""LongSpec draft checkpoints: the on-disk format, its validation, the name mapping.

A draft directory holds ``config.json`` and one or more ``*.safetensors`` files
with ONLY the draft block, under the parameter names of the LongSpec reference
code (sail-sg/LongSpec), optionally prefixed with ``model.``:

    self_attn.{q,k,v}_proj.{weight,bias}   self_attn.o_proj.weight
    cross_attn.q_proj.{weight,bias}        cross_attn.o_proj.weight
    cross_attn.{k,v}_proj.{weight,bias}    (present in published checkpoints, unused)
    mlp.{gate,up,down}_proj.weight
    input_layernorm.weight  post_self_attention_layernorm.weight
    post_cross_attention_layernorm.weight

Embedding and LM head are the target's and are never stored. ``config.json`` is an
HF Llama/Qwen2 config with the target's sizes. Two layouts load:

    "longspec"   ours: architecture LongSpecForCausalLM, one layer, a ``"longspec"``
                 section (window, the target it was trained for), no cross k/v
    "published"  the reference code's ``<Family>GlideDecoderLayer.save_pretrained``
                 (the ``sail/longspec-*`` checkpoints): the target's whole config
                 under architecture LlamaGlideDecoderLayer / Qwen2GlideDecoderLayer,
                 cross k/v present, no ``"longspec"`` section (defaults apply)

``save_draft`` writes either.

Mapping to the vLLM module (``model/draft.py``), which fuses projections:

    self_attn.q_proj / k_proj / v_proj  ->  self_attn.qkv_proj  (shards "q", "k", "v")
    mlp.gate_proj / up_proj             ->  mlp.gate_up_proj    (shards 0, 1)
    cross_attn.k_proj / v_proj          ->  dropped (keys/values are the target's)
    everything else                     ->  same name
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from vllm_longspec.config import DEFAULT_SLIDING_WINDOW, DEFAULT_TRAINED_NOISE_SHIFT

ARCHITECTURE = "LongSpecForCausalLM"
SUPPORTED_TARGET_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# target architecture -> the reference code's draft class, the architecture
# name in a published checkpoint's config.json
PUBLISHED_ARCHITECTURES = {
    "LlamaForCausalLM": "LlamaGlideDecoderLayer",
    "Qwen2ForCausalLM": "Qwen2GlideDecoderLayer",
}
# Every architecture name a LongSpec draft directory may carry.
DRAFT_ARCHITECTURES = (ARCHITECTURE, *PUBLISHED_ARCHITECTURES.values())
LAYOUTS = ("longspec", "published")

REQUIRED_PARAMS = (
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "cross_attn.q_proj.weight",
    "cross_attn.q_proj.bias",
    "cross_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_self_attention_layernorm.weight",
    "post_cross_attention_layernorm.weight",
)
UNUSED_PARAMS = (
    "cross_attn.k_proj.weight",
    "cross_attn.k_proj.bias",
    "cross_attn.v_proj.weight",
    "cross_attn.v_proj.bias",
)
UNUSED_PARAM_PREFIXES = ("cross_attn.k_proj.", "cross_attn.v_proj.")
# Exactly the parameters of the reference's GlideDecoderLayer.
PUBLISHED_PARAMS = REQUIRED_PARAMS + UNUSED_PARAMS
SHARED_PARAM_PREFIXES = ("embed_tokens.", "lm_head.")
# Optional: the target token ids the draft may propose, sorted ([N] int64). The
# draft's LM head is then the target's rows for these ids only (N x cheaper to
# read per draft step); config.json's longspec.draft_vocab_size says N.
DRAFT_VOCAB = "draft_vocab"

# (reference name part, fused vLLM parameter, shard id)
STACKED_PARAMS = (
    ("self_attn.q_proj", "self_attn.qkv_proj", "q"),
    ("self_attn.k_proj", "self_attn.qkv_proj", "k"),
    ("self_attn.v_proj", "self_attn.qkv_proj", "v"),
    ("mlp.gate_proj", "mlp.gate_up_proj", 0),
    ("mlp.up_proj", "mlp.gate_up_proj", 1),
)


class DraftCheckpointError(ValueError):
    """The draft directory is missing, unreadable or does not fit the target."""


def is_longspec_architecture(architectures) -> bool:
    """Whether an hf_config's ``architectures`` names a LongSpec draft (either layout)."""
    return bool(set(architectures or ()) & set(DRAFT_ARCHITECTURES))


def canonical_name(name: str) -> str:
    """Reference parameter name without the optional ``model.`` prefix."""
    return name.removeprefix("model.")


def map_param_name(name: str) -> tuple[str, str | int | None] | None:
    """Map a checkpoint name to ``(vllm_param_name, shard_id)``; ``None`` = skip."""
    name = canonical_name(name)
    if name.startswith(UNUSED_PARAM_PREFIXES + SHARED_PARAM_PREFIXES):
        return None
    for ref_part, fused_part, shard in STACKED_PARAMS:
        if name.startswith(ref_part + "."):
            return name.replace(ref_part, fused_part, 1), shard
    return name, None


@dataclasses.dataclass(frozen=True)
class DraftCheckpoint:
    """What start-up needs to know about a draft directory, read without weights."""

    path: Path
    config: dict[str, Any]
    # canonical reference name -> shape
    shapes: dict[str, tuple[int, ...]]

    @property
    def layout(self) -> str:
        """"published" for the reference code's layout, else "longspec"."""
        archs = set(self.config.get("architectures") or ())
        return "published" if archs & set(PUBLISHED_ARCHITECTURES.values()) else "longspec"

    @property
    def longspec(self) -> dict[str, Any]:
        return self.config.get("longspec") or {}

    @property
    def sliding_window(self) -> int:
        return int(self.longspec.get("sliding_window", DEFAULT_SLIDING_WINDOW))

    @property
    def recommended_num_speculative_tokens(self) -> int | None:
        return self.longspec.get("num_speculative_tokens")

    @property
    def draft_vocab_size(self) -> int:
        return int(self.longspec.get("draft_vocab_size") or 0)

    @property
    def trained_noise_shift(self) -> tuple[int, int]:
        """[low, high] noise shifts of the draft's training
        (``longspec.trained.noise_shift``; ``DEFAULT_TRAINED_NOISE_SHIFT`` when
        not recorded: published drafts, random ones)."""
        trained = self.longspec.get("trained") or {}
        low, high = trained.get("noise_shift") or DEFAULT_TRAINED_NOISE_SHIFT
        return int(low), int(high)

    @property
    def safetensors_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))


def read_draft_checkpoint(path: str | Path) -> DraftCheckpoint:
    """Read config.json and safetensors headers; raise a clear error on any problem."""
    from safetensors import safe_open

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise DraftCheckpointError(
            f"LongSpec draft directory {str(directory)!r} does not exist "
            "(key 'model' of --speculative-config)."
        )
    config_file = directory / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise DraftCheckpointError(
            f"LongSpec draft directory {str(directory)!r} has no config.json."
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise DraftCheckpointError(
            f"Cannot read {str(config_file)!r}: {err}"
        ) from err

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise DraftCheckpointError(
            f"LongSpec draft directory {str(directory)!r} has no *.safetensors file."
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as reader:
                for key in reader.keys():
                    shapes[canonical_name(key)] = tuple(reader.get_slice(key).get_shape())
        except Exception as err:  # safetensors raises several unrelated types
            raise DraftCheckpointError(
                f"Cannot read draft weights {str(file)!r}: {err}"
            ) from err

    missing = [name for name in REQUIRED_PARAMS if name not in shapes]
    if missing:
        raise DraftCheckpointError(
            f"Draft weights in {str(directory)!r} are not a LongSpec draft block: "
            f"missing {', '.join(missing)}."
        )
    return DraftCheckpoint(path=directory, config=config, shapes=shapes)


def _attention_sizes(config) -> tuple[int, int, int, int]:
    """(hidden, heads, kv heads, head_dim) of an HF config object or dict."""
    get = config.get if isinstance(config, dict) else (
        lambda key, default=None: getattr(config, key, default))
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    return hidden, heads, kv_heads, get("head_dim") or hidden // heads


def attention_weight_shapes(config) -> dict[str, tuple[int, int]]:
    """Shapes of the draft's attention projections for a target config."""
    hidden, heads, kv_heads, head_dim = _attention_sizes(config)
    return {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "cross_attn.q_proj": (heads * head_dim, hidden),
        "cross_attn.o_proj": (hidden, heads * head_dim),
    }


def check_draft_matches_target(draft: DraftCheckpoint, target_hf_config: Any) -> None:
    """Raise DraftCheckpointError unless the draft fits the target's sizes."""
    archs = list(getattr(target_hf_config, "architectures", None) or [])
    if not set(archs) & set(SUPPORTED_TARGET_ARCHITECTURES):
        raise DraftCheckpointError(
            f"LongSpec does not support target architecture {archs}: supported are "
            f"{', '.join(SUPPORTED_TARGET_ARCHITECTURES)}."
        )
    expected = attention_weight_shapes(target_hf_config)
    hidden, num_heads, num_kv_heads, head_dim = _attention_sizes(target_hf_config)
    for name, shape in expected.items():
        weight = f"{name}.weight"
        if draft.shapes[weight] != shape:
            raise DraftCheckpointError(
                f"Draft {str(draft.path)!r} does not fit the target: {weight} has "
                f"shape {list(draft.shapes[weight])}, the target needs {list(shape)} "
                f"(hidden {hidden}, {num_heads} heads, {num_kv_heads} KV heads, "
                f"head_dim {head_dim}). Was it trained for another model?"
            )
    draft_vocab = draft.config.get("vocab_size")
    if draft_vocab is not None and draft_vocab != target_hf_config.vocab_size:
        raise DraftCheckpointError(
            f"Draft {str(draft.path)!r} was made for a vocabulary of {draft_vocab} "
            f"tokens, the target has {target_hf_config.vocab_size}."
        )
    stored = draft.shapes.get(DRAFT_VOCAB, (0,))
    if tuple(stored) != (draft.draft_vocab_size,):
        raise DraftCheckpointError(
            f"Draft {str(draft.path)!r}: config.json says draft_vocab_size "
            f"{draft.draft_vocab_size}, the weights hold a {DRAFT_VOCAB} of shape "
            f"{list(stored)}. Rewrite it with `vllm-longspec draft-vocab`."
        )


def draft_config_for_target(
    target_config: dict[str, Any], longspec: dict[str, Any]
) -> dict[str, Any]:
    """config.json of a draft for a target (target's sizes, one layer)."""
    keys = (
        "model_type", "hidden_size", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size",
        "max_position_embeddings", "rope_parameters", "rope_theta", "rope_scaling",
        "bos_token_id", "eos_token_id", "tie_word_embeddings",
    )
    config = {k: target_config[k] for k in keys if k in target_config}
    config.update(
        architectures=[ARCHITECTURE],
        num_hidden_layers=1,
        longspec={"format_version": 1, **longspec},
    )
    return config


def check_publishable(target_config: dict[str, Any], sliding_window: int | None) -> str:
    """The published architecture name for a target; raise if the reference code
    could not load or would misuse a draft for it in the published layout."""
    archs = target_config.get("architectures") or []
    name = next((PUBLISHED_ARCHITECTURES[a] for a in archs if a in PUBLISHED_ARCHITECTURES),
                None)
    if name is None:
        raise DraftCheckpointError(
            f"The published layout exists for {', '.join(PUBLISHED_ARCHITECTURES)} "
            f"targets, not {archs}. Export with layout 'longspec'."
        )
    hidden, heads, _, head_dim = _attention_sizes(target_config)
    if head_dim * heads != hidden:
        raise DraftCheckpointError(
            f"The reference code assumes head_dim = hidden_size / num_attention_heads "
            f"({hidden} / {heads}); this target has head_dim {head_dim}. Export with "
            "layout 'longspec'."
        )
    if sliding_window not in (None, DEFAULT_SLIDING_WINDOW):
        raise DraftCheckpointError(
            f"The published layout stores no window: the reference code and this "
            f"plugin use {DEFAULT_SLIDING_WINDOW}, the draft was trained with "
            f"{sliding_window}. Export with layout 'longspec'."
        )
    return name


def published_tensors(tensors: dict[str, Any]) -> dict[str, Any]:
    """Exactly ``PUBLISHED_PARAMS``: unused cross k/v kept if given, else zeros."""
    import torch

    missing = [name for name in REQUIRED_PARAMS if name not in tensors]
    if missing:
        raise DraftCheckpointError(f"Not a draft block: missing {', '.join(missing)}.")
    extra = sorted(set(tensors) - set(PUBLISHED_PARAMS))
    if extra:
        hint = " (a draft vocabulary needs layout 'longspec')" if DRAFT_VOCAB in extra else ""
        raise DraftCheckpointError(
            f"The published layout holds only the draft block's parameters, not "
            f"{', '.join(extra)}{hint}."
        )
    # Cross k/v have the self-attention's k/v shapes:
    # [kv_heads * head_dim, hidden] weights, [kv_heads * head_dim] biases.
    zeros = {
        name: torch.zeros_like(tensors[name.replace("cross_attn", "self_attn")])
        for name in UNUSED_PARAMS if name not in tensors
    }
    return {name: tensors[name] if name in tensors else zeros[name]
            for name in PUBLISHED_PARAMS}


def published_config(target_config: dict[str, Any], architecture: str, dtype
                     ) -> dict[str, Any]:
    """The target's config as ``save_pretrained`` of the reference's draft writes it."""
    config = json.loads(json.dumps(target_config))
    config["architectures"] = [architecture]
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = str(dtype).removeprefix("torch.")
    return config


def save_draft(
    directory: str | Path,
    state_dict: dict[str, Any],
    target_config: dict[str, Any],
    longspec: dict[str, Any],
    layout: str = "longspec",
) -> Path:
    """Write a draft directory (reference parameter names, no ``model.`` prefix).

    ``layout="published"`` writes the reference code's layout (module docstring);
    ``longspec`` then must not hold anything it cannot store (only the window 512).
    """
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    tensors = {
        canonical_name(k): v.detach().contiguous().cpu() for k, v in state_dict.items()
    }
    if layout == "published":
        architecture = check_publishable(target_config, longspec.get("sliding_window"))
        tensors = published_tensors(tensors)
        config = published_config(target_config, architecture,
                                  tensors["self_attn.q_proj.weight"].dtype)
    else:
        config = draft_config_for_target(target_config, longspec)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def random_draft_state(
    target_config: dict[str, Any], seed: int = 0, std: float = 0.02, dtype=None
) -> dict[str, Any]:
    """A randomly initialised draft block for a target config (tests, training)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden, ffn = target_config["hidden_size"], target_config["intermediate_size"]
    shapes = {
        **attention_weight_shapes(target_config),
        "mlp.gate_proj": (ffn, hidden),
        "mlp.up_proj": (ffn, hidden),
        "mlp.down_proj": (hidden, ffn),
    }
    state = {}
    for name, shape in shapes.items():
        state[f"{name}.weight"] = torch.randn(shape, generator=generator) * std
        if name.endswith(("q_proj", "k_proj", "v_proj")):
            state[f"{name}.bias"] = torch.zeros(shape[0])
    for norm in ("input_layernorm", "post_self_attention_layernorm",
                 "post_cross_attention_layernorm"):
        state[f"{norm}.weight"] = torch.ones(hidden)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return state
