"""Patch: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner._build_attention_metadata``.

Target: the runner's build of the target forward's attention metadata (every
    KV cache group's builder), inherited by ``CPUModelRunner``.
Why: the hybrid attention backend verifies the step's tree rows under their
    ancestor masks; vLLM calls its metadata builders with vLLM's arguments
    only, so the step must reach them here.
How: run the original, then hand the rows to verify (the ``TreeStep``'s masks;
    with ``hybrid_chains`` every short multi-token row, as a chain) explicitly
    to each target layer's builder, which plans them once per configuration and adds each group's block table (``add_hybrid_plans``).
    The draft's group keeps vLLM's metadata. Otherwise the original alone.
When it can go: when vLLM verifies speculative trees itself.
"""

from __future__ import annotations

import functools
import inspect

_orig__build_attention_metadata = None


def target_attn_groups(runner, proposer) -> list:
    """The runner's attention groups but the draft's (its KV-cache group)."""
    return [group for gid, groups in enumerate(runner.attn_groups)
            if gid != proposer.kv_cache_gid for group in groups]


def add_hybrid_plans(attn_metadata: dict, attn_groups, query_start_loc: list[int],
                     tree_masks, chains: bool) -> None:
    """Replace the metadata of ``attn_groups`` (the target's) in the per-layer
    dict ``attn_metadata`` by metadata carrying the plan of its rows to verify.

    ``tree_masks``: batch row -> [q, q] ancestor mask of the step's trees;
    ``chains``: also every other short multi-token row, as a chain.
    """
    from vllm_longspec.attention.tree_rows import rows_to_verify

    query_lens = [query_start_loc[r + 1] - query_start_loc[r]
                  for r in range(len(query_start_loc) - 1)]
    plans = {}  # one per builder configuration: every target layer shares it
    for group in attn_groups:
        builder = group.get_metadata_builder()
        if not hasattr(builder, "with_plan"):
            continue  # vLLM's own backend: the hybrid one is not registered
        metadata = attn_metadata[group.layer_names[0]]
        key = (type(builder), builder.plan_key)
        if key not in plans:
            rows = rows_to_verify(tree_masks, query_lens,
                                  chains and builder.verifies_chains)
            plans[key] = builder.plan(rows, query_start_loc, metadata)
        planned = builder.with_plan(metadata, plans[key])
        for name in group.layer_names:
            attn_metadata[name] = planned


def apply() -> None:
    global _orig__build_attention_metadata
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_longspec.patches.model_runner import longspec_proposer

    if _orig__build_attention_metadata is not None:
        return
    _orig__build_attention_metadata = GPUModelRunner._build_attention_metadata
    signature = inspect.signature(_orig__build_attention_metadata)

    @functools.wraps(_orig__build_attention_metadata)
    def _build_attention_metadata(self, *args, **kwargs):
        result = _orig__build_attention_metadata(self, *args, **kwargs)
        proposer = longspec_proposer(self)
        if proposer is None:
            return result
        step = proposer.tree_rounds.step if proposer.tree_rounds is not None else None
        chains = proposer.hybrid_chains
        call = signature.bind(self, *args, **kwargs).arguments
        if (step is None and not chains) or call.get("for_cudagraph_capture"):
            return result
        attn_metadata, spec_decode_common = result
        if not isinstance(attn_metadata, dict):
            raise NotImplementedError("hybrid tree attention does not support "
                                      "micro-batching (one metadata dict per ubatch)")
        num_reqs = call["num_reqs"]
        add_hybrid_plans(attn_metadata, target_attn_groups(self, proposer),
                         self.query_start_loc.np[:num_reqs + 1].tolist(),
                         step.ancestor_masks if step is not None else {}, chains)
        return attn_metadata, spec_decode_common

    GPUModelRunner._build_attention_metadata = _build_attention_metadata
