"""Wrappers around vLLM symbols, one module per symbol.

Each module names the symbol it wraps, why, how, and when it can go. Each keeps
the original as ``_orig_<name>`` and calls it for everything that is not
LongSpec, so vLLM behaves exactly as before unless LongSpec is requested.
"""

from vllm_longspec.patches import (
    attention_metadata,
    cpu_expand_kernel,
    cpu_generator_rewind,
    engine_args,
    model_runner,
    prepare_inputs,
    request_validation,
)

PATCHES = (engine_args, model_runner, prepare_inputs, attention_metadata,
           cpu_expand_kernel, cpu_generator_rewind, request_validation)


def apply_all() -> None:
    for patch in PATCHES:
        patch.apply()
