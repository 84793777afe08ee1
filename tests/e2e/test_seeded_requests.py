"""A seeded, sampled request is reproducible, whatever else the engine does (float32).

vLLM's contract: a request with ``seed`` set gets the same tokens every time.
Three engines (shared, ``conftest.py``): plain, the shipped draft's chains
(probabilistic drafting, so the draft samples seeded rows) and its narrow
trees; each serves the phases of ``seeded.py``: alone after a cold, chunked
prefill, inside a batch of other sampled requests, alone again. Speculation must
give plain vLLM's tokens for the seed.
"""

from __future__ import annotations

from .seeded import assert_seeded_reproducible


def test_plain(plain_run):
    assert_seeded_reproducible(plain_run)


def test_chain(shipped_chain_run, plain_run):
    assert_seeded_reproducible(shipped_chain_run, plain=plain_run)


def test_tree(shipped_tree_run, plain_run):
    assert_seeded_reproducible(shipped_tree_run("narrow")["phases"], plain=plain_run)
