"""Target verification attention on CPU: hybrid path vs vLLM's kernel vs dense masked.

For each (dtype, batch, context, speculative tokens) the same vLLM-written CPU
KV cache is attended three ways, with the speculative tokens already in the
cache (as after the layer's KV update):

- stock:  vLLM's ``cpu_attention_with_kv_cache``, causal over prefix + new tokens
          (exact for chains; cannot express a tree);
- hybrid: ``attention.hybrid.hybrid_attention``: paged prefix with LSE (C++ kernel,
          in place) + masked new-token part + merge, mask given as ancestor bits;
- dense:  per request, gather prefix K/V out of the cache, append the new
          tokens, one ``scaled_dot_product_attention`` with a boolean mask.

Timings are medians of interleaved repeats (the three methods run in a shuffled
order inside each repeat, with a cache flush before each call), so load from
other processes hits all three alike. Geometry: SmolLM2-135M (9 query / 3 kv heads, head 64),
block size 128. Writes benchmarks/results/attention_microbench.{json,md}.

    python benchmarks/attention_microbench.py [--repeats 5] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_longspec.attention import hybrid
from vllm_longspec.attention.cpu_extension import load_cpu_extension
from vllm_longspec.attention.kv_cache import gather_kv_blocks, split_kv_cache
from vllm_longspec.tree.mask import (
    ancestor_mask,
    chain_parents,
    pack_ancestor_bits,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 9, 3, 64, 128
RESULTS = Path(__file__).parent / "results"


class Setup:
    def __init__(self, dtype, batch, context, spec_tokens, gen):
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.isa = _get_attn_isa(dtype, BLOCK_SIZE, HEAD_SIZE)
        self.dtype, self.batch, self.spec = dtype, batch, spec_tokens
        seq_len = context + spec_tokens
        blocks_per_req = -(-seq_len // BLOCK_SIZE)
        num_blocks = batch * blocks_per_req + 1
        self.kv_cache = torch.zeros(num_blocks, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE,
                                    dtype=dtype)
        self.key_half, self.value_half = split_kv_cache(self.kv_cache, "cpu")
        order = torch.randperm(num_blocks - 1, generator=gen) + 1  # shuffled blocks
        self.block_table = order[: batch * blocks_per_req].view(batch, -1).to(torch.int32)
        pos = torch.arange(seq_len)
        for r in range(batch):
            keys = torch.randn(seq_len, NUM_KV_HEADS, HEAD_SIZE, generator=gen).to(dtype)
            values = torch.randn(seq_len, NUM_KV_HEADS, HEAD_SIZE, generator=gen).to(dtype)
            slots = self.block_table[r, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
            ops.cpu_attn_reshape_and_cache(keys, values, self.key_half, self.value_half,
                                           slots, self.isa)
            if r == 0:
                self.new_key = [keys[context:]]
                self.new_value = [values[context:]]
            else:
                self.new_key.append(keys[context:])
                self.new_value.append(values[context:])
        self.new_key = torch.cat(self.new_key)
        self.new_value = torch.cat(self.new_value)
        self.query = torch.randn(batch * spec_tokens, NUM_HEADS, HEAD_SIZE,
                                 generator=gen).to(dtype)
        self.qsl = torch.arange(batch + 1, dtype=torch.int32) * spec_tokens
        self.seq_lens = torch.full((batch,), seq_len, dtype=torch.int32)
        self.prefix_lens = self.seq_lens - spec_tokens
        mask = ancestor_mask(chain_parents(spec_tokens))
        self.mask = mask
        self.bits = pack_ancestor_bits([mask] * batch)
        self.scale = HEAD_SIZE**-0.5

    def stock(self):
        from vllm import _custom_ops as ops

        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=self.batch, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS,
            head_dim=HEAD_SIZE, seq_lens=self.seq_lens, dtype=self.dtype,
            query_start_loc=self.qsl, causal=True, sliding_window_size=-1,
            isa=self.isa, enable_kv_split=True)
        out = torch.empty_like(self.query)
        ops.cpu_attention_with_kv_cache(
            query=self.query, key_cache=self.key_half, value_cache=self.value_half,
            output=out, query_start_loc=self.qsl, seq_lens=self.seq_lens,
            scale=self.scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=self.block_table, softcap=0.0, scheduler_metadata=metadata,
            s_aux=None)
        return out

    def hybrid(self):
        out = torch.empty_like(self.query)
        hybrid.hybrid_attention(
            self.query, self.new_key, self.new_value, self.key_half, self.value_half,
            self.block_table, self.prefix_lens, self.qsl, self.bits, self.scale, out,
            cpu_isa=self.isa)
        return out

    def dense(self):
        out = torch.empty_like(self.query)
        seq_len = int(self.seq_lens[0])
        context = seq_len - self.spec
        visible = torch.cat([torch.ones(self.spec, context, dtype=torch.bool), self.mask],
                            dim=1)
        for r in range(self.batch):
            blocks = self.block_table[r, : -(-context // BLOCK_SIZE)]
            keys, values = gather_kv_blocks(self.key_half, self.value_half, blocks, self.isa)
            # [kv_heads, tokens, head]
            keys = torch.cat([keys.transpose(0, 1).reshape(NUM_KV_HEADS, -1, HEAD_SIZE)
                              [:, :context], self.new_key[r * self.spec:(r + 1) * self.spec]
                              .transpose(0, 1)], dim=1)
            values = torch.cat([values.transpose(0, 1).reshape(NUM_KV_HEADS, -1, HEAD_SIZE)
                                [:, :context],
                                self.new_value[r * self.spec:(r + 1) * self.spec]
                                .transpose(0, 1)], dim=1)
            query = self.query[r * self.spec:(r + 1) * self.spec].transpose(0, 1)
            out[r * self.spec:(r + 1) * self.spec] = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=visible, scale=self.scale,
                enable_gqa=True).transpose(0, 1)
        return out


def measure(setup, repeats, flush, rng):
    methods = {"stock": setup.stock, "hybrid": setup.hybrid, "dense": setup.dense}
    for fn in methods.values():
        fn()  # warm-up
    times = {name: [] for name in methods}
    for _ in range(repeats):
        order = list(methods.items())
        rng.shuffle(order)  # no method always runs right after another
        for name, fn in order:
            flush.add_(1.0)  # evict the cache from CPU caches
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def check_agreement(setup):
    stock, hybrid, dense = setup.stock(), setup.hybrid(), setup.dense()
    return max((hybrid.float() - stock.float()).abs().max().item(),
               (dense.float() - stock.float()).abs().max().item())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one small size only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    dtypes = [torch.float32, torch.bfloat16]
    batches, contexts, specs = [1, 8], [1024, 4096, 8192], [5, 16, 64]
    if args.quick:
        dtypes, batches, contexts, specs = [torch.bfloat16], [1], [1024], [16]
    flush = torch.zeros(16 * 2**20)  # 64 MiB
    rows = []
    header = (f"{'dtype':9} {'batch':>5} {'context':>7} {'spec':>4} {'stock ms':>9} "
              f"{'hybrid ms':>9} {'dense ms':>9} {'stock/hyb':>9} {'dense/hyb':>9}")
    print(header)
    for dtype in dtypes:
        for batch in batches:
            for context in contexts:
                for spec in specs:
                    setup = Setup(dtype, batch, context, spec, gen)
                    ms = measure(setup, args.repeats, flush, rng)
                    row = {"dtype": str(dtype).removeprefix("torch."), "batch": batch,
                           "context": context, "spec_tokens": spec, "isa": setup.isa,
                           **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
                           "stock_over_hybrid": round(ms["stock"] / ms["hybrid"], 3),
                           "dense_over_hybrid": round(ms["dense"] / ms["hybrid"], 3),
                           "max_abs_diff_vs_stock": check_agreement(setup)}
                    rows.append(row)
                    print(f"{row['dtype']:9} {batch:5} {context:7} {spec:4} "
                          f"{ms['stock']:9.3f} {ms['hybrid']:9.3f} {ms['dense']:9.3f} "
                          f"{row['stock_over_hybrid']:9.2f} {row['dense_over_hybrid']:9.2f}",
                          flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "repeats": args.repeats,
            "cpp_extension": load_cpu_extension() is not None,
            "geometry": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS,
                         "head_size": HEAD_SIZE, "block_size": BLOCK_SIZE}}
    if args.quick:
        return
    RESULTS.mkdir(exist_ok=True)
    stem = "attention_microbench" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# Attention microbenchmark (CPU, target verification)", "",
             f"torch {meta['torch']}, {meta['threads']} threads, median of "
             f"{args.repeats} interleaved repeats; ratios > 1 mean the hybrid path is "
             "faster. Chain masks (so vLLM's causal kernel is a valid baseline).", "",
             "| dtype | batch | context | spec | stock ms | hybrid ms | dense ms | "
             "stock/hybrid | dense/hybrid |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['batch']} | {r['context']} | {r['spec_tokens']} | "
              f"{r['stock_ms']:.3f} | {r['hybrid_ms']:.3f} | {r['dense_ms']:.3f} | "
              f"{r['stock_over_hybrid']:.2f} | {r['dense_over_hybrid']:.2f} |" for r in rows]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
