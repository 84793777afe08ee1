"""How many tokens one request may speculate per step (plain Python).

A chain drafts at most ``MAX_NUM_SPECULATIVE_TOKENS`` tokens (the config's
bound on ``num_speculative_tokens``).

The hybrid tree attention verifies a request's root and its draft tokens in one
target forward under an ancestor mask packed into ``MAX_SPEC_TOKENS // 32``
int32 words per token (``tree.mask``); the Triton and C++ kernels are compiled
for that width. Everything else follows from it.
"""

# Query tokens of one request in one verification forward: the root + drafts.
MAX_SPEC_TOKENS = 128
# A tree's draft nodes: the root takes one of the tokens.
MAX_TREE_NODES = MAX_SPEC_TOKENS - 1
# int32 words of one token's packed ancestor mask.
BITS_WORDS = MAX_SPEC_TOKENS // 32
# Draft tokens of a chain (LongSpecConfig.num_speculative_tokens).
MAX_NUM_SPECULATIVE_TOKENS = 16
