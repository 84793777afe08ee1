"""The target's hybrid tree attention (``docs/hybrid-attention.md``).

One module per operation, each with its plain-torch ``reference``, its ``cpu``
path and one dispatcher (CPU tensors: ``cpu``; else the Triton kernel of the
same name in ``vllm_longspec.kernels``):

- ``paged_prefix``: the committed prefix, paged, with log-sum-exp (and the
  draft's cross-attention, ``paged_decode_attention``);
- ``masked_spec``: the speculative tokens under their ancestor mask, with LSE;
- ``merge``: the exact LSE merge of the two;
- ``hybrid``: the three composed (on CPU one C++ call, ``cpu_extension``).

Around them: ``kv_cache`` (vLLM's KV cache layouts, the one K/V split),
``tree_rows`` (the rows a step verifies, planned), and the vLLM backends
``cpu_backend`` (``CPU_ATTN``) and ``flash_backend`` (``FLASH_ATTN``, untested
on GPU).
"""
