"""vLLM's KV cache layouts: the one split of a layer's cache into K and V, and
the CPU packing, decoded.

vLLM allocates one tensor per layer, logically
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``. How K and V share it
depends on the backend; ``split_kv_cache`` returns strided K and V views
``[num_blocks, num_kv_heads, block_size, head_size]`` of either (no copy):

- ``"cpu"`` (``CPU_ATTN``): each (block, kv head) page is
  ``[2 * block_size, head_size]``, the first half the keys, the second the
  values, each packed in an ISA-specific order that vLLM's CPU kernels read;
  the views are those packed halves, as vLLM's CPU backend passes them;
- ``"flash"`` (FlashAttention's layout): per token, K and V side by side in the
  last dimension; plain token rows.

Inside a CPU half, ``cpu_attn_reshape_and_cache`` writes an ISA-specific order (found by
writing known values with vLLM's own op; ``tests/kernels/test_cpu_cache.py``
pins it for every ISA and dtype):

======  ==========================  ==========================================
isa     key half                    value half
======  ==========================  ==========================================
vec     ``[head, block]``           ``[block, head]`` (plain rows)
vec16   ``[head, block]``           ``[block, head]``
amx     ``[block/16, head/2, 16, 2]`` ``[head/16, block/2, 16, 2]``
======  ==========================  ==========================================

(``amx``: 16-bit dtypes only; tiles of 16 tokens with dim pairs for keys, tiles
of 16 dims with token pairs for values. vLLM picks ``amx`` only for bf16 on AMX
machines; other ISAs, e.g. ``neon``, are not decoded here.)

``logical_kv_views`` turns the two halves into strided views
``[num_blocks, num_kv_heads, block_size, head_size]`` indexed (block, head,
token, dim) - no copy - for ``vec``/``vec16``. ``gather_kv_blocks`` copies chosen
blocks into plain rows for any decoded ISA (the only way to read ``amx``), and
``gather_kv_tokens`` chosen slots (block * block_size + offset);
``move_kv_tokens`` copies slots to other slots (reading them decoded, writing
them back with vLLM's own op).
"""

from __future__ import annotations

from typing import Literal

import torch

STRIDED_ISAS = ("vec", "vec16")
DECODED_ISAS = ("vec", "vec16", "amx")
KVLayout = Literal["cpu", "flash"]


def split_kv_cache(
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2 * head_size]
    layout: KVLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(key_cache, value_cache)``, each [num_blocks, kv_heads, block, head]."""
    num_blocks, num_kv_heads, block_size, two_head = kv_cache.shape
    head_size = two_head // 2
    if layout == "cpu":
        pages = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size)
        return pages[:, :, :block_size], pages[:, :, block_size:]
    if layout == "flash":
        return kv_cache[..., :head_size], kv_cache[..., head_size:]
    raise ValueError(f"unknown KV cache layout {layout!r}")


def logical_kv_views(
    key_half: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size] packed
    value_half: torch.Tensor,
    isa: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(keys, values)`` indexed (block, head, token, dim); no copy."""
    if isa not in STRIDED_ISAS:
        raise ValueError(
            f"the {isa!r} CPU cache packing has no strided view; use gather_kv_blocks")
    _check_page_interior(key_half, value_half)
    num_blocks, num_kv_heads, block_size, head_size = key_half.shape
    keys = key_half.as_strided(
        key_half.shape,
        (key_half.stride(0), key_half.stride(1), 1, block_size),
        key_half.storage_offset(),
    )
    return keys, value_half


def gather_kv_blocks(
    key_half: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size] packed
    value_half: torch.Tensor,
    block_ids: torch.Tensor,  # [n] int
    isa: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain copies ``[n, num_kv_heads, block_size, head_size]`` of chosen blocks."""
    block_ids = block_ids.long()
    if isa in STRIDED_ISAS:
        keys, values = logical_kv_views(key_half, value_half, isa)
        return keys[block_ids].contiguous(), values[block_ids].contiguous()
    if isa != "amx":
        raise ValueError(f"CPU cache packing {isa!r} is not decoded (known: {DECODED_ISAS})")
    _check_page_interior(key_half, value_half)
    num_blocks, num_kv_heads, block_size, head_size = key_half.shape
    if key_half.element_size() != 2 or block_size % 32 or head_size % 32:
        raise ValueError("amx packing needs a 16-bit dtype, block and head sizes % 32 == 0")
    n = block_ids.numel()
    # keys: [block/16, head/2, 16 tokens, 2 dims] -> [block, head]
    keys = _pages(key_half)[block_ids].view(
        n, num_kv_heads, block_size // 16, head_size // 2, 16, 2)
    keys = keys.permute(0, 1, 2, 4, 3, 5).reshape(n, num_kv_heads, block_size, head_size)
    # values: [head/16, block/2, 16 dims, 2 tokens] -> [block, head]
    values = _pages(value_half)[block_ids].view(
        n, num_kv_heads, head_size // 16, block_size // 2, 16, 2)
    values = values.permute(0, 1, 3, 5, 2, 4).reshape(n, num_kv_heads, block_size, head_size)
    return keys, values


def gather_kv_tokens(
    key_half: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size] packed
    value_half: torch.Tensor,
    slots: torch.Tensor,  # [n] int: block * block_size + offset
    isa: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain copies ``[n, num_kv_heads, head_size]`` of the K/V stored at ``slots``."""
    block_size = key_half.shape[2]
    slots = slots.long()
    blocks, inverse = torch.unique(slots // block_size, return_inverse=True)
    keys, values = gather_kv_blocks(key_half, value_half, blocks, isa)
    offsets = slots % block_size
    return keys[inverse, :, offsets], values[inverse, :, offsets]


def move_kv_tokens(
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2 * head_size]
    src_slots: torch.Tensor,  # [n] int
    dst_slots: torch.Tensor,  # [n] int
    isa: str,
) -> None:
    """Copy the K/V stored at ``src_slots`` to ``dst_slots`` (all read first)."""
    from vllm import _custom_ops as ops

    key_half, value_half = split_kv_cache(kv_cache, "cpu")
    keys, values = gather_kv_tokens(key_half, value_half, src_slots, isa)
    ops.cpu_attn_reshape_and_cache(keys, values, key_half, value_half,
                                   dst_slots.long(), isa)


def _pages(half: torch.Tensor) -> torch.Tensor:
    """[num_blocks, num_kv_heads, block_size * head_size] view of one half."""
    num_blocks, num_kv_heads, block_size, head_size = half.shape
    return half.as_strided(
        (num_blocks, num_kv_heads, block_size * head_size),
        (half.stride(0), half.stride(1), 1),
        half.storage_offset(),
    )


def _check_page_interior(key_half: torch.Tensor, value_half: torch.Tensor) -> None:
    for name, half in (("key", key_half), ("value", value_half)):
        if half.dim() != 4 or half.stride(3) != 1 or half.stride(2) != half.shape[3]:
            raise ValueError(
                f"{name} half must be a page view [num_blocks, num_kv_heads, block_size, "
                f"head_size] with contiguous pages (as split_kv_cache returns); got shape "
                f"{tuple(half.shape)} strides {half.stride()}")
