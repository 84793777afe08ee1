"""Argument checks shared by the Triton launchers and the CPU fast paths.

Every failure is a ValueError that names the argument and what was expected.
Pure torch: importing this module does not import triton.
"""

from __future__ import annotations

import torch

from vllm_longspec.tree.limits import MAX_SPEC_TOKENS

__all__ = ["MAX_SPEC_TOKENS"]  # the kernels' mask width, re-exported

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32,)


def check_tensor(name: str, tensor, dims: int, dtypes=None, device=None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {dtypes}, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")


def check_query_layout(query, query_start_loc) -> None:
    check_tensor("query", query, 3, FLOAT_DTYPES)
    check_tensor("query_start_loc", query_start_loc, 1, INDEX_DTYPES, query.device)
    if query.stride(2) != 1:
        raise ValueError(f"query's last dim must be contiguous, strides {query.stride()}")
    if query_start_loc.numel() < 1:
        raise ValueError("query_start_loc needs num_reqs + 1 entries")


def check_gqa(query, num_kv_heads: int, head_size: int, what: str) -> None:
    num_heads = query.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of {what}'s "
                         f"num_kv_heads={num_kv_heads}")
    if query.shape[2] != head_size:
        raise ValueError(f"query head_size={query.shape[2]} != {what} head_size={head_size}")


def check_outputs(query, out, lse_out) -> None:
    num_tokens, num_heads, head_size = query.shape
    if out is not None:
        check_tensor("out", out, 3, FLOAT_DTYPES, query.device)
        if tuple(out.shape) != (num_tokens, num_heads, head_size) or out.stride(2) != 1:
            raise ValueError(f"out must be [{num_tokens}, {num_heads}, {head_size}] with a "
                             f"contiguous last dim, got {tuple(out.shape)} {out.stride()}")
    if lse_out is not None:
        check_tensor("lse_out", lse_out, 2, (torch.float32,), query.device)
        if tuple(lse_out.shape) != (num_tokens, num_heads):
            raise ValueError(f"lse_out must be [{num_tokens}, {num_heads}] float32, "
                             f"got {tuple(lse_out.shape)}")


def check_masked_inputs(query, key, value, query_start_loc, ancestor_bits, out, lse_out):
    check_query_layout(query, query_start_loc)
    for name, tensor in (("key", key), ("value", value)):
        check_tensor(name, tensor, 3, (query.dtype,), query.device)
        if tensor.shape[0] != query.shape[0] or tensor.stride(2) != 1:
            raise ValueError(f"{name} must be [num_tokens={query.shape[0]}, num_kv_heads, "
                             f"head_size] with a contiguous last dim, got "
                             f"{tuple(tensor.shape)} {tensor.stride()}")
    if key.shape != value.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    check_gqa(query, key.shape[1], key.shape[2], "key")
    if ancestor_bits is not None:
        check_tensor("ancestor_bits", ancestor_bits, 2, INDEX_DTYPES, query.device)
        words = MAX_SPEC_TOKENS // 32
        if ancestor_bits.shape != (query.shape[0], words) or not ancestor_bits.is_contiguous():
            raise ValueError(f"ancestor_bits must be contiguous [num_tokens={query.shape[0]}, "
                             f"{words}] int32, got {tuple(ancestor_bits.shape)}")
    check_outputs(query, out, lse_out)


def check_paged_inputs(query, key_cache, value_cache, block_table, prefix_lens,
                       query_start_loc, out, lse_out):
    check_query_layout(query, query_start_loc)
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        check_tensor(name, cache, 4, (query.dtype,), query.device)
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache {tuple(key_cache.shape)} and value_cache "
                         f"{tuple(value_cache.shape)} differ")
    check_gqa(query, key_cache.shape[1], key_cache.shape[3], "key_cache")
    num_reqs = query_start_loc.numel() - 1
    check_tensor("block_table", block_table, 2, INDEX_DTYPES, query.device)
    check_tensor("prefix_lens", prefix_lens, 1, INDEX_DTYPES, query.device)
    if block_table.shape[0] < num_reqs or prefix_lens.shape[0] != num_reqs:
        raise ValueError(f"block_table needs >= {num_reqs} rows and prefix_lens "
                         f"{num_reqs} entries (from query_start_loc), got "
                         f"{block_table.shape[0]} and {prefix_lens.shape[0]}")
    if block_table.stride(1) != 1:
        raise ValueError("block_table rows must be contiguous")
    check_outputs(query, out, lse_out)


def check_merge_inputs(out_a, lse_a, out_b, lse_b, out, lse_out):
    check_tensor("out_a", out_a, 3, FLOAT_DTYPES)
    check_tensor("out_b", out_b, 3, FLOAT_DTYPES, out_a.device)
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_a {tuple(out_a.shape)} and out_b {tuple(out_b.shape)} differ")
    if out_a.stride(2) != 1 or out_b.stride(2) != 1:
        raise ValueError("out_a and out_b must have a contiguous last dim")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        check_tensor(name, lse, 2, (torch.float32,), out_a.device)
        if tuple(lse.shape) != tuple(out_a.shape[:2]):
            raise ValueError(f"{name} must be [num_tokens, num_heads] = "
                             f"{tuple(out_a.shape[:2])}, got {tuple(lse.shape)}")
    check_outputs(out_a, out, lse_out)
