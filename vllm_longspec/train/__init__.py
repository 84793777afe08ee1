"""Training pipeline for LongSpec drafts (plain torch + transformers, never vLLM).

    config.py      TrainConfig / StageConfig / SourceConfig, read from JSON or YAML
    target.py      the frozen target: embeddings, last-layer K/V, final hidden
    model.py       the draft block (same math as ``vllm_longspec/model/draft.py``)
    attention.py   sliding-window self-attention, noise-shifted cross-attention
    rope.py        the target's rotary tables
    positions.py   Anchor-Offset Indices (AOI)
    loss.py        chunked LM-head cross-entropy (+ optional distillation)
    vocab_map.py   the loss over the draft vocabulary (the LM head's rows)
    step.py        one micro-batch: target features, draft forward, loss
    features.py    the target-feature cache: shards, index, reading, AOI shifts
    features_build.py  ``vllm-longspec features build`` (resumable)
    data.py        packed, seeded, resumable token stream over the sources
    sources.py     documents from text files, JSONL, token files
    chat.py        chat rendering with an assistant-only loss mask
    exclusions.py  benchmark files that training must never read
    schedule.py    warmup + cosine learning rate
    trainer_checkpoint.py  atomic trainer checkpoint, RNG states
    metrics.py     metrics.jsonl and the loss-curve PNG
    trainer.py     the loop; export with ``save_draft``
    cli.py         ``vllm-longspec train --config CONFIG [--resume]``
    bench.py       training tokens/s on this machine (live, or cached epochs)

Nothing here imports vllm (a unit test checks it), so drafts can be trained
on machines without it.
"""
