"""Benchmarks of vllm-longspec. Run them from the repository root as modules,
e.g. ``python -m benchmarks.longctx_bench`` (see docs/benchmarks.md)."""
