"""Accepted length of a draft without vLLM: greedy chain drafting, simulated exactly.

    vllm-longspec evaluate --draft DIR [--prompts FILE.jsonl] [--k 4] [--max-new-tokens N]
        [--per-cell N] [--max-ngram 8] [--out FILE.json] [--markdown FILE.md]
        [--continuations FILE.json] [--target-cache DIR]

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

The same rounds are walked for other proposal sources (``round_sources``):
context lookup alone and the hybrid rule (lookup when its match is at least t
tokens long, else the draft) for every t; ``--markdown`` writes the comparison
(``lookup_report``), e.g. benchmarks/results/lookup_rule.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from vllm_longspec.model.checkpoint import read_draft_checkpoint
from vllm_longspec.train.model import LongSpecDraft, load_draft_weights
from vllm_longspec.train.round_sources import RoundOptions, round_options
from vllm_longspec.train.target import (
    TargetOutputs,
    lm_head_weight,
    load_target,
    run_target,
)


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

    def __init__(self, draft_dir: str | Path, target_dir: str | Path,
                 target_cache: str | Path | None = None):
        self.target = load_target(target_dir, torch.float32)
        # what the target computes for a prompt + continuation does not depend on
        # the draft: with a cache directory it is computed once across drafts
        self.target_cache = Path(target_cache) if target_cache else None
        target_config = json.loads((Path(target_dir) / "config.json").read_text())
        # the window the draft was exported with (the engine's default for it)
        window = read_draft_checkpoint(draft_dir).sliding_window
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
        target = self._target_outputs(tokens, ids, positions)
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

    def _target_outputs(self, tokens: list[int], ids: torch.Tensor,
                        positions: torch.Tensor) -> TargetOutputs:
        """The target's features for ``tokens``, read from the cache if there."""
        if self.target_cache is None:
            return run_target(self.target, ids, positions)
        path = self.target_cache / f"{hash_tokens(tokens)}.pt"
        if path.exists():
            return TargetOutputs(**torch.load(path), last_keys_unrotated=None,
                                 final_hidden=None)
        target = run_target(self.target, ids, positions)
        self.target_cache.mkdir(parents=True, exist_ok=True)
        kept = {"embeddings": target.embeddings, "last_keys": target.last_keys,
                "last_values": target.last_values}
        torch.save(kept, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        return target

    def accepted_lengths(self, prompt: list[int], continuation: list[int],
                         num_drafts: int) -> list[int]:
        tokens = prompt + continuation
        # The first output token comes from prefill; its position is the first bonus.
        return simulate_rounds(self.hits(tokens, num_drafts), len(prompt),
                               len(tokens) - 1)

    def round_options(self, prompt: list[int], continuation: list[int], num_drafts: int,
                      max_ngram: int) -> tuple[RoundOptions, RoundOptions]:
        """Draft and lookup outcomes of a round at every bonus position, with the
        lookup preferring the most recent match, then the earliest."""
        tokens = prompt + continuation
        hits = self.hits(tokens, num_drafts)
        return tuple(round_options(tokens, hits, len(prompt), len(tokens) - 1, num_drafts,
                                   max_ngram, prefer_recent)
                     for prefer_recent in (True, False))


def hash_tokens(tokens: list[int]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]


def select_records(records: list[dict], per_cell: int | None,
                   limit: int | None) -> list[dict]:
    """The first ``per_cell`` prompts of every (task, bucket), then the first ``limit``."""
    if per_cell:
        seen: dict[tuple[str, str], int] = defaultdict(int)
        kept = []
        for record in records:
            cell = record.get("task", "all"), record.get("bucket", "all")
            if seen[cell] < per_cell:
                seen[cell] += 1
                kept.append(record)
        records = kept
    return records[:limit]


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
    parser.add_argument("--per-cell", type=int,
                        help="first N prompts of every (task, bucket) only")
    parser.add_argument("--max-ngram", type=int, default=8,
                        help="longest n-gram the context lookup matches")
    parser.add_argument("--draft-step-ratio", type=float, default=0.06,
                        help="time of one draft step / time of one verification round, "
                             "to rank rules by speed (default: issue 14's bf16 split at "
                             "4k, batch 1: 3.25 ms / 53.4 ms)")
    parser.add_argument("--target-cache",
                        help="directory caching the target's features per prompt + "
                             "continuation (reused by every draft evaluated with it)")
    parser.add_argument("--num-threads", type=int)
    parser.add_argument("--out", help="write per-prompt and summary results as JSON here")
    parser.add_argument("--markdown", help="write the source comparison as Markdown here")
    parser.add_argument("--continuations",
                        help="JSON cache of the target's greedy continuations "
                             "(read if present, extended and written back)")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    from tqdm import tqdm

    from vllm_longspec.assets import default_target_path
    from vllm_longspec.train.lookup_report import PromptResult, Summary

    evaluator = DraftEvaluator(args.draft, args.target or default_target_path(),
                               args.target_cache)
    records = select_records(
        [json.loads(line) for line in Path(args.prompts).read_text().splitlines()
         if line.strip()], args.per_cell, args.limit)
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
        options, earliest = evaluator.round_options(prompt, continuation, args.k,
                                                    args.max_ngram)
        results.append(PromptResult.measure(record, len(continuation), options,
                                            earliest, args.k, args.max_ngram))
    summary = Summary(results, k=args.k, max_ngram=args.max_ngram,
                      draft_step_ratio=args.draft_step_ratio)
    command = "vllm-longspec evaluate " + " ".join(
        argv if argv is not None else sys.argv[1:])
    print(summary.markdown(command, args.draft))
    if args.out:
        Path(args.out).write_text(json.dumps(summary.to_json(command, args.draft),
                                             indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(summary.markdown(command, args.draft))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
