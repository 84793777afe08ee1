"""LongSpec inside vLLM's V1 model runner: the proposer and the tree runner.

One engine step, for a batch whose last round drafted trees (chains: vLLM's
own steps, with ``LongSpecProposer`` drafting; ``docs/architecture.md``):

1. ``_prepare_inputs`` (patched): ``TreeRounds.begin_step`` matches the drafts
   the scheduler sent with the trees drafted last step, making the step's
   ``TreeStep`` (``step``); ``layout`` rotates each node at root + depth.
2. ``_build_attention_metadata`` (patched): the step's ancestor masks go to
   the target layers' metadata builders (hybrid tree attention).
3. ``TreeRejectionSampler`` (in place of vLLM's rejection sampler): takes the
   step, verifies every row (``verification``), moves the accepted paths to
   the chain layout (``layout``) and answers in vLLM's format.
4. ``LongSpecProposer`` drafts the next trees (``tree_drafter``) and hands
   them to ``TreeRounds``.

In both modes, seeded requests are verified by the target's own draws, so they
get plain decoding's tokens (``seeded``: ``SeededChainVerification`` wraps
vLLM's rejection sampler, ``verify_step`` takes their rows out of the tree
rule).
"""
