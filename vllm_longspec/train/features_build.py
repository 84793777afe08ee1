"""``vllm-longspec features build``: fill a stage's target-feature cache.

    vllm-longspec features build --config CONFIG --stage NAME [--out DIR]
        [--sequences N] [--top-k K] [--shard-sequences N] [--batch-size B]
    vllm-longspec features info DIR

The stage's packed stream (the same sequences, in the same order, as training
reads live) goes through the target once, ``--batch-size`` sequences per
forward, at each sequence's fixed AOI positions; every ``--shard-sequences``
sequences become one shard (features.py). Interrupted? Run the same command
again: it checks the spec, drops a half-written shard, and continues at the
next unwritten one with the data stream where that shard left it. A larger
``--sequences`` on a finished cache extends it: the same stream, read on.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vllm_longspec.train.config import TrainConfig, TrainConfigError, load_config
from vllm_longspec.train.data import stage_stream
from vllm_longspec.train.exclusions import ExclusionSet
from vllm_longspec.train.features import (
    DEFAULT_TOP_K,
    SHARD_SEQUENCES,
    FeatureCacheError,
    FeatureIndex,
    FeatureSpec,
    default_features_dir,
    sequence_anchors_offsets,
)
from vllm_longspec.train.positions import anchored_position_ids
from vllm_longspec.train.step import MicroBatch, TargetFeatures, live_features
from vllm_longspec.train.target import load_target, read_target_config
from vllm_longspec.train.trainer import DTYPES, resolve_target_path

log = logging.getLogger(__name__)


def stage_index_of(config: TrainConfig, name: str) -> int:
    names = [stage.name for stage in config.stages]
    if name not in names:
        raise TrainConfigError(f"no stage {name!r} in the config; stages: {names}.")
    return names.index(name)


def _open_index(out: Path, spec: FeatureSpec) -> FeatureIndex:
    if (out / "index.json").is_file():
        index = FeatureIndex.read(out)
        changed = [k for k, v in vars(spec).items() if getattr(index.spec, k) != v]
        if changed == ["num_sequences"] and spec.num_sequences > index.spec.num_sequences:
            # more of the same stream: the shards so far stay, the build goes on
            log.info("extending %s from %d to %d sequences", out,
                     index.spec.num_sequences, spec.num_sequences)
            index.spec = spec
            index.write()
        elif changed:
            raise FeatureCacheError(
                f"{out} holds a feature cache built with other settings "
                f"({', '.join(changed)}): choose another --out, or delete it.")
        for stale in out.glob(".shard-*"):  # a shard a crash left half-written
            stale.unlink()
        return index
    index = FeatureIndex(out, spec, [], None)
    index.write()
    return index


def _shard_tensors(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor,
    offsets: torch.Tensor, parts: list[TargetFeatures],
) -> dict[str, torch.Tensor]:
    tensors = {
        "input_ids": input_ids.to(torch.int32), "loss_mask": loss_mask.bool(),
        "anchors": anchors, "offsets": offsets,
        "keys": torch.cat([p.keys_unrotated for p in parts]).cpu(),
        "values": torch.cat([p.values for p in parts]).cpu(),
    }
    if parts[0].top_k_logits is not None:
        tensors["top_k_logits"] = torch.cat([p.top_k_logits for p in parts]).cpu()
        tensors["top_k_ids"] = torch.cat([p.top_k_ids for p in parts]).to(torch.int32).cpu()
    return tensors


def build_features(
    config: TrainConfig, stage_name: str, out: str | Path | None = None,
    num_sequences: int | None = None, top_k: int = DEFAULT_TOP_K,
    shard_sequences: int = SHARD_SEQUENCES, batch_size: int = 1,
    max_shards: int | None = None,
) -> FeatureIndex:
    """Build (or finish) the cache of a stage; returns its index. ``max_shards``
    stops after that many new shards (tests, time slicing)."""
    stage_index = stage_index_of(config, stage_name)
    stage = config.stages[stage_index]
    out = Path(out).expanduser() if out else (stage.features_path()
                                              or default_features_dir(stage.name))
    if num_sequences is None:
        num_sequences = math.ceil(stage.num_steps * stage.batch_tokens / stage.seq_len)
    target_path = resolve_target_path(config)
    target_config = read_target_config(target_path)
    spec = FeatureSpec.for_stage(config, stage_index, target_path, target_config,
                                 top_k=top_k, num_sequences=num_sequences,
                                 shard_sequences=shard_sequences)
    index = _open_index(out, spec)
    if index.complete:
        log.info("the feature cache in %s is complete (%d sequences)", out, num_sequences)
        return index
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    exclusions = ExclusionSet.from_config(config.exclude_paths, config.exclude_list_file)
    stream, _ = stage_stream(stage, stage_index, config.seed, exclusions, target_path)
    if index.stream_state is not None:
        stream.load_state_dict(index.stream_state)
    device = torch.device(config.device)
    target = load_target(target_path, DTYPES[config.target_dtype]).to(device)
    bar = tqdm(total=num_sequences, initial=index.sequences_done, unit="seq",
               desc=f"features {stage.name}", dynamic_ncols=True)
    new_shards = 0
    while not index.complete and (max_shards is None or new_shards < max_shards):
        first = index.sequences_done
        count = min(shard_sequences, num_sequences - first)
        input_ids, loss_mask = stream.next_batch(count)
        anchors, offsets = sequence_anchors_offsets(
            config.seed, stage_index, first, count, stage.seq_len, stage.aoi,
            spec.max_positions, config.aoi_max_anchors)
        positions = anchored_position_ids(anchors, offsets, stage.seq_len)
        parts = []
        for start in range(0, count, batch_size):
            rows = slice(start, start + batch_size)
            micro_batch = MicroBatch(input_ids[rows], loss_mask[rows], positions[rows],
                                     noise_shift=0).to(device)
            parts.append(live_features(target, micro_batch,
                                       teacher="top_k" if top_k else None, top_k=top_k))
            bar.update(micro_batch.input_ids.shape[0])
        index.add_shard(_shard_tensors(input_ids, loss_mask, anchors, offsets, parts),
                        stream.state_dict())
        new_shards += 1
    bar.close()
    return index


def _build_main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    overrides = {"target": args.target, "num_threads": args.num_threads,
                 "device": args.device}
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    index = build_features(config, args.stage, args.out, args.sequences, args.top_k,
                           args.shard_sequences, args.batch_size)
    spec = index.spec
    print(f"feature cache: {index.directory} ({spec.num_sequences} sequences of "
          f"{spec.seq_len} tokens, top-{spec.top_k} logits); train from it with "
          f"\"features\": \"{index.directory}\" in stage {spec.stage!r}")
    return 0


def _info_main(args: argparse.Namespace) -> int:
    index = FeatureIndex.read(args.directory)
    size = sum((index.directory / s["file"]).stat().st_size for s in index.shards)
    print(f"{index.directory}: stage {index.spec.stage!r}, {index.sequences_done} of "
          f"{index.spec.num_sequences} sequences of {index.spec.seq_len} tokens in "
          f"{len(index.shards)} shards ({size / 2**30:.2f} GiB), top-{index.spec.top_k}, "
          f"{'complete' if index.complete else 'incomplete: run the build again'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-longspec features",
                                     description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="compute a stage's cache (resumable)")
    build.add_argument("--config", required=True, help="training config (JSON/YAML)")
    build.add_argument("--stage", required=True, help="the stage whose data to cache")
    build.add_argument("--out", help="cache directory (default: the stage's 'features', "
                       "else ~/.cache/vllm-longspec/features/STAGE)")
    build.add_argument("--sequences", type=int,
                       help="sequences to cache (default: the stage's budget)")
    build.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                       help="target logits kept per position for distillation (0: none)")
    build.add_argument("--shard-sequences", type=int, default=SHARD_SEQUENCES)
    build.add_argument("--batch-size", type=int, default=1,
                       help="sequences per target forward")
    build.add_argument("--target", help="override the config's target")
    build.add_argument("--num-threads", type=int, help="torch CPU threads")
    build.add_argument("--device", help="cpu or cuda[:N]")
    info = commands.add_parser("info", help="what a cache holds, how far it got")
    info.add_argument("directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[features] %(message)s")
    try:
        return _build_main(args) if args.command == "build" else _info_main(args)
    except (TrainConfigError, FeatureCacheError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
