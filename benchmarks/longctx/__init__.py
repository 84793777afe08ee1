"""The long-context benchmark suite (see docs/benchmarks.md).

    documents.py    the reserved source documents and how each is rendered as text
    prompt_file.py  the prompt set's record type, buckets, reading and writing
    methods.py      the decoding methods compared (plain, ngram, suffix, LongSpec
                    chains and trees) and method specs such as longspec:2
    plan.py         settings, engine settings, cells and their requests, fingerprints
    jobs.py         one engine process per (setting, method): planning, caching, running
    worker.py       one engine in its own process: runs cells, writes raw timings
    kv_probe.py     KV memory one LongSpec request holds (target vs draft)
    metrics.py      pure functions from raw timings and counters to metrics
    report.py       results JSON, markdown table and plots
    machine.py      what the results were measured on

``benchmarks/build_prompts.py`` defines and builds the prompt set,
``benchmarks/longctx_bench.py`` runs the suite.
"""
