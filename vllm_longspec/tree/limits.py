"""How many tokens one request may speculate per step (plain Python).

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
