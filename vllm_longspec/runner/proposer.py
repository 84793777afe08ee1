"""LongSpec drafting inside vLLM's V1 model runner (a chain or a tree per step).

``LongSpecProposer`` is vLLM's ``DraftModelProposer`` (a token-input draft model
with its own KV cache) with three LongSpec specifics:

1. The draft shares the target's embedding and LM head (bound after loading).
2. Its cross-attention reads the target's last-layer KV cache in place: each
   round the proposer hands the draft (``DraftRound``, ``model/draft_inputs.py``)
   the cache views, the target group's block table, and per request the number
   of verified target positions (``seq_len - num_rejected``). All draft tokens
   of a round see that same committed prefix (spec section 2).
3. Its self-attention layer is a sliding-window layer, so it lives in its own
   KV cache group. vLLM hands a ``DraftModelProposer`` the metadata of group 0
   (a target group); the proposer swaps in its own group's block table before
   the slot mapping is computed from it, so draft K/V never lands in target
   blocks.

Why the draft's window state is right in every scheduling case: the draft's
self-attention K/V at position p depends only on the token at p (one layer, no
input from the target), and the inherited first pass re-feeds, every step,
exactly the tokens the target just processed that were accepted (rejected ones
get a padding slot and are not written) plus the bonus token at the next
position. Hence:

- continuous batching / chunked prefill: each prompt chunk the target runs is
  fed to the draft in the same step at the same positions;
- rejected draft tokens: their K/V from drafting sits at positions the next
  round overwrites before any query can see them (a query at position p only
  attends positions <= p, all rewritten this round);
- prefix caching: the draft group is cached with the target's blocks by the
  hybrid KV cache manager (sliding-window prefix hits keep the window blocks);
  a hit restores the window as it was written;
- preemption: vLLM frees the request's blocks in every group, the draft's
  included, and recomputes the request like a new prefill, which refills the
  window.

Trees (``"tree"`` in the config): the first pass is the chain's (vLLM's,
with no draft step after it), and the roots' hidden states it leaves in the
round grow the round's dynamic beam trees, one draft forward per level
(``TreeDrafter``); tree nodes are never written to the window. The trees go to
``TreeRounds`` (``runner/step.py``) for the next step's verification. After
verification the runner's buffers hold the accepted path as if it had been a
chain (``runner.layout``), so the argument above holds unchanged.

Test-only modes (replayed proposals, recorded draft logits) are not here: they
wrap ``_adaptive_chains``, ``_propose_chain`` and ``_draft_trees`` from
``patches/testing.py`` when their variables are set.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from typing_extensions import override
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from vllm_longspec.attention.kv_cache import split_kv_cache
from vllm_longspec.config import LongSpecConfig, LongSpecSettings
from vllm_longspec.model.draft_inputs import CrossAttentionInputs, DraftRound
from vllm_longspec.patches import attention_backend
from vllm_longspec.runner import seeded
from vllm_longspec.runner.adaptive_chains import AdaptiveChains
from vllm_longspec.runner.sampling import batch_sampling
from vllm_longspec.runner.step import TreeRounds
from vllm_longspec.runner.tree_drafter import TreeDrafter
from vllm_longspec.tree import BatchSampling, BeamTree

logger = init_logger(__name__)
# Temperatures below this are greedy (vLLM's sampler._SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5


class LongSpecError(RuntimeError):
    """A set-up the LongSpec draft cannot serve, found while the engine starts."""


class LongSpecProposer(DraftModelProposer):
    def __init__(self, vllm_config, device: torch.device, runner=None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.runner = runner
        self.target_layer_name: str | None = None
        self.target_kv_cache_gid = -1
        config = LongSpecSettings.of(self.draft_model_config.hf_config).config
        self.tree_widths = config.tree
        # Tree mode: the trees between drafting and verification (shared with
        # the runner's patches and sampler, ``runner/step.py``) and the drafter
        # of the levels (made at load).
        self.tree_rounds = TreeRounds() if self.tree_widths else None
        self.tree_drafter: TreeDrafter | None = None
        # Chains: context lookup and the speculation policy.
        self.adaptive = self._adaptive_chains(config)
        # Chains verified with the hybrid attention kernel (where it runs).
        self.hybrid_chains = (config.hybrid_chains and self.tree_rounds is None
                              and attention_backend.available())

    def _adaptive_chains(self, config: LongSpecConfig) -> AdaptiveChains | None:
        """Chains with context lookup and the speculation policy; None: vLLM's
        chain of K drafts every step (trees; both keys off)."""
        if self.tree_widths or not (config.context_lookup or config.adaptive):
            return None
        return AdaptiveChains(self.num_speculative_tokens, lookup=config.context_lookup,
                              adaptive=config.adaptive)

    # ---- loading -------------------------------------------------------------

    @override
    def load_model(self, target_model: torch.nn.Module) -> None:
        self.target_layer_name = self._last_target_attention_layer()
        super().load_model(target_model)
        if len(self._draft_attn_layer_names) != 1:
            raise LongSpecError(
                "The LongSpec draft must register exactly one KV-cached attention "
                f"layer, found {sorted(self._draft_attn_layer_names)}."
            )
        layers = self.vllm_config.compilation_config.static_forward_context
        self.window_layer = layers[next(iter(self._draft_attn_layer_names))]
        # Rounds that draft nothing write the window K/V themselves
        # (``_write_window``) unless M-RoPE positions or a backend that writes
        # its cache inside the attention call rule it out.
        self.writes_window = not (
            self.runner.uses_mrope
            or self.window_layer.attn_backend.forward_includes_kv_cache_update
            or not hasattr(self.window_layer.impl, "do_kv_cache_update"))
        if self.tree_widths is not None:
            self._check_tree_support()
            self.tree_drafter = TreeDrafter(self.model, self.tree_widths, self.window_layer)

    def _check_tree_support(self) -> None:
        layers = self.vllm_config.compilation_config.static_forward_context
        windowed = sorted(
            name for name, layer in layers.items()
            if isinstance(layer, Attention) and name not in self._draft_attn_layer_names
            and layer.sliding_window is not None)
        if windowed:
            raise LongSpecError(
                f"LongSpec key 'tree' does not support targets with sliding-window "
                f"attention layers ({windowed[0]}, ...): tree verification has no "
                "windowed kernel. Leave 'tree' out to draft chains.")
        if self.runner.uses_mrope:
            raise LongSpecError("LongSpec key 'tree' does not support M-RoPE targets.")
        from vllm_longspec.attention.cpu_backend import HybridCPUAttentionImpl

        stock = sorted(name for name, layer in layers.items()
                       if isinstance(layer, Attention)
                       and not isinstance(layer.impl, HybridCPUAttentionImpl))
        if stock:
            raise LongSpecError(
                f"LongSpec key 'tree' needs the hybrid tree attention backend, but "
                f"layer {stock[0]!r} uses {type(layers[stock[0]].impl).__name__}"
                ": the backend override must be registered before the model is built "
                "(patches/model_runner.py does it in tree mode).")

    def _last_target_attention_layer(self) -> str:
        layers = self.vllm_config.compilation_config.static_forward_context
        attention = {
            name: layer for name, layer in layers.items() if isinstance(layer, Attention)
        }
        if not attention:
            raise LongSpecError("The target model has no attention layer to read.")
        name = max(attention, key=extract_layer_index)
        if attention[name].sliding_window is not None:
            raise LongSpecError(
                f"The target's last attention layer {name!r} uses a sliding window; "
                "LongSpec's cross-attention needs its full KV cache."
            )
        return name

    @override
    def _maybe_share_embeddings(self, target_language_model: torch.nn.Module) -> None:
        self.model.bind_target(
            target_language_model.model.embed_tokens, target_language_model.lm_head
        )

    @override
    def _maybe_share_lm_head(self, target_language_model: torch.nn.Module) -> None:
        pass  # bound together with the embedding above

    @override
    def initialize_attn_backend(self, kv_cache_config, kernel_block_sizes=None) -> None:
        super().initialize_attn_backend(kv_cache_config, kernel_block_sizes)
        for gid, group in enumerate(kv_cache_config.kv_cache_groups):
            if self.target_layer_name in group.layer_names:
                self.target_kv_cache_gid = gid
        if self.target_kv_cache_gid < 0:
            raise LongSpecError(
                f"Target layer {self.target_layer_name!r} has no KV cache group."
            )
        if self.tree_rounds is not None:
            layers = self.vllm_config.compilation_config.static_forward_context
            self.tree_rounds.set_target_kv_groups([
                (gid, [name for name in group.layer_names
                       if isinstance(layers.get(name), Attention)])
                for gid, group in enumerate(kv_cache_config.kv_cache_groups)
                if gid != self.kv_cache_gid])

    # ---- drafting ------------------------------------------------------------

    def _cross_attention_inputs(self, cad, num_rejected_tokens) -> CrossAttentionInputs:
        num_reqs = cad.num_reqs
        committed_lens = cad.seq_lens[:num_reqs]
        if num_rejected_tokens is not None:
            committed_lens = committed_lens - num_rejected_tokens[:num_reqs]
        target_layer = self.vllm_config.compilation_config.static_forward_context[
            self.target_layer_name
        ]
        on_cpu = current_platform.is_cpu()
        key_cache, value_cache = split_kv_cache(
            target_layer.kv_cache, "cpu" if on_cpu else "flash"
        )
        block_table = self.runner.input_batch.block_table[self.target_kv_cache_gid]
        return CrossAttentionInputs(
            target_key_cache=key_cache,
            target_value_cache=value_cache,
            block_table=block_table.get_device_tensor(num_reqs),
            committed_lens=committed_lens.to(torch.int32),
            cpu_isa=getattr(target_layer, "isa", None) if on_cpu else None,
        )

    @override
    def propose(
        self,
        num_speculative_tokens,
        target_token_ids,
        target_positions,
        target_hidden_states,
        next_token_ids,
        token_indices_to_sample,
        common_attn_metadata,
        sampling_metadata,
        mm_embed_inputs=None,
        num_rejected_tokens_gpu=None,
        slot_mappings=None,
    ) -> torch.Tensor | list[list[int]]:
        # vLLM's first-pass arguments, after the number of draft steps
        first_pass = (target_token_ids, target_positions, target_hidden_states,
                      next_token_ids, token_indices_to_sample, common_attn_metadata)
        first_pass_kwargs = dict(sampling_metadata=sampling_metadata,
                                 mm_embed_inputs=mm_embed_inputs,
                                 num_rejected_tokens_gpu=num_rejected_tokens_gpu,
                                 slot_mappings=slot_mappings)
        if self.adaptive is not None:
            return self._propose_adaptive(num_rejected_tokens_gpu, *first_pass,
                                          **first_pass_kwargs)
        cross_attention, first_pass = self._round_inputs(num_rejected_tokens_gpu,
                                                         *first_pass)
        if self.tree_drafter is not None:
            return self._propose_trees(
                cross_attention, first_pass[5].block_table_tensor[:cross_attention.num_reqs],
                *first_pass, **first_pass_kwargs)
        return self._propose_chain(cross_attention, num_speculative_tokens,
                                   *first_pass, **first_pass_kwargs)

    def _round_inputs(self, num_rejected_tokens, *first_pass
                      ) -> tuple[CrossAttentionInputs, tuple]:
        """What a draft forward needs: the cross-attention's view of the target's
        cache, and the first pass's arguments with vLLM's metadata pointing at
        the draft group's block table (not built in a step that drafts nothing)."""
        cad = first_pass[5]
        cross_attention = self._cross_attention_inputs(cad, num_rejected_tokens)
        draft_block_table = self.runner.input_batch.block_table[self.kv_cache_gid]
        cad = cad.replace(block_table_tensor=draft_block_table.get_device_tensor(
            cad.block_table_tensor.shape[0]))
        return cross_attention, (*first_pass[:5], cad)

    def _draft_with_vllm(self, cross_attention: CrossAttentionInputs, num_steps: int,
                         *first_pass, window_only: bool = False, **first_pass_kwargs):
        """vLLM's drafting: the first pass, then ``num_steps - 1`` chain steps
        (0: the first pass only), with the round open: the one place its
        hand-over to the draft is set and reset. Returns vLLM's draft tokens
        [num_reqs, num_steps] and the first pass's output at the sampled rows
        [num_reqs, hidden_size] (None when ``window_only``: a first pass that
        only keeps the window's K/V in step, for a round that proposes nothing)."""
        draft_round = DraftRound(cross_attention, window_only=window_only)
        with draft_round.open():
            draft_token_ids = super().propose(num_steps, *first_pass, **first_pass_kwargs)
        return draft_token_ids, draft_round.first_pass_output

    def _propose_chain(self, cross_attention: CrossAttentionInputs, num_steps: int,
                       *first_pass, **first_pass_kwargs) -> torch.Tensor:
        """[num_reqs, K] vLLM's chain of K drafts."""
        draft_token_ids, _ = self._draft_with_vllm(cross_attention, num_steps,
                                                   *first_pass, **first_pass_kwargs)
        return draft_token_ids

    def _propose_adaptive(self, num_rejected_tokens, *first_pass,
                          **first_pass_kwargs) -> list[list[int]]:
        """Chains with context lookup and the speculation policy
        (``adaptive_chains``): per request K_r tokens, from the lookup or the
        draft; the draft runs ``plan.draft_steps`` steps (0: no draft forward,
        the step's K/V written into the window, ``_write_window``; where that
        cannot be done, vLLM's first pass alone)."""
        num_reqs = first_pass[5].num_reqs
        decoding = ~self.runner.discard_request_mask.np[:num_reqs].astype(bool)
        plan = self.adaptive.plan(self.runner.input_batch, num_reqs, first_pass[3],
                                  num_rejected_tokens, decoding)
        started = time.perf_counter()
        if plan.draft_steps == 0 and self._write_window(first_pass[0], first_pass[1],
                                                        first_pass_kwargs["slot_mappings"]):
            draft_token_ids = first_pass[0].new_empty((num_reqs, 0))
            self._last_draft_probs = None
        else:
            # Drafting, or a window write vLLM's first pass must do (window_only).
            cross_attention, first_pass = self._round_inputs(num_rejected_tokens,
                                                             *first_pass)
            draft_token_ids, _ = self._draft_with_vllm(
                cross_attention, plan.draft_steps, *first_pass,
                window_only=plan.draft_steps == 0, **first_pass_kwargs)
        drafting_ms = (time.perf_counter() - started) * 1e3
        proposals, self._last_draft_probs = self.adaptive.compose(
            plan, draft_token_ids, self._last_draft_probs, drafting_ms)
        return proposals

    def _write_window(self, token_ids: torch.Tensor, positions: torch.Tensor,
                      slot_mappings) -> bool:
        """A round that drafts nothing: write the window K/V of the step's
        target tokens, at the slots vLLM mapped for the draft's layer this
        step, and nothing else. False where that cannot be done
        (``writes_window`` off, micro-batched slot mappings): vLLM's first
        pass then does it.

        What differs from the first pass: it also writes the rejected tokens
        and skips the bonus token. Both are harmless for the reason in this
        module's docstring: a draft query at position p only reads positions
        <= p, and each of those was last written by the latest step whose
        target tokens reached it, i.e. with the committed token (the bonus
        token is the first target token of the next step)."""
        name = self.window_layer.layer_name
        if not (self.writes_window and isinstance(slot_mappings, dict)
                and name in slot_mappings):
            return False
        num_tokens = token_ids.shape[0]
        self.model.write_window(token_ids, positions[:num_tokens],
                                slot_mappings[name][:num_tokens])
        return True

    def _propose_trees(self, cross_attention: CrossAttentionInputs, window_block_table,
                       *first_pass, **first_pass_kwargs) -> torch.Tensor:
        """[num_reqs, num_nodes] the round's trees, nodes in level order."""
        # vLLM's first pass alone: the roots' hidden states stay in the round.
        _, roots = self._draft_with_vllm(cross_attention, 0, *first_pass,
                                         **first_pass_kwargs)
        beam = self._draft_trees(roots, cross_attention, window_block_table,
                                 first_pass_kwargs["sampling_metadata"])
        self.tree_rounds.propose(
            self.runner.input_batch.req_ids[:cross_attention.num_reqs], beam)
        self._last_draft_probs = None  # tree rows are verified with the tree's own
        return beam.tree.tokens

    def _draft_trees(self, root_hidden: torch.Tensor,
                     cross_attention: CrossAttentionInputs,
                     window_block_table: torch.Tensor, sampling_metadata) -> BeamTree:
        """root_hidden: [num_reqs, hidden] the draft's output at each root."""
        return self.tree_drafter.draft(
            self.model.draft_logits(root_hidden), cross_attention, window_block_table,
            self._drafting_sampling(sampling_metadata, cross_attention.num_reqs))

    @override
    def _sample_from_logits(self, logits, sampling_metadata):
        """vLLM's draft sampling, except for seeded requests, whose tokens must
        not depend on the rest of the batch (vLLM draws every row from the
        global generator): those verified by the target's own draws get the
        coupled draw (``seeded.coupled_draft_tokens``), the other seeded ones
        a draw from their own generator."""
        draft_token_ids, draft_probs = self._sample_in_draft_vocabulary(logits,
                                                                        sampling_metadata)
        draft_round = DraftRound.current()
        position = draft_round.next_draft_position() if draft_round is not None else 1
        if draft_probs is None or not sampling_metadata.generators:
            return draft_token_ids, draft_probs
        num_reqs = self.runner.input_batch.num_reqs
        coupled = seeded.seeded_rows(self.runner, num_reqs)
        draft_token_ids = draft_token_ids.clone()
        for row, token in seeded.coupled_draft_tokens(
                self.runner.sampler, logits, position, coupled,
                sampling_metadata).items():
            draft_token_ids[row] = token
        own = {row: gen for row, gen in self._drafting_generators(sampling_metadata).items()
               if row not in coupled}
        return (reseed_draft_tokens(draft_token_ids, draft_probs, own,
                                    sampling_metadata.temperature), draft_probs)

    def _sample_in_draft_vocabulary(self, logits, sampling_metadata):
        """vLLM's draft sampling, in the draft vocabulary's columns when there
        is one (``tree.DraftVocabulary``: the same law for a sixth of the
        noise); the draft probabilities go to the rejection sampler over the
        whole vocabulary."""
        vllm_sampling = super()._sample_from_logits
        if self.model.vocabulary is None:
            return vllm_sampling(logits, sampling_metadata)
        return self.model.vocabulary.sample(
            logits, lambda columns: vllm_sampling(columns, sampling_metadata))

    def _drafting_generators(self, sampling_metadata) -> dict[int, torch.Generator]:
        """Row -> generator of the seeded requests whose drafts count this step
        and that the target does not verify by its own draws
        (``seeded.seeded_rows``: their generators are the verification's).

        A request in the middle of a chunked prefill is drafted for too, but
        its drafts are discarded: drawing them from its generator would make
        its tokens depend on how its prompt was chunked (on prefix-cache hits).
        """
        num_reqs = self.runner.input_batch.num_reqs
        discarded = self.runner.discard_request_mask.np[:num_reqs]
        verified_by_draws = seeded.seeded_rows(self.runner, num_reqs)
        return {row: gen for row, gen in sampling_metadata.generators.items()
                if row < num_reqs and not discarded[row] and row not in verified_by_draws}

    def _drafting_sampling(self, sampling_metadata, num_reqs: int) -> BatchSampling:
        """Tree drafting's settings: ``batch_sampling`` with the generators of
        ``_drafting_generators`` (the other rows draw from the global one)."""
        return dataclasses.replace(batch_sampling(sampling_metadata, num_reqs),
                                   generators=self._drafting_generators(sampling_metadata))

    @override
    def set_inputs_first_pass(self, *args, **kwargs):
        num_tokens, token_indices_to_sample, cad = super().set_inputs_first_pass(
            *args, **kwargs
        )
        # Only the sampled row of each request runs the whole block.
        DraftRound.current().sample_first_pass_at(token_indices_to_sample)
        return num_tokens, token_indices_to_sample, cad


def reseed_draft_tokens(draft_token_ids: torch.Tensor, draft_probs: torch.Tensor,
                        generators: dict[int, torch.Generator],
                        temperature: torch.Tensor | None) -> torch.Tensor:
    """Redraw the rows of seeded, sampled requests from their own generators.

    draft_token_ids: [num_reqs], draft_probs: [num_reqs, vocab] (the
    temperature-scaled draft distribution the rejection sampler receives).
    A draw is argmax(q / E) with E ~ Exp(1), the exponential race vLLM uses.
    """
    out = draft_token_ids.clone()
    for row, generator in generators.items():
        greedy = temperature is None or float(temperature[row]) < GREEDY_TEMPERATURE
        if row >= out.shape[0] or greedy:
            continue  # not in this batch, or a greedy row: keep the argmax
        noise = torch.empty_like(draft_probs[row]).exponential_(generator=generator)
        out[row] = (draft_probs[row] / noise).argmax()
    return out
