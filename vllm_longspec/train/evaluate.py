"""Accepted length of a draft without vLLM: greedy chain drafting, simulated exactly.

    vllm-longspec evaluate --draft DIR [--prompts FILE.jsonl] [--k 4] [--max-new-tokens N]

Under greedy decoding, draft step k of a round (k = 0..K-1, the round's bonus
token at position c) is only looked at when steps 0..k-1 were all accepted, and
then its input tokens are exactly the target's own continuation. So one pass of
the training-side draft over the target's greedy output per visibility shift
j = k + 1 (draft row t sees target K/V at positions <= t - j, as in vLLM)
says, for every position t, whether draft step j - 1 started at t - j + 1 would
be accepted. Walking the rounds over those hits gives the accepted length vLLM
reports (tokens per target verification, bonus included) without starting an
engine: the parity test pins the training-side draft to the vLLM draft, and a
test compares this simulation with a real engine run.

The target's greedy continuation comes from transformers (float32, KV cache).
A draft vocabulary in the draft directory is honoured (the draft's argmax is
taken over those tokens only).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from vllm_longspec.train.model import LongSpecDraft, load_draft_weights
from vllm_longspec.train.target import lm_head_weight, load_target, run_target


def simulate_rounds(hits: torch.Tensor, start: int, end: int) -> list[int]:
    """Tokens emitted per round of greedy chain drafting.

    hits: [K, T] bool; ``hits[k, t]`` = draft step k of a round whose bonus
    token is at position t - k predicts the token at t + 1 correctly. Rounds
    start with the bonus token at ``start`` and stop once position ``end`` (the
    last token of the continuation) has been emitted.
    """
    num_drafts = hits.shape[0]
    emitted, bonus = [], start
    while bonus < end:
        accepted = 0
        # the round's last token (the target's) must not pass the end either
        while (accepted < num_drafts and bonus + accepted + 1 < end
               and bool(hits[accepted, bonus + accepted])):
            accepted += 1
        emitted.append(accepted + 1)  # accepted drafts + the target's next token
        bonus += accepted + 1
    return emitted


class DraftEvaluator:
    """A trained draft directory next to its (frozen, float32) target."""

    def __init__(self, draft_dir: str | Path, target_dir: str | Path):
        config = json.loads((Path(draft_dir) / "config.json").read_text())
        self.target = load_target(target_dir, torch.float32)
        target_config = json.loads((Path(target_dir) / "config.json").read_text())
        window = (config.get("longspec") or {}).get("sliding_window", 512)
        self.draft = LongSpecDraft(target_config, window).eval()
        vocab = load_draft_weights(self.draft, draft_dir)
        head = lm_head_weight(self.target).float()
        self.vocab = vocab
        self.head = head[self.vocab] if self.vocab is not None else head

    @torch.no_grad()
    def greedy_continuation(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        output = self.target.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=self.target.config.eos_token_id)
        return output[0, len(prompt):].tolist()

    @torch.no_grad()
    def hits(self, tokens: list[int], num_drafts: int) -> torch.Tensor:
        """[K, T] bool: see ``simulate_rounds``."""
        ids = torch.tensor([tokens])
        positions = torch.arange(len(tokens))[None]
        target = run_target(self.target, ids, positions)
        nexts = ids[0, 1:]
        rows = []
        for shift in range(1, num_drafts + 1):
            hidden = self.draft(target.embeddings, positions, target.last_keys,
                                target.last_values, shift)[0, :-1]
            predicted = (hidden @ self.head.T).argmax(-1)
            if self.vocab is not None:
                predicted = self.vocab[predicted]
            rows.append(torch.cat([predicted == nexts, torch.zeros(1, dtype=torch.bool)]))
        return torch.stack(rows)

    def accepted_lengths(self, prompt: list[int], continuation: list[int],
                         num_drafts: int) -> list[int]:
        tokens = prompt + continuation
        # The first output token comes from prefill; its position is the first bonus.
        return simulate_rounds(self.hits(tokens, num_drafts), len(prompt),
                               len(tokens) - 1)


def hash_tokens(tokens: list[int]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-longspec evaluate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--draft", required=True)
    parser.add_argument("--target", help="target model directory (default: SmolLM2)")
    parser.add_argument("--prompts", default="benchmarks/prompts/longctx-v1.jsonl",
                        help="JSONL with prompt_token_ids (and optional id, task, bucket)")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, help="first N prompts only")
    parser.add_argument("--num-threads", type=int)
    parser.add_argument("--out", help="write per-prompt results as JSON here")
    parser.add_argument("--continuations",
                        help="JSON cache of the target's greedy continuations "
                             "(read if present, extended and written back)")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    from tqdm import tqdm

    from vllm_longspec.assets import default_target_path

    evaluator = DraftEvaluator(args.draft, args.target or default_target_path())
    records = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()
               if line.strip()][:args.limit]
    cache_file = Path(args.continuations) if args.continuations else None
    cache = json.loads(cache_file.read_text()) if cache_file and cache_file.exists() else {}
    results = []
    for record in tqdm(records, desc="evaluate", unit="prompt"):
        prompt = record["prompt_token_ids"]
        key = f"{args.max_new_tokens}:{hash_tokens(prompt)}"
        if key not in cache:
            cache[key] = evaluator.greedy_continuation(prompt, args.max_new_tokens)
            if cache_file:
                cache_file.write_text(json.dumps(cache))
        continuation = cache[key]
        rounds = evaluator.accepted_lengths(prompt, continuation, args.k)
        results.append({"id": record.get("id"), "task": record.get("task", "all"),
                        "bucket": record.get("bucket", "all"), "prompt_tokens": len(prompt),
                        "output_tokens": len(continuation), "rounds": len(rounds),
                        "mean_accepted_length": sum(rounds) / max(len(rounds), 1)})
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for result in results:
        groups[result["task"], result["bucket"]].append(result)
    print(f"\nmean accepted length (incl. bonus), greedy chain, K={args.k}:")
    for (task, bucket), members in sorted(groups.items()):
        tokens = sum(r["output_tokens"] - 1 for r in members)
        rounds = sum(r["rounds"] for r in members)
        print(f"  {task:18s} {bucket:>4s}  {tokens / max(rounds, 1):5.2f}  "
              f"({len(members)} prompts)")
    total_tokens = sum(r["output_tokens"] - 1 for r in results)
    total_rounds = sum(r["rounds"] for r in results)
    print(f"  {'all':18s} {'':>4s}  {total_tokens / max(total_rounds, 1):5.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"k": args.k, "draft": args.draft,
                                              "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
