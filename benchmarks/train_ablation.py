"""Equal-budget ablation of the draft's recipe on self-distillation data.

    python -m benchmarks.train_ablation [--tokens 393216] [--arms finetune ...]

Arms (same data, order, budget, lr schedule; one change each):

    finetune      init_from the shipped draft (vllm_longspec/drafts/smollm2-135m-instruct)
    target-last   init_from_target_layer -1 (the target's last decoder layer)
    random        the checkpoint format's random init
    finetune-all  as finetune, with a loss on every position (loss_on "all": the
                  prompt's documents too, not only the target's answers)
    finetune-all-kl  as finetune-all, the loss KL(target || draft) on the target's
                  top-32 logits instead of cross-entropy on the next token

Data: a fixed snapshot of the target's own answers
(~/.cache/vllm-longspec/data/distill-v2-snap400.jsonl: the first 400 records
of distill-v2), loss on the answers only unless the arm says otherwise,
4096-token sequences, no AOI, loss
over the shipped draft's 8192-token vocabulary. The target's features are
computed once into a feature cache shared by the arms (``vllm-longspec
features build``; the KL arm's cache also holds the target's top-32
logits). Each arm is then scored by the fixed offline evaluation
(``vllm-longspec evaluate``, K=4, greedy, 128 new tokens, the first prompt of
every task x bucket of benchmarks/prompts/longctx-v1.jsonl: documents no
training source reads), the shipped draft first as the baseline.

Everything is resumable: run the same command again after an interruption
(finished steps are skipped, training resumes from its checkpoint). Runs live
under ~/.cache/vllm-longspec/runs/ablate-<arm>/; the table goes to
benchmarks/results/train_ablation.{md,json}. Start it niced: it keeps both of
its heavy steps (features, training, evaluation) one at a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path("~/.cache/vllm-longspec").expanduser()
SHIPPED = "vllm_longspec/drafts/smollm2-135m-instruct"
DATA = CACHE / "data/distill-v2-snap400.jsonl"
FEATURES = CACHE / "features/distill-v2-snap400-4096"
EVAL = CACHE / "eval"
RESULTS = Path("benchmarks/results/train_ablation")
ARMS = {  # config keys; "stage": stage keys
    "finetune": {"init_from": SHIPPED},
    "target-last": {"init_from_target_layer": -1},
    "random": {},
    "finetune-all": {"init_from": SHIPPED, "stage": {"loss_on": "all"}},
    "finetune-all-kl": {"init_from": SHIPPED, "distill_weight": 1.0, "distill_top_k": 32,
                        "stage": {"loss_on": "all"}},
}
SEQ_LEN, BATCH_TOKENS, GRAD_ACCUM = 4096, 8192, 2
EVAL_ARGS = ["--per-cell", "1", "--max-new-tokens", "128", "--num-threads", "1",
             "--continuations", str(EVAL / "continuations-pc1-128.json"),
             "--target-cache", str(EVAL / "target-pc1-128")]


def features_dir(arm: str) -> Path:
    """The arm's feature cache: the shared one, or one with the target's top-k
    logits for a distilling arm (the same sequences either way)."""
    top_k = ARMS[arm].get("distill_top_k") or 0
    return FEATURES.with_name(f"{FEATURES.name}-top{top_k}") if top_k else FEATURES


def arm_config(arm: str, tokens: int, lr: float) -> dict:
    stage = {
        "name": "distill-snap400",
        "sources": [{"type": "jsonl", "paths": [str(DATA)]}],
        "seq_len": SEQ_LEN, "aoi": False, "lr": lr, "warmup_fraction": 0.1,
        "tokens": tokens, "batch_tokens": BATCH_TOKENS, "grad_accum": GRAD_ACCUM,
        "features": str(features_dir(arm)), **ARMS[arm].get("stage", {}),
    }
    config = {key: value for key, value in ARMS[arm].items() if key != "stage"}
    return {"output_dir": str(CACHE / f"runs/ablate-{arm}"), "seed": 0,
            "draft_vocab": SHIPPED, "num_threads": 1, "checkpoint_every": 8,
            "stages": [stage], **config}


def run(command: list[str], log: Path) -> None:
    print("+", " ".join(command), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT)


def evaluate_draft(name: str, draft: str, directory: Path = EVAL) -> dict:
    """The fixed offline evaluation of one draft, kept as DIRECTORY/NAME.json (an
    existing result is read, not redone); continuations and target features are
    shared by every draft scored (EVAL_ARGS)."""
    out = directory / f"{name}.json"
    if not out.exists():
        directory.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "vllm_longspec.cli", "evaluate", "--draft", draft,
             *EVAL_ARGS, "--out", str(out)], directory / f"{name}.log")
    return json.loads(out.read_text())


def evaluate(name: str, draft: str) -> dict:
    return evaluate_draft(f"ablate-{name}", draft)


def write_config(arm: str, tokens: int, lr: float) -> Path:
    directory = CACHE / f"runs/ablate-{arm}"
    directory.mkdir(parents=True, exist_ok=True)
    config_file = directory / "config.json"
    config_file.write_text(json.dumps(arm_config(arm, tokens, lr), indent=1) + "\n")
    return config_file


def build_features(arm: str, tokens: int, lr: float) -> None:
    """The arm's feature cache, unless a finished one is there."""
    directory = features_dir(arm)
    if (directory / "built").exists():
        return
    started = time.time()
    run([sys.executable, "-m", "vllm_longspec.cli", "features", "build",
         "--config", str(write_config(arm, tokens, lr)), "--stage", "distill-snap400",
         "--sequences", str(tokens // SEQ_LEN),
         "--top-k", str(ARMS[arm].get("distill_top_k") or 0), "--num-threads", "1",
         "--out", str(directory)], directory.with_suffix(".log"))
    (directory / "built").write_text(f"{time.time() - started:.0f} s\n")


def train(arm: str, tokens: int, lr: float) -> dict:
    directory = CACHE / f"runs/ablate-{arm}"
    config_file = write_config(arm, tokens, lr)
    if not (directory / "draft/model.safetensors").exists():
        resume = ["--resume"] if (directory / "checkpoint-last.pt").exists() else []
        run([sys.executable, "-m", "vllm_longspec.cli", "train", "--config",
             str(config_file), *resume], directory / "train.log")
    records = [json.loads(line) for line in
               (directory / "metrics.jsonl").read_text().splitlines()]
    last = records[-8:]
    return {"steps": records[-1]["step"], "tokens": records[-1]["tokens"],
            "train_seconds": sum(r["step_seconds"] for r in records),
            "ce_first": records[0]["ce"], "top1_first": records[0]["top1_acc"],
            "ce_last8": sum(r["ce"] for r in last) / len(last),
            "top1_last8": sum(r["top1_acc"] for r in last) / len(last),
            "config": str(config_file)}


def eval_row(result: dict) -> dict:
    return {"accepted_length": result["sources"]["draft"]["tokens_per_round"],
            "acceptance_per_position": result["acceptance_per_position"]["draft"],
            "by_task": {task: row["draft"] for task, row in result["by_task"].items()},
            "command": result["command"]}


def markdown(rows: dict, tokens: int, lr: float, commands: list[str]) -> str:
    tasks = sorted(next(iter(rows.values()))["eval"]["by_task"])
    lines = ["# Draft recipe at an equal token budget", "",
             f"Budget per arm: {tokens:,} training tokens ({SEQ_LEN}-token sequences, "
             f"{BATCH_TOKENS} tokens per step, lr {lr} warmup 10% + cosine), on the "
             f"target's own answers (`{DATA.name}`, loss on answers only unless the "
             "arm sets loss_on, over the "
             "shipped draft's 8192-token vocabulary); trained from a feature cache on "
             "one niced thread of the shared 2-core CPU.", "",
             "Evaluation: `vllm-longspec evaluate` (greedy chains, K=4, 128 new tokens, "
             "the first prompt of each task x bucket of the benchmark suite, 12 prompts "
             "at 1k/4k/7k; documents excluded from every training source). Accepted "
             "length = tokens per verification round, bonus included.", "",
             "| arm | settings | steps | train min | CE start -> end | top-1 end | "
             "accepted length | pos 1 | pos 2 | pos 3 | pos 4 | "
             + " | ".join(tasks) + " |",
             "|---" * (11 + len(tasks)) + "|"]
    for arm, row in rows.items():
        ev, tr = row["eval"], row.get("train")
        pos = " | ".join(f"{p:.3f}" for p in ev["acceptance_per_position"])
        train_cells = (f"{tr['steps']} | {tr['train_seconds'] / 60:.0f} | "
                       f"{tr['ce_first']:.2f} -> {tr['ce_last8']:.2f} | "
                       f"{tr['top1_last8']:.3f}") if tr else "- | - | - | -"
        lines.append(f"| {arm} | {row['init']} | {train_cells} | "
                     f"**{ev['accepted_length']:.3f}** | {pos} | "
                     + " | ".join(f"{ev['by_task'][t]:.3f}" for t in tasks) + " |")
    lines += ["", "CE and top-1 are the trainer's (mean of the last 8 logged steps, "
              "over noise shifts 1-4). Position i: acceptance of draft token i given "
              "the earlier ones accepted.", "", "Commands:", "", "```"] + commands + [
              row["eval"]["command"] for row in rows.values()] + [
              f"vllm-longspec train --config {row['train']['config']}"
              for row in rows.values() if row.get("train")] + ["```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=393_216)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = parser.parse_args()
    EVAL.mkdir(parents=True, exist_ok=True)
    commands = ["python -m benchmarks.train_ablation " + " ".join(sys.argv[1:])]

    rows = {"shipped": {"init": "(the shipped draft, not retrained)",
                        "eval": eval_row(evaluate("shipped", SHIPPED))}}
    for arm in args.arms:
        build_features(arm, args.tokens, args.lr)
        summary = train(arm, args.tokens, args.lr)
        draft = str(CACHE / f"runs/ablate-{arm}/draft")
        rows[arm] = {"init": json.dumps(ARMS[arm]) if ARMS[arm] else "random",
                     "train": summary, "eval": eval_row(evaluate(arm, draft))}
        RESULTS.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        RESULTS.with_suffix(".md").write_text(markdown(rows, args.tokens, args.lr,
                                                       commands))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
