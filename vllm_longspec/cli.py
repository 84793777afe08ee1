"""The ``vllm-longspec`` command: one subcommand per tool.

    vllm-longspec train --config CONFIG [--resume]    train a draft (train/cli.py)
        [--layout published]                      ... saved as the reference code saves it
    vllm-longspec distill --sources GLOB --out FILE   the target's own answers (distill.py)
    vllm-longspec draft-vocab DRAFT --jsonl FILE --size N   cheaper draft LM head
    vllm-longspec evaluate --draft DIR [--prompts FILE]     accepted length, no vLLM
    vllm-longspec features build --config CONFIG --stage NAME   cache target features
    vllm-longspec gpu-bundle pack --config CONFIG     train on a lent GPU (train/gpu_bundle.py)

Subcommands import their module only when run, so ``vllm-longspec train``
works without vLLM installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _train(argv: list[str]) -> int:
    from vllm_longspec.train.cli import main

    return main(argv)


def _distill(argv: list[str]) -> int:
    from vllm_longspec.distill import main

    return main(argv)


def _draft_vocab(argv: list[str]) -> int:
    from vllm_longspec.train.draft_vocab import main

    return main(argv)


def _evaluate(argv: list[str]) -> int:
    from vllm_longspec.train.evaluate import main

    return main(argv)


def _features(argv: list[str]) -> int:
    from vllm_longspec.train.features_build import main

    return main(argv)


def _gpu_bundle(argv: list[str]) -> int:
    from vllm_longspec.train.gpu_bundle import main

    return main(argv)


# name -> (one-line help, runner taking the subcommand's own argv)
SUBCOMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "train": ("train a LongSpec draft for a target model", _train),
    "distill": ("generate self-distillation data with the target (vLLM)", _distill),
    "draft-vocab": ("restrict what a draft proposes to frequent tokens", _draft_vocab),
    "evaluate": ("a draft's accepted length on prompts, simulated without vLLM", _evaluate),
    "features": ("cache the target's features for training (resumable)", _features),
    "gpu-bundle": ("pack a training run for a GPU machine, train it there", _gpu_bundle),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="vllm-longspec")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, _) in SUBCOMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv[:1])
    _, run = SUBCOMMANDS[args.command]
    return run(argv[1:] + rest)


if __name__ == "__main__":
    sys.exit(main())
