"""Tree speculation inside vLLM's V1 model runner (``"tree"`` in the config).

One step of the runner, for a batch whose last round drafted trees:

1. ``_prepare_inputs`` (patched): ``TreeRounds.begin_step`` matches the drafts
   the scheduler sent with the trees drafted last step; ``layout`` rotates each
   node at root + depth.
2. ``_build_attention_metadata`` (patched): the step's ``SpecTreeBatch`` makes
   the hybrid attention backend verify those rows under their ancestor masks.
3. ``TreeRejectionSampler`` (in place of vLLM's rejection sampler): verifies
   every row (``verification``), moves the accepted paths to the chain layout
   (``layout``) and answers in vLLM's format.
4. ``LongSpecProposer`` drafts the next trees (``drafter``) and hands them to
   ``TreeRounds``.
"""
