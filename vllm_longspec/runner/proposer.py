"""LongSpec drafting inside vLLM's V1 model runner (a chain or a tree per step).

``LongSpecProposer`` is vLLM's ``DraftModelProposer`` (a token-input draft model
with its own KV cache) with three LongSpec specifics:

1. The draft shares the target's embedding and LM head (bound after loading).
2. Its cross-attention reads the target's last-layer KV cache in place: each
   round the proposer hands the draft the cache views, the target group's
   block table, and per request the number of verified target positions
   (``seq_len - num_rejected``). All draft tokens of a round see that same
   committed prefix (spec section 2).
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

Trees (``"tree"`` in the config, ``vllm_longspec.runner``): the first pass
is the chain's (vLLM's, with one draft token), and the root's logits it ends
with grow the round's dynamic beam trees, one draft forward per level
(``TreeDrafter``); tree nodes are never written to the window. After
verification the runner's buffers hold the accepted path as if it had been a
chain (``runner.layout``), so the argument above holds unchanged.
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

from vllm_longspec.model.draft import CrossAttentionInputs
from vllm_longspec.model.paged_attention import split_kv_cache
from vllm_longspec.runner.adaptive_chains import AdaptiveChains
from vllm_longspec.runner.sampling import batch_sampling
from vllm_longspec.runner.step import TreeRounds
from vllm_longspec.runner.tree_drafter import TreeDrafter
from vllm_longspec.testing import DraftRecorder, TestProposer
from vllm_longspec.tree import BatchSampling

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
        self.test_proposer = TestProposer.from_env()
        self.recorder = DraftRecorder.from_env()
        longspec = getattr(self.draft_model_config.hf_config, "longspec", None) or {}
        self.tree_widths: tuple[int, ...] | None = (
            tuple(longspec["tree"]) if longspec.get("tree") else None)
        # Tree mode: the trees between drafting and verification (shared with
        # the runner's patches and sampler), the drafter of the levels, and the
        # first pass's hidden states at the roots while it runs.
        self.tree_rounds = TreeRounds() if self.tree_widths else None
        # Chains: context lookup and the speculation policy (off for trees and
        # for the test-only proposer modes, which need every step's drafts).
        self.adaptive: AdaptiveChains | None = None
        lookup, adaptive = longspec.get("context_lookup"), longspec.get("adaptive")
        if (not self.tree_widths and (lookup or adaptive) and self.test_proposer is None
                and self.recorder is None):
            self.adaptive = AdaptiveChains(self.num_speculative_tokens,
                                           lookup=bool(lookup), adaptive=bool(adaptive))
        self.tree_drafter: TreeDrafter | None = None
        self._root_hidden_states: list[torch.Tensor] | None = None

    # ---- loading -------------------------------------------------------------

    def load_model(self, target_model: torch.nn.Module) -> None:
        self.target_layer_name = self._last_target_attention_layer()
        super().load_model(target_model)
        if len(self._draft_attn_layer_names) != 1:
            raise LongSpecError(
                "The LongSpec draft must register exactly one KV-cached attention "
                f"layer, found {sorted(self._draft_attn_layer_names)}."
            )
        if self.tree_widths is not None:
            self._check_tree_support()
            layers = self.vllm_config.compilation_config.static_forward_context
            self.tree_drafter = TreeDrafter(
                self.model, self.tree_widths,
                layers[next(iter(self._draft_attn_layer_names))])

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
        from vllm_longspec.attention.backend import HybridCPUAttentionImpl

        stock = sorted(name for name, layer in layers.items()
                       if isinstance(layer, Attention)
                       and not isinstance(layer.impl, HybridCPUAttentionImpl))
        if stock:
            raise LongSpecError(
                f"LongSpec key 'tree' needs the hybrid tree attention backend, but "
                f"layer {stock[0]!r} uses {type(layers[stock[0]].impl).__name__}"
                ": the backend override must be registered before the model is built "
                "(VLLM_LONGSPEC_HYBRID_ATTENTION=1 in every vLLM process).")

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

    def _maybe_share_embeddings(self, target_language_model: torch.nn.Module) -> None:
        self.model.bind_target(
            target_language_model.model.embed_tokens, target_language_model.lm_head
        )

    def _maybe_share_lm_head(self, target_language_model: torch.nn.Module) -> None:
        pass  # bound together with the embedding above

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
            target_layer.kv_cache, "cpu" if on_cpu else "split_content"
        )
        block_table = self.runner.input_batch.block_table[self.target_kv_cache_gid]
        return CrossAttentionInputs(
            target_key_cache=key_cache,
            target_value_cache=value_cache,
            block_table=block_table.get_device_tensor(num_reqs),
            committed_lens=committed_lens.to(torch.int32),
            cpu_isa=getattr(target_layer, "isa", None) if on_cpu else None,
        )

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
    ) -> torch.Tensor:
        cad = common_attn_metadata
        inputs = self._cross_attention_inputs(cad, num_rejected_tokens_gpu)
        draft_block_table = self.runner.input_batch.block_table[self.kv_cache_gid]
        cad = cad.replace(
            block_table_tensor=draft_block_table.get_device_tensor(
                cad.block_table_tensor.shape[0]
            )
        )
        if self.tree_drafter is not None:
            return self._propose_trees(
                inputs, draft_block_table.get_device_tensor(cad.num_reqs),
                sampling_metadata, target_token_ids, target_positions,
                target_hidden_states, next_token_ids, token_indices_to_sample, cad,
                mm_embed_inputs=mm_embed_inputs,
                num_rejected_tokens_gpu=num_rejected_tokens_gpu,
                slot_mappings=slot_mappings,
            )
        if self.adaptive is not None:
            return self._propose_adaptive(
                inputs, num_rejected_tokens_gpu, target_token_ids, target_positions,
                target_hidden_states, next_token_ids, token_indices_to_sample, cad,
                sampling_metadata, mm_embed_inputs=mm_embed_inputs,
                num_rejected_tokens_gpu=num_rejected_tokens_gpu,
                slot_mappings=slot_mappings)
        self.model.cross_attention_inputs = inputs
        recording = self.recorder is not None and self.recorder.active
        captured = self.recorder.capture(self.model) if recording else None
        try:
            draft_token_ids = super().propose(
                num_speculative_tokens,
                target_token_ids,
                target_positions,
                target_hidden_states,
                next_token_ids,
                token_indices_to_sample,
                cad,
                sampling_metadata,
                mm_embed_inputs=mm_embed_inputs,
                num_rejected_tokens_gpu=num_rejected_tokens_gpu,
                slot_mappings=slot_mappings,
            )
        finally:
            self.model.cross_attention_inputs = None
            if recording:
                self.recorder.release(self.model)
        if recording:
            self.recorder.save(captured, draft_token_ids, self.runner,
                               inputs.committed_lens)
        if self.test_proposer is not None:
            draft_token_ids = self.test_proposer.override(
                draft_token_ids, self.runner, inputs.committed_lens, next_token_ids)
            self._last_draft_probs = None
        return draft_token_ids

    def _propose_adaptive(self, inputs: CrossAttentionInputs, num_rejected_tokens,
                          *draft_args, **draft_kwargs) -> list[list[int]]:
        """Chains with context lookup and the speculation policy
        (``adaptive_chains``): per request K_r tokens, from the lookup or the
        draft; the draft runs ``plan.draft_steps`` steps (0: its first pass
        only, which keeps its window cache in step)."""
        num_reqs = inputs.committed_lens.shape[0]
        decoding = ~self.runner.discard_request_mask.np[:num_reqs].astype(bool)
        plan = self.adaptive.plan(self.runner.input_batch, num_reqs, draft_args[3],
                                  num_rejected_tokens, decoding)
        started = time.perf_counter()
        self.model.cross_attention_inputs = inputs
        try:
            draft_token_ids = super().propose(plan.draft_steps, *draft_args, **draft_kwargs)
        finally:
            self.model.cross_attention_inputs = None
        drafting_ms = (time.perf_counter() - started) * 1e3
        proposals, self._last_draft_probs = self.adaptive.compose(
            plan, draft_token_ids, self._last_draft_probs, drafting_ms)
        return proposals

    def _propose_trees(self, inputs: CrossAttentionInputs, window_block_table,
                       sampling_metadata, *first_pass_args, **first_pass_kwargs
                       ) -> torch.Tensor:
        """[num_reqs, num_nodes] the round's trees, nodes in level order."""
        self.model.cross_attention_inputs = inputs
        self._root_hidden_states = []
        try:
            # vLLM's first pass with one draft token: its sampling step hands
            # the roots' hidden states over (``_sample_draft_tokens``).
            super().propose(1, *first_pass_args, sampling_metadata=sampling_metadata,
                            **first_pass_kwargs)
            (root_hidden,) = self._root_hidden_states
        finally:
            self.model.cross_attention_inputs = None
            self._root_hidden_states = None
        num_reqs = inputs.committed_lens.shape[0]
        beam = self.tree_drafter.draft(
            self.model.compute_logits(root_hidden), inputs, window_block_table,
            self._drafting_sampling(sampling_metadata, num_reqs))
        if self.test_proposer is not None:
            beam = self.test_proposer.override_tree(beam, self.runner,
                                                    inputs.committed_lens,
                                                    first_pass_args[3])
        self.tree_rounds.propose(self.runner.input_batch.req_ids[:num_reqs], beam)
        self._last_draft_probs = None  # tree rows are verified with the tree's own
        return beam.tree.tokens

    def _sample_draft_tokens(self, hidden_states, sampling_metadata):
        """Chains: vLLM's. Tree mode's first pass: keep the roots' hidden states
        [num_reqs, hidden] (the trees grow from them) and sample nothing."""
        if self._root_hidden_states is None:
            return super()._sample_draft_tokens(hidden_states, sampling_metadata)
        self._root_hidden_states.append(hidden_states)
        placeholder = torch.zeros(hidden_states.shape[0], dtype=torch.long,
                                  device=hidden_states.device)
        return placeholder, None

    @override
    def _sample_from_logits(self, logits, sampling_metadata):
        """vLLM's draft sampling, except that a seeded request draws from its
        own generator, so its tokens do not depend on the rest of the batch
        (vLLM's draws all rows from the global generator)."""
        draft_token_ids, draft_probs = super()._sample_from_logits(logits, sampling_metadata)
        generators = self._drafting_generators(sampling_metadata)
        if draft_probs is None or not generators:
            return draft_token_ids, draft_probs
        return (reseed_draft_tokens(draft_token_ids, draft_probs, generators,
                                    sampling_metadata.temperature), draft_probs)

    def _drafting_generators(self, sampling_metadata) -> dict[int, torch.Generator]:
        """Row -> generator of the seeded requests whose drafts count this step.

        A request in the middle of a chunked prefill is drafted for too, but
        its drafts are discarded: drawing them from its generator would make
        its tokens depend on how its prompt was chunked (on prefix-cache hits).
        """
        num_reqs = self.runner.input_batch.num_reqs
        discarded = self.runner.discard_request_mask.np[:num_reqs]
        return {row: gen for row, gen in sampling_metadata.generators.items()
                if row < num_reqs and not discarded[row]}

    def _drafting_sampling(self, sampling_metadata, num_reqs: int) -> BatchSampling:
        """Tree drafting's settings: ``batch_sampling`` with the generators of
        ``_drafting_generators`` (the other rows draw from the global one)."""
        return dataclasses.replace(batch_sampling(sampling_metadata, num_reqs),
                                   generators=self._drafting_generators(sampling_metadata))

    def set_inputs_first_pass(self, *args, **kwargs):
        num_tokens, token_indices_to_sample, cad = super().set_inputs_first_pass(
            *args, **kwargs
        )
        # Only the sampled row of each request needs the full block.
        self.model.cross_attention_inputs.rows = token_indices_to_sample
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
