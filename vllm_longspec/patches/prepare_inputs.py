"""Patch: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner._prepare_inputs``.

Target: the runner's per-step input preparation (token ids, positions, slot
    mappings, spec-decode metadata), inherited by ``CPUModelRunner``.
Why: in LongSpec tree mode the drafts of a row are tree nodes, which must be
    rotated at root + depth, not at the chain positions vLLM gives them.
How: refuse new requests with sampling settings tree mode lacks, run the
    original, then let ``TreeRounds.begin_step`` match the scheduled drafts
    with last step's trees, making the step's ``TreeStep`` (the one state the
    rest of the step reads, ``runner/step.py``), and overwrite the positions of
    the tree rows' nodes.
    Slot mappings were computed from the chain positions before, so the nodes
    keep distinct cache slots. Without tree mode: the original alone.
When it can go: when vLLM verifies speculative trees itself.
"""

from __future__ import annotations

import functools

_orig__prepare_inputs = None


def apply() -> None:
    global _orig__prepare_inputs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_longspec.patches.model_runner import longspec_proposer

    if _orig__prepare_inputs is not None:
        return
    _orig__prepare_inputs = GPUModelRunner._prepare_inputs

    @functools.wraps(_orig__prepare_inputs)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        proposer = longspec_proposer(self)
        rounds = proposer.tree_rounds if proposer is not None else None
        if rounds is None:
            return _orig__prepare_inputs(self, scheduler_output, num_scheduled_tokens)
        from vllm_longspec.runner.layout import place_nodes_at_depths
        from vllm_longspec.runner.sampling import check_request_supported

        for request in scheduler_output.scheduled_new_reqs:
            check_request_supported(request.req_id, request.sampling_params)
        result = _orig__prepare_inputs(self, scheduler_output, num_scheduled_tokens)
        step = rounds.begin_step(scheduler_output.scheduled_spec_decode_tokens,
                                 self.input_batch.req_id_to_index)
        if step is not None:
            place_nodes_at_depths(self.positions, self.query_start_loc.np, step.trees)
        return result

    GPUModelRunner._prepare_inputs = _prepare_inputs
