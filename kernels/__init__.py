"""Triton kernels for LongSpec, installed as vllm_longspec.kernels."""
