"""Parts of ``benchmarks/serve_stress.py``: prompts, HTTP load, server probes, report."""
