"""The LongSpec draft model inside vLLM (``../shared/longspec-spec.md`` sections 1-2).

One decoder block on top of the target's token embeddings:

    h = embed_target(token)
    h = h + SelfAttn(RMSNorm1(h))     # causal, sliding window, RoPE, q/k/v with bias
    h = h + CrossAttn(RMSNorm2(h))    # q only; K/V = target's last-layer cache, as cached
    h = h + MLP(RMSNorm3(h))          # SwiGLU
    logits = lm_head_target(h)        # no final norm

Draft vocabulary (optional, ``draft_vocab`` in the checkpoint): the LM head is
then the target's rows for a frequent subset of tokens, copied once at load;
other tokens get logit -inf, so the draft never proposes them (greedy) or gives
them probability 0 (sampled). Verification is unchanged, so output is too; only
the LM head, the biggest cost of a draft step, reads N rows instead of V, and
drafting samples in those N columns (``draft_logits``, ``tree.DraftVocabulary``).

Memory: the self-attention is a vLLM ``Attention`` layer with a sliding window,
so vLLM gives it its own KV cache group whose blocks outside the window are
freed: the draft's KV per request is bounded by the window, not the context.
The cross-attention has no KV of its own: it reads the target's last-layer
cache blocks through the target's block table
(``attention/paged_prefix.paged_decode_attention``).

What a forward reads besides tokens and positions arrives as one argument,
``DraftInputs`` (``draft_inputs.py``: from the tree drafter directly, from the
open ``DraftRound`` for the forwards vLLM's proposer runs).

Which rows run the whole block (``DraftInputs.rows``): only a draft token whose
logits are sampled needs cross-attention and MLP (one row per request and
step); every other row (prompt tokens, re-fed accepted tokens) only has to
leave its self-attention K/V in the window cache, which depends on nothing but
the token and its position. The hidden states of the other rows are returned
half-computed and never sampled.

Tree levels (``DraftInputs.level_attention``): the rows are the nodes of one
level of the round's trees; self-attention goes through ``LevelSelfAttention``
(window + ancestors, nothing written to the cache) and every row runs the
whole block, its cross-attention reading the request's committed target prefix
like a chain token.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from vllm_longspec.attention.paged_prefix import paged_decode_attention
from vllm_longspec.config import LongSpecSettings
from vllm_longspec.model.checkpoint import DRAFT_VOCAB, canonical_name, map_param_name
from vllm_longspec.model.draft_inputs import (
    CrossAttentionInputs,
    DraftInputs,
    DraftRound,
)
from vllm_longspec.model.level_attention import LevelSelfAttention
from vllm_longspec.tree.vocabulary import DraftVocabulary


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )


def _output_projection(config, head_dim: int, prefix: str) -> RowParallelLinear:
    """All heads back to the hidden size (no bias), as in the target."""
    return RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                             bias=False, prefix=f"{prefix}.o_proj")


def _tp_size() -> int:
    from vllm.distributed import get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_world_size()


class LongSpecSelfAttention(nn.Module):
    def __init__(
        self, config, rope_config, window: int, prefix: str, attn_layer_name: str,
        cache_config,
    ):
        super().__init__()
        tp = _tp_size()
        self.head_dim = _head_dim(config)
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=True,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = _output_projection(config, self.head_dim, prefix)
        self.rotary_emb = _target_rope(self.head_dim, rope_config)
        # vLLM's window counts the query itself; LongSpec's counts the tokens
        # before it ("a query sees itself and the 512 previous tokens").
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.scale,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            per_layer_sliding_window=window + 1,
            prefix=attn_layer_name,
        )

    def _rotated_qkv(self, positions: torch.Tensor, hidden: torch.Tensor):
        qkv, _ = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return q, k, v

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                level: LevelSelfAttention | None = None) -> torch.Tensor:
        q, k, v = self._rotated_qkv(positions, hidden)
        attended = self.attn(q, k, v) if level is None else level(q, k, v)
        out, _ = self.o_proj(attended)
        return out

    def write_window(self, positions: torch.Tensor, hidden: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
        """Only the K/V of these tokens into the cache at ``slot_mapping``
        (vLLM's own cache write; no query, no attention)."""
        _, k, v = self._rotated_qkv(positions, hidden)
        attn = self.attn
        attn.impl.do_kv_cache_update(
            attn, k.reshape(-1, self.num_kv_heads, self.head_dim),
            v.reshape(-1, self.num_kv_heads, self.head_dim), attn.kv_cache, slot_mapping)


class LongSpecCrossAttention(nn.Module):
    """Queries from the draft; keys/values are the target's last layer, as cached."""

    def __init__(self, config, rope_config, prefix: str):
        super().__init__()
        tp = _tp_size()
        self.head_dim = _head_dim(config)
        self.num_heads = config.num_attention_heads // tp
        self.scale = self.head_dim**-0.5
        self.q_proj = ColumnParallelLinear(
            config.hidden_size,
            config.num_attention_heads * self.head_dim,
            bias=True,
            prefix=f"{prefix}.q_proj",
        )
        self.o_proj = _output_projection(config, self.head_dim, prefix)
        self.rotary_emb = _target_rope(self.head_dim, rope_config)

    def forward(
        self,
        positions: torch.Tensor,  # [num_rows]
        hidden: torch.Tensor,  # [num_rows, hidden_size]
        inputs: CrossAttentionInputs,
        query_start_loc: torch.Tensor | None,  # [num_reqs + 1]; None: a row each
    ) -> torch.Tensor:
        q, _ = self.q_proj(hidden)
        # RoPE at the draft token's true position; the cached keys are rotated.
        q, _ = self.rotary_emb(positions, q, None)
        out = paged_decode_attention(
            q.view(-1, self.num_heads, self.head_dim),
            inputs.target_key_cache,
            inputs.target_value_cache,
            inputs.block_table,
            inputs.committed_lens,
            self.scale,
            cpu_isa=inputs.cpu_isa,
            query_start_loc=query_start_loc,
        )
        out, _ = self.o_proj(out.reshape(hidden.shape[0], -1))
        return out


class LongSpecMLP(nn.Module):
    def __init__(self, config, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size] * 2,
            bias=False,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=False,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(hidden)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


def _target_rope(head_dim: int, rope_config):
    return get_rope(
        head_dim,
        max_position=rope_config.max_position_embeddings,
        rope_parameters=getattr(rope_config, "rope_parameters", None),
        is_neox_style=True,
    )


class LongSpecForCausalLM(nn.Module):
    """The draft block; embedding and LM head are bound to the target's at load."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        spec = vllm_config.speculative_config
        # RoPE tables are the target's (same base, scaling and length).
        rope_config = (
            spec.target_model_config.hf_text_config if spec is not None else config
        )
        settings = LongSpecSettings.of(config)
        if settings is None:
            raise ValueError("LongSpecForCausalLM needs the LongSpec settings in its "
                             "hf_config (written at start-up by patches/engine_args.py)")
        self.sliding_window = settings.config.sliding_window
        self.config = config
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps)
        # vLLM keys KV caches by a layer name holding exactly one integer; number
        # the draft block after the target's layers, as EAGLE drafts do.
        layer_index = rope_config.num_hidden_layers
        self.self_attn = LongSpecSelfAttention(
            config,
            rope_config,
            self.sliding_window,
            prefix=f"{prefix}.self_attn",
            attn_layer_name=f"{prefix}.layers.{layer_index}.self_attn.attn",
            cache_config=vllm_config.cache_config,
        )
        self.post_self_attention_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.cross_attn = LongSpecCrossAttention(
            config, rope_config, prefix=f"{prefix}.cross_attn"
        )
        self.post_cross_attention_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.mlp = LongSpecMLP(config, prefix=f"{prefix}.mlp")
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.register_buffer(DRAFT_VOCAB, torch.zeros(settings.draft_vocab_size,
                                                      dtype=torch.long), persistent=False)
        # Set by bind_target with a draft vocabulary: its LM head rows [N, hidden]
        # and the token ids of its columns.
        self.vocab_head: torch.Tensor | None = None
        self.vocabulary: DraftVocabulary | None = None
        # Bound to the target's modules by the proposer after loading.
        self.embed_tokens: nn.Module | None = None
        self.lm_head: nn.Module | None = None

    def bind_target(self, embed_tokens: nn.Module, lm_head: nn.Module) -> None:
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head
        if self.draft_vocab.numel():
            if _tp_size() > 1:
                raise ValueError(
                    "A LongSpec draft vocabulary needs tensor_parallel_size 1 "
                    "(the LM head rows are sharded otherwise)."
                )
            self.vocab_head = lm_head.weight.detach()[self.draft_vocab].contiguous()
            self.vocabulary = DraftVocabulary(self.draft_vocab, self.config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        draft_inputs: DraftInputs | None = None,
        **_unused,
    ) -> torch.Tensor:
        """``draft_inputs`` None: a forward vLLM's proposer runs, whose inputs
        come from the open ``DraftRound`` (none outside drafting, warm-up and
        memory profiling, and none in a window-only round: self-attention only,
        no target cache to read)."""
        drafting = DraftRound.current() if draft_inputs is None else None
        if drafting is not None:
            draft_inputs = drafting.next_forward()
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(
            input_ids
        )
        level = draft_inputs.level_attention if draft_inputs is not None else None
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden), level)
        if draft_inputs is None:
            return hidden
        rows = draft_inputs.full_rows(hidden.device)
        row_hidden = hidden[rows]
        row_hidden = row_hidden + self.cross_attn(
            positions[rows], self.post_self_attention_layernorm(row_hidden),
            draft_inputs.cross_attention, draft_inputs.query_start_loc)
        row_hidden = row_hidden + self.mlp(
            self.post_cross_attention_layernorm(row_hidden)
        )
        if drafting is not None:
            drafting.forward_done(draft_inputs, row_hidden)
        return hidden.index_copy(0, rows, row_hidden)

    def write_window(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
        """Keep the window in step without drafting: the self-attention K/V of
        these tokens, which depends on each token and its position alone,
        written at ``slot_mapping``. What a first pass writes, at a fraction
        of its cost (no attention, no metadata, no cross-attention, MLP or head)."""
        self.self_attn.write_window(
            positions, self.input_layernorm(self.embed_input_ids(input_ids)), slot_mapping)

    def draft_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, C] the logits of what the draft can propose: the columns of
        ``vocabulary`` with a draft vocabulary, else the whole vocabulary."""
        if self.vocab_head is None:
            return self.logits_processor(self.lm_head, hidden_states)
        return hidden_states @ self.vocab_head.T

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, V] (vLLM's interface): -inf outside the draft vocabulary."""
        return self.vocabulary_logits(self.draft_logits(hidden_states))

    def vocabulary_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``draft_logits`` [N, C] -> [N, V], -inf outside the draft vocabulary."""
        if self.vocabulary is None:
            return logits
        return self.vocabulary.to_vocabulary(logits, fill=float("-inf"))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if canonical_name(name) == DRAFT_VOCAB:
                self.draft_vocab.copy_(tensor)
                loaded.add(name)
                continue
            mapped = map_param_name(name)
            if mapped is None:
                continue
            param_name, shard = mapped
            param = params[param_name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(param_name)
        return loaded
