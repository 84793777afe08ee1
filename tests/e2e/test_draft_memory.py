"""The draft's KV memory per request is bounded by its window, not the context.

The shared random-draft chain engine (``conftest.py``) runs a 1074-token and a
7218-token prompt one at a time and reports, after every decode step, the KV
blocks each cache group holds and the bytes they reserve.
"""

from __future__ import annotations


def test_draft_kv_bytes_do_not_grow_with_context(random_chain_run):
    short, long = random_chain_run["kv"]["samples"]
    draft_group = next(name for name in short[0] if "draft_model" in name)
    target_group = next(name for name in short[0] if "layers.29." in name)
    # The draft's window layer alone; the target's 30 layers in 5 groups of 6
    # (patches/kv_cache_groups.py), not one group per layer.
    assert draft_group.count(",") == 0
    assert sorted(name.count(",") + 1 for name in short[0] if name != draft_group) == [6] * 5
    # Steady decoding: the step right after prefill still holds the last
    # prefill chunk's blocks (freed when the next step is scheduled), and the
    # final sample is taken after the request finished and freed everything.
    short, long = short[1:-1], long[1:-1]
    assert len(short) >= 4 and len(long) >= 4

    draft_short = {s[draft_group]["bytes"] for s in short}
    draft_long = {s[draft_group]["bytes"] for s in long}
    assert draft_short == draft_long, (draft_short, draft_long)
    # The window (512 tokens + the query) plus the speculative slots spans at
    # most 6 blocks of 128 tokens, whatever the context.
    assert max(s[draft_group]["blocks"] for s in long) <= 6
    # The target's cache grows with the context, the draft's does not.
    target_short = max(s[target_group]["bytes"] for s in short)
    target_long = min(s[target_group]["bytes"] for s in long)
    assert target_long > 6 * target_short
