"""``vllm-longspec train``: train a LongSpec draft from a config file.

    vllm-longspec train --config vllm_longspec/train/configs/smollm2_135m.json
    vllm-longspec train --config CONFIG --resume      # continue checkpoint-last.pt

``--output-dir``, ``--target``, ``--num-threads`` and ``--device`` override the config;
``--max-steps N`` stops after N steps with a checkpoint, ``--max-minutes M``
after the step that ends M minutes in (smoke tests, time slicing: run again
with ``--resume``); ``--export-checkpoint DIR`` trains
nothing and exports the draft of ``checkpoint-last.pt`` as it stands (a point
of a learning curve, ``benchmarks/learning_curve.py``). ``--layout published`` exports the draft
as the reference code (sail-sg/LongSpec) saves one; ``--resume`` of a finished
run only exports again, so it rewrites a finished draft in another layout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def build_parser(prog: str = "vllm-longspec train") -> argparse.ArgumentParser:
    from vllm_longspec.model.checkpoint import LAYOUTS

    parser = argparse.ArgumentParser(
        prog=prog, description="Train a LongSpec draft from a config file."
    )
    parser.add_argument("--config", required=True, help="JSON or YAML training config")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/checkpoint-last.pt")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    parser.add_argument("--target", help="override the config's target model dir")
    parser.add_argument("--num-threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", help="cpu (default) or cuda[:N] (untested on a GPU so far)")
    parser.add_argument("--max-steps", type=int,
                        help="stop after this many steps of this run (checkpointed)")
    parser.add_argument("--max-minutes", type=float,
                        help="stop after the step that ends this many minutes into "
                        "this run (checkpointed)")
    parser.add_argument("--export-checkpoint", metavar="DIR",
                        help="train nothing: export the latest checkpoint's draft to DIR")
    parser.add_argument("--layout", choices=LAYOUTS, default="longspec",
                        help="export layout: longspec (default; window and training "
                        "summary in config.json) or published (the reference code's "
                        "LlamaGlideDecoderLayer / Qwen2GlideDecoderLayer directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[train] %(message)s")
    from vllm_longspec.model.checkpoint import DraftCheckpointError
    from vllm_longspec.train.config import TrainConfigError, load_config
    from vllm_longspec.train.trainer import Trainer
    from vllm_longspec.train.trainer_checkpoint import checkpoint_path

    try:
        config = load_config(args.config)
        overrides = {
            "output_dir": args.output_dir, "target": args.target,
            "num_threads": args.num_threads,
            "device": args.device,
        }
        config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
        if args.export_checkpoint and not checkpoint_path(config.output_dir).is_file():
            raise ValueError(f"--export-checkpoint: no checkpoint-last.pt in "
                             f"{config.output_dir}")
        trainer = Trainer(config, resume=args.resume or bool(args.export_checkpoint))
    except (TrainConfigError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.export_checkpoint:
        print(f"draft: {trainer.export(args.layout, Path(args.export_checkpoint))}")
        return 0
    try:
        draft_dir = trainer.run(
            max_steps=args.max_steps, layout=args.layout,
            max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    except DraftCheckpointError as err:  # checked before the first step
        print(f"error: {err}", file=sys.stderr)
        return 2
    if draft_dir is None:
        print(f"stopped early (--max-steps / --max-minutes); resume with --resume "
              f"(checkpoint in {config.output_dir})")
    else:
        print(f"draft: {draft_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
