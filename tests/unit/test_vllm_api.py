"""Every vLLM symbol the plugin wraps, overrides or calls, pinned.

A vLLM upgrade that changes any of them turns into one red test here instead of
a crash while serving. Wrapped and overridden symbols are pinned to their exact
parameter lists; for the rest, the parameters we pass must exist. Attributes
and behaviours read from vLLM objects are checked in the source they live in.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

# (module, qualified name, exact parameter names): wrapped or overridden.
PINNED_EXACTLY = [
    ("vllm.engine.arg_utils", "EngineArgs.create_speculative_config",
     ["self", "target_model_config", "target_parallel_config"]),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.__init__",
     ["self", "vllm_config", "device"]),
    ("vllm.v1.spec_decode.draft_model", "DraftModelProposer.__init__",
     ["self", "vllm_config", "device", "runner"]),
    ("vllm.v1.spec_decode.draft_model", "DraftModelProposer.propose",
     ["self", "num_speculative_tokens", "target_token_ids", "target_positions",
      "target_hidden_states", "next_token_ids", "token_indices_to_sample",
      "common_attn_metadata", "sampling_metadata", "mm_embed_inputs",
      "num_rejected_tokens_gpu", "slot_mappings"]),
    ("vllm.v1.spec_decode.draft_model", "DraftModelProposer.set_inputs_first_pass",
     ["self", "target_token_ids", "next_token_ids", "target_positions",
      "target_hidden_states", "token_indices_to_sample", "cad",
      "num_rejected_tokens_gpu"]),
    ("vllm.v1.spec_decode.draft_model", "DraftModelProposer.load_model",
     ["self", "target_model"]),
    ("vllm.v1.spec_decode.draft_model", "DraftModelProposer.initialize_attn_backend",
     ["self", "kv_cache_config", "kernel_block_sizes"]),
    ("vllm.v1.spec_decode.draft_model", "DraftModelProposer._maybe_share_embeddings",
     ["self", "target_language_model"]),
    ("vllm.v1.spec_decode.draft_model", "DraftModelProposer._maybe_share_lm_head",
     ["self", "target_language_model"]),
    ("vllm.v1.spec_decode.llm_base_proposer", "SpecDecodeBaseProposer._sample_from_logits",
     ["self", "logits", "sampling_metadata"]),
    # LongSpec makes vLLM choose the V1 runner (patches/v2_runner.py).
    ("vllm.config.vllm", "VllmConfig._get_v2_model_runner_unsupported_features",
     ["self"]),
    # Tree mode (vllm_longspec/runner, patches/prepare_inputs.py,
    # patches/attention_metadata.py, patches/model_runner.py).
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs",
     ["self", "scheduler_output", "num_scheduled_tokens"]),
    ("vllm.v1.engine.input_processor", "InputProcessor._validate_params",
     ["self", "params", "supported_tasks"]),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._build_attention_metadata",
     ["self", "num_tokens", "num_reqs", "max_query_len", "num_tokens_padded",
      "num_reqs_padded", "ubatch_slices", "logits_indices", "max_num_sampled_tokens",
      "use_spec_decode", "for_cudagraph_capture", "num_scheduled_tokens",
      "slot_mappings"]),
    ("vllm.v1.sample.rejection_sampler", "RejectionSampler.forward",
     ["self", "metadata", "draft_probs", "logits", "sampling_metadata"]),
    # Hybrid tree attention backend (vllm_longspec/attention/cpu_backend.py).
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder.build",
     ["self", "common_prefix_len", "common_attn_metadata", "fast_build"]),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.forward",
     ["self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
      "output_scale", "output_block_scale"]),
    # GPU hybrid backend (vllm_longspec/attention/flash_backend.py, untested on GPU).
    ("vllm.v1.attention.backends.flash_attn", "FlashAttentionMetadataBuilder.build",
     ["self", "common_prefix_len", "common_attn_metadata", "fast_build"]),
    ("vllm.v1.attention.backends.flash_attn",
     "FlashAttentionMetadataBuilder.get_cudagraph_support",
     ["vllm_config", "kv_cache_spec"]),
    ("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.forward",
     ["self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
      "output_scale", "output_block_scale"]),
    # The CPU fixes (patches/cpu_generator_rewind.py, patches/cpu_top_k_empty.py).
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._sample",
     ["self", "logits", "spec_decode_metadata"]),
    ("vllm.v1.sample.ops.topk_topp_sampler", "apply_top_k_only", ["logits", "k"]),
    # The step timer (patches/step_timer.py, VLLM_LONGSPEC_TIME_SPLIT).
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model",
     ["self", "scheduler_output", "intermediate_tensors"]),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.sample_tokens",
     ["self", "grammar_output"]),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._model_forward",
     ["self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds",
      "model_kwargs"]),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.propose_draft_token_ids",
     ["self", "scheduler_output", "sampled_token_ids", "sampling_metadata",
      "hidden_states", "sample_hidden_states", "aux_hidden_states",
      "spec_decode_metadata", "common_attn_metadata", "slot_mappings"]),
    # The target's layers regrouped next to the draft's (patches/kv_cache_groups.py).
    ("vllm.v1.core.kv_cache_utils", "get_kv_cache_groups", ["vllm_config", "kv_cache_spec"]),
]

# (module, qualified name, parameters we pass): called.
CALLED_WITH = [
    # Seeded rows drawn as plain decoding draws them (runner/seeded.py).
    ("vllm.v1.sample.ops.topk_topp_sampler", "TopKTopPSampler.forward_native",
     ["logits", "generators", "k", "p"]),
    ("vllm.v1.sample.ops.topk_topp_sampler", "TopKTopPSampler.forward_cpu",
     ["logits", "generators", "k", "p"]),
    ("vllm.config.speculative", "SpeculativeConfig.update_arch_", []),
    ("vllm.v1.worker.block_table", "BlockTable.get_device_tensor", ["num_reqs"]),
    ("vllm._custom_ops", "cpu_attn_get_scheduler_metadata",
     ["num_reqs", "num_heads", "num_kv_heads", "head_dim", "seq_lens", "dtype",
      "query_start_loc", "causal", "sliding_window_size", "isa", "enable_kv_split"]),
    ("vllm._custom_ops", "cpu_attention_with_kv_cache",
     ["query", "key_cache", "value_cache", "output", "query_start_loc", "seq_lens",
      "scale", "causal", "alibi_slopes", "sliding_window", "block_table", "softcap",
      "scheduler_metadata", "s_aux"]),
    ("vllm._custom_ops", "cpu_attn_reshape_and_cache",
     ["key", "value", "key_cache", "value_cache", "slot_mapping", "isa"]),
    ("vllm.v1.attention.backends.cpu_attn", "_get_attn_isa",
     ["dtype", "block_size", "head_size"]),
    ("vllm._custom_ops", "cpu_attention_with_kv_cache",
     ["dynamic_causal", "k_scale", "v_scale", "kv_cache_dtype"]),
    ("vllm.v1.attention.backends.registry", "register_backend",
     ["backend", "class_path"]),
    ("vllm.exceptions", "VLLMValidationError.__init__", ["message", "parameter"]),
    ("vllm.triton_utils.dispatcher", "register_kernels", ["overrides"]),
    ("vllm.v1.worker.utils", "AttentionGroup.get_metadata_builder", ["ubatch_id"]),
    ("vllm.platforms.cpu", "CpuPlatform.register_triton_kernel_overrides", []),
    ("vllm.model_executor.layers.attention", "Attention.__init__",
     ["num_heads", "head_size", "scale", "num_kv_heads", "cache_config",
      "per_layer_sliding_window", "prefix"]),
    ("vllm.model_executor.layers.rotary_embedding", "get_rope",
     ["head_size", "max_position", "rope_parameters", "is_neox_style"]),
    ("vllm.model_executor.layers.linear", "QKVParallelLinear.__init__",
     ["hidden_size", "head_size", "total_num_heads", "total_num_kv_heads", "bias",
      "prefix"]),
    ("vllm.model_executor.layers.linear", "ColumnParallelLinear.__init__",
     ["input_size", "output_size", "bias", "prefix"]),
    ("vllm.model_executor.layers.linear", "RowParallelLinear.__init__",
     ["input_size", "output_size", "bias", "prefix"]),
    ("vllm.model_executor.layers.linear", "MergedColumnParallelLinear.__init__",
     ["input_size", "output_sizes", "bias", "prefix"]),
    ("vllm.model_executor.layers.layernorm", "RMSNorm.__init__",
     ["hidden_size", "eps"]),
    ("vllm.model_executor.layers.logits_processor", "LogitsProcessor.__init__",
     ["vocab_size"]),
    ("vllm.model_executor.model_loader.weight_utils", "default_weight_loader",
     ["param", "loaded_weight"]),
    ("vllm.model_executor.models.utils", "extract_layer_index", ["layer_name"]),
    ("vllm", "ModelRegistry.register_model", ["model_arch", "model_cls"]),
    ("vllm", "ModelRegistry.get_supported_archs", []),
    ("vllm.distributed", "get_tensor_model_parallel_world_size", []),
    ("vllm.model_executor.layers.activation", "SiluAndMul.__init__", []),
    # Tree mode's target distribution (runner/sampling.py), positionally.
    ("vllm.v1.sample.ops.topk_topp_sampler", "apply_top_k_top_p", ["logits", "k", "p"]),
]

# (module, qualified name, substrings its source must contain): behaviours we rely on.
SOURCE_FACTS = [
    # Plain sampling of a sampled row, which runner/seeded.py repeats per slot:
    # float32 logits divided by the temperature, then the top-k / top-p sampler
    # with the batch's generators (one draw per row and call).
    ("vllm.v1.sample.sampler", "Sampler.forward",
     ["logits = logits.to(torch.float32)", "self.sample(logits, sampling_metadata)"]),
    ("vllm.v1.sample.sampler", "Sampler.sample",
     ["self.apply_temperature(", "self.topk_topp_sampler(",
      "sampling_metadata.generators,"]),
    ("vllm.v1.sample.sampler", "Sampler.apply_temperature",
     ["logits.div_(temp.unsqueeze(dim=1))"]),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.__init__",
     ["self.requests: dict[str, CachedRequestState] = {}"]),
    # The empty-batch top-k call that patches/cpu_top_k_empty.py guards.
    ("vllm.v1.sample.ops.topk_topp_sampler", "apply_top_k_top_p_pytorch",
     ["return apply_top_k_only(logits, k)"]),
    # The demo reads the effective K from the engine's config.
    ("vllm.v1.engine.llm_engine", "LLMEngine.__init__",
     ["self.vllm_config = vllm_config"]),
    # Tree-mode request refusal reads the processor's speculative config.
    ("vllm.v1.engine.input_processor", "InputProcessor.__init__",
     ["self.speculative_config = vllm_config.speculative_config"]),
    # The step timer reads these scheduler-output fields.
    ("vllm.v1.core.sched.output", "SchedulerOutput",
     ["total_num_scheduled_tokens:", "num_scheduled_tokens:"]),
    # Draft layers = attention layers added by the draft; the draft KV group id.
    ("vllm.v1.spec_decode.llm_base_proposer", "SpecDecodeBaseProposer.load_model",
     ["_draft_attn_layer_names", "_maybe_share_embeddings", "_maybe_share_lm_head"]),
    ("vllm.v1.spec_decode.llm_base_proposer",
     "SpecDecodeBaseProposer.initialize_attn_backend", ["self.kv_cache_gid = gid"]),
    # The first pass computes the slot mapping from cad.block_table_tensor.
    ("vllm.v1.spec_decode.utils", "compute_new_slot_mapping",
     ["cad.block_table_tensor", "is_rejected_token_mask"]),
    ("vllm.v1.spec_decode.llm_base_proposer",
     "SpecDecodeBaseProposer.take_last_draft_probs", ["_last_draft_probs"]),
    # The runner builds a DraftModelProposer for draft_model and hands it group 0.
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.__init__",
     ["uses_draft_model()", "DraftModelProposer("]),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.propose_draft_token_ids",
     ["uses_draft_model()", "num_rejected_tokens_gpu=num_rejected_tokens_gpu"]),
    # The CPU backend stamps its ISA on the layers; the draft reads it.
    ("vllm.v1.attention.backends.cpu_attn",
     "CPUAttentionMetadataBuilder._set_isa_to_layers", ["layer.isa = self.isa"]),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.forward",
     ["kv_cache.view((num_blocks, num_kv_heads, block_size * 2, -1))"]),
    # The GPU hybrid backend splits the cache as FlashAttention's forward does.
    ("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.forward",
     ["kv_cache.transpose(1, 2).split(self.head_size, dim=-1)",
      "self.vllm_flash_attn_version"]),
    ("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.__init__",
     ["self.sliding_window = (-1, -1)", "self.sinks = sinks"]),
    ("vllm.v1.attention.backends.fa_utils", "is_flash_attn_varlen_func_available",
     []),
    # The GPU builder declares no CUDA-graph support through this attribute.
    ("vllm.v1.attention.backends.flash_attn",
     "FlashAttentionMetadataBuilder.get_cudagraph_support", ["return cls._cudagraph_support"]),
    # The CPU platform registers its kernel stand-ins after plugins load,
    # and expand_batch_to_tokens expands per-request floats with that kernel.
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase.init_worker",
     ["load_general_plugins()", "register_triton_kernel_overrides()"]),
    ("vllm.v1.sample.rejection_sampler", "expand_batch_to_tokens", ["_expand("]),
    ("vllm.platforms.cpu", "CpuPlatform.register_triton_kernel_overrides",
     ['"vllm.v1.sample.rejection_sampler.expand_kernel"']),
    # The proposer's drafting round (model/draft_inputs.py): the first pass's
    # rows come from set_inputs_first_pass before the model runs, its output at
    # those rows is what vLLM samples, and with 0 draft steps (tree roots,
    # adaptive chains) propose returns right after the first pass.
    ("vllm.v1.spec_decode.llm_base_proposer", "SpecDecodeBaseProposer.propose",
     ["self.set_inputs_first_pass(", "ret_hidden_states = self.model(**model_kwargs)",
      "sample_hidden_states = last_hidden_states[token_indices_to_sample]",
      "if self.num_speculative_tokens == 0:"]),
    # V1 unless the features list says otherwise (patches/v2_runner.py).
    ("vllm.config.vllm", "VllmConfig.use_v2_model_runner.fget",
     ["envs.VLLM_USE_V2_MODEL_RUNNER", "self._get_v2_model_runner_unsupported_features()"]),
    # The runner's metadata per attention group, shared by the group's layers
    # (patches/attention_metadata.py replaces it for the target's groups).
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._build_attention_metadata",
     ["attn_group = self.attn_groups[kv_cache_gid][attn_gid]",
      "for layer_name in attn_group.layer_names:"]),
    # What a hybrid CPU plan depends on besides the batch (plan_key).
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder.__init__",
     ["self.num_kv_heads =", "self.num_heads =", "self.head_dim =", "self.dtype =",
      "self.window_size =", "self.kv_cache_dtype =", "self.isa =",
      "self.is_cross_attention =", "self.is_encoder_only_attention ="]),
    # Slot mappings come from the chain positions before _prepare_inputs
    # returns (tree nodes keep distinct slots), the tree positions are read
    # after it, and the rejection sampler is called with vLLM's layout.
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs",
     ["self.input_batch.block_table.compute_slot_mapping(", "self.positions[",
      "spec_decode_metadata = self._calc_spec_decode_metadata("]),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model",
     ["self._prepare_inputs(scheduler_output", "self._build_attention_metadata(",
      "self._preprocess("]),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._sample",
     ["self.rejection_sampler(\n            spec_decode_metadata,\n            draft_probs,"
      "\n            logits,\n            sampling_metadata,"]),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.sample_tokens",
     ["self._sample(logits, spec_decode_metadata)", "propose_draft_token_ids("]),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._get_slot_mappings",
     ["blk_table.slot_mapping.gpu[:num_tokens_padded]"]),
    ("vllm.v1.sample.rejection_sampler", "RejectionSampler.parse_output",
     ["output_token_ids_np != PLACEHOLDER_TOKEN_ID"]),
    # The scheduler counts accepted drafts as the sampled tokens but one.
    ("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output",
     ["num_accepted = max(len(generated_token_ids) - num_sampled, 0)",
      "request.num_computed_tokens -= num_rejected"]),
    # One group per layer next to a window layer, and vLLM looks the grouping
    # up by name at call time (patches/kv_cache_groups.py); groups of unequal
    # size share block ids, one page per slot tensor.
    ("vllm.v1.core.kv_cache_utils", "_get_kv_cache_groups_uniform_page_size",
     ["group_size = min_num_layers", "grouped_layers.append(layers[i::num_groups])"]),
    ("vllm.v1.core.kv_cache_utils", "get_kv_cache_configs",
     ["get_kv_cache_groups(vllm_config, "]),
    ("vllm.v1.kv_cache_interface", "KVCacheGroupSpec", ["layer_names:", "kv_cache_spec:"]),
    # A window-only round writes the draft's K/V as vLLM's attention layer does.
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.do_kv_cache_update",
     ["layer.isa"]),
    ("vllm.model_executor.layers.attention.attention", "Attention.forward",
     ["key = key.view(-1, self.num_kv_heads, self.head_size)",
      "forward_includes_kv_cache_update"]),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._get_slot_mappings",
     ["slot_mappings_by_layer[layer_name] = slot_mapping"]),
    # Plugins are loaded before the speculative config is built.
    ("vllm.engine.arg_utils", "EngineArgs.__post_init__", ["load_general_plugins()"]),
    ("vllm.engine.arg_utils", "EngineArgs.create_engine_config",
     ["self.create_speculative_config("]),
    ("vllm.plugins", "load_general_plugins", ["DEFAULT_PLUGINS_GROUP"]),
]


def _resolve(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _parameters(obj) -> list[str]:
    return list(inspect.signature(obj).parameters)


@pytest.mark.parametrize("module,qualname,expected", PINNED_EXACTLY,
                         ids=[q for _, q, _ in PINNED_EXACTLY])
def test_wrapped_and_overridden_signatures(module, qualname, expected):
    assert _parameters(_resolve(module, qualname)) == expected


@pytest.mark.parametrize("module,qualname,passed", CALLED_WITH,
                         ids=[q for _, q, _ in CALLED_WITH])
def test_called_symbols_take_our_arguments(module, qualname, passed):
    parameters = _parameters(_resolve(module, qualname))
    missing = [p for p in passed if p not in parameters]
    assert not missing, f"{qualname} lost parameters {missing}"


@pytest.mark.parametrize("module,qualname,needles", SOURCE_FACTS,
                         ids=[q for _, q, _ in SOURCE_FACTS])
def test_behaviours_we_rely_on(module, qualname, needles):
    source = inspect.getsource(_resolve(module, qualname))
    for needle in needles:
        assert needle in source, f"{qualname} no longer contains {needle!r}"


def test_config_fields_we_read_and_write():
    from vllm.config.speculative import SpeculativeConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backend import CommonAttentionMetadata

    engine_fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert {"speculative_config", "spec_method", "spec_model", "spec_tokens",
            "kv_cache_dtype"} <= engine_fields
    spec_fields = set(SpeculativeConfig.__dataclass_fields__)
    assert {"method", "model", "num_speculative_tokens", "draft_sample_method",
            "enforce_eager", "draft_model_config"} <= spec_fields
    assert {"seq_lens", "block_table_tensor", "num_reqs"} <= set(
        CommonAttentionMetadata.__dataclass_fields__)
    assert "draft_model" in str(SpeculativeConfig.__annotations__["method"])

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert {"num_actual_tokens", "max_query_len", "query_start_loc", "max_seq_len",
            "seq_lens", "block_table", "slot_mapping", "scheduler_metadata", "causal",
            "dynamic_causal", "num_decode_tokens"} <= set(
        CPUAttentionMetadata.__dataclass_fields__)
    assert AttentionBackendEnum.CPU_ATTN.name == "CPU_ATTN"
    assert AttentionBackendEnum.FLASH_ATTN.name == "FLASH_ATTN"
    assert {"query_start_loc_cpu", "max_seq_len"} <= set(
        CommonAttentionMetadata.__dataclass_fields__)

    from vllm.v1.attention.backend import AttentionCGSupport, AttentionImplBase
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    assert {"causal", "query_start_loc", "seq_lens", "block_table", "max_seq_len"} <= set(
        FlashAttentionMetadata.__dataclass_fields__)

    from vllm import envs

    assert "VLLM_USE_V2_MODEL_RUNNER" in envs.environment_variables
    assert AttentionCGSupport.NEVER.value == 0
    assert "dcp_world_size" in AttentionImplBase.__annotations__


def test_tree_mode_reads_and_returns_these():
    from vllm.v1.outputs import SamplerOutput
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    from vllm_longspec.runner import verification

    assert rejection_sampler.PLACEHOLDER_TOKEN_ID == verification.PLACEHOLDER_TOKEN_ID
    assert {"sampled_token_ids", "logprobs_tensors"} <= set(
        SamplerOutput.__dataclass_fields__)
    assert {"num_draft_tokens", "draft_token_ids"} <= set(
        SpecDecodeMetadata.__dataclass_fields__)
    # set after init: the longest draft of the step (0: no request has one)
    assert "self.max_spec_len = max(self.num_draft_tokens)" in inspect.getsource(
        SpecDecodeMetadata)
    assert {"temperature", "all_greedy", "top_k", "top_p", "generators"} <= set(
        SamplingMetadata.__dataclass_fields__)
    # a step without drafts is sampled by the runner's ``sampler`` when these
    # say plain sampling is the same (``runner/seeded.py``, ``samples_as_plain``)
    assert {"max_num_logprobs", "no_penalties", "bad_words_token_ids",
            "thinking_budget_state_holder"} <= set(SamplingMetadata.__dataclass_fields__)

    from vllm import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput

    from vllm_longspec.runner.sampling import UNSUPPORTED_SETTINGS

    params = SamplingParams()
    assert all(hasattr(params, name) for name in UNSUPPORTED_SETTINGS)
    assert {"req_id", "sampling_params"} <= set(NewRequestData.__dataclass_fields__)
    assert {"scheduled_new_reqs", "scheduled_spec_decode_tokens"} <= set(
        SchedulerOutput.__dataclass_fields__)


def test_plugin_group_name():
    from vllm.plugins import DEFAULT_PLUGINS_GROUP

    assert DEFAULT_PLUGINS_GROUP == "vllm.general_plugins"
