"""Train a draft on a lent GPU machine: pack here, train there, bring the draft back.

The machine the ``device`` tool lends (docs/training.md, "A GPU for a few
minutes") has torch, transformers and triton but no vLLM and no network; a
call carries the working tree and at most 64 MiB in all, a command runs at most
10 minutes, and git-ignored files stay there between calls made within seconds
of each other. The target (257 MB for SmolLM2-135M) therefore travels in parts:

    python -m vllm_longspec.train.gpu_bundle pack --config benchmarks/configs/gpu_finetune.json
        # .gpu_bundle/part-NN + manifest.json, and the device calls to make, in order
    python3 -m vllm_longspec.train.gpu_bundle smoke --out "$OUT"
        # (device, first call) the whole path on cuda with a tiny random target
    python3 -m vllm_longspec.train.gpu_bundle train .gpu_bundle --minutes 7 --out "$OUT"
        # (device, last call) check and unpack the parts, fit the stages to the
        # minutes, train, write the draft, metrics and a summary to $OUT

``pack`` ships the target directory, every file of the config's ``jsonl`` and
``tokens`` sources and any draft (``init_from``, ``draft_vocab``) outside the
repository; ``text`` sources are read where training runs (``{site}/**/*.py``
is the GPU machine's own site-packages). Feature caches do not travel (GBs):
there the target runs live. ``train --minutes`` times three steps of each
stage first, then scales every stage's token budget by one factor (at most 1)
so that the run ends inside the time with its learning-rate schedule complete,
and delivers the draft to ``--out`` after every ``checkpoint_every`` steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

log = logging.getLogger("vllm_longspec.gpu_bundle")

ROOT = Path(__file__).resolve().parents[2]
BUNDLE_DIR = ".gpu_bundle"
MANIFEST = "manifest.json"
PLACEHOLDER = "{bundle}"   # the unpacked bundle's directory, in the packed config
CALL_LIMIT = 64 << 20      # what one device call may carry, the working tree included
CALIBRATION_STEPS = 3      # per stage; the first one warms up
EXPORT_MARGIN_S = 30.0     # kept free at the end for the export and the copy to --out


class BundleError(RuntimeError):
    """A bundle that cannot be packed or trained, with what to do about it."""


# ---- pack (here) -------------------------------------------------------------

def travelling_tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what every device call sends: tracked and untracked, not ignored."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root,
        capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / name.decode()).stat().st_size
               for name in names if name and (root / name.decode()).is_file())


def _travels(path: Path) -> bool:
    """Whether ``path`` goes to the GPU machine with the working tree anyway:
    inside the repository and not git-ignored."""
    try:
        relative = path.resolve().relative_to(ROOT)
    except ValueError:
        return False
    ignored = subprocess.run(["git", "check-ignore", "-q", str(relative)], cwd=ROOT)
    return ignored.returncode == 1


def _bundle_contents(config_path: Path) -> tuple[dict, dict[str, Path]]:
    """The config as it will read on the GPU machine, and the files to ship
    (name in the bundle -> path here)."""
    from vllm_longspec.train.config import load_config
    from vllm_longspec.train.exclusions import ExclusionSet
    from vllm_longspec.train.sources import kept_files
    from vllm_longspec.train.trainer import resolve_target_path

    config = load_config(config_path)
    raw = config.to_dict()
    # excludes match paths here; in the bundle the shipped files have new ones
    exclusions = ExclusionSet.from_config(config.exclude_paths, config.exclude_list_file)
    files: dict[str, Path] = {}
    target = resolve_target_path(config)
    if not (target / "config.json").is_file():
        raise BundleError(f"the target {target} has no config.json (run "
                          "`bash scripts/setup.sh` for the default one).")
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        files[f"target/{path.relative_to(target)}"] = path
    raw["target"] = f"{PLACEHOLDER}/target"
    for key in ("init_from", "draft_vocab"):  # a draft directory or a .npy file
        local = Path(raw[key]).expanduser() if raw[key] else None
        if local is not None and not _travels(local):
            if local.is_file():
                files[f"{key}/{local.name}"] = local
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                files[f"{key}/{local.name}/{path.relative_to(local)}"] = path
            raw[key] = f"{PLACEHOLDER}/{key}/{local.name}"
    stages = zip(config.stages, raw["stages"], strict=True)
    for stage_index, (stage, stage_raw) in enumerate(stages):
        if stage.features:
            raise BundleError(
                f"stage {stage.name!r} trains from a feature cache ({stage.features}): "
                "caches do not travel; drop 'features' so the target runs on the GPU.")
        for source, source_raw in zip(stage.sources, stage_raw["sources"], strict=True):
            if source.type == "text":
                continue  # read on the GPU machine
            shipped = []
            for path in kept_files(source, exclusions):
                bundled = f"data/{stage_index}-{len(files)}-{path.name}"
                files[bundled] = path
                shipped.append(f"{PLACEHOLDER}/{bundled}")
            if not shipped:
                raise BundleError(f"stage {stage.name!r}: no file matches "
                                  f"{list(source.paths)}")
            source_raw.update(paths=shipped, exclude=[])
    raw["device"] = "cuda"
    raw["num_threads"] = None
    return raw, files


def pack(config_path: Path, out: Path, part_bytes: int | None = None) -> dict:
    """Write the bundle's parts and manifest to ``out``; returns the manifest."""
    raw, files = _bundle_contents(config_path)
    if part_bytes is None:
        tree = travelling_tree_bytes()
        part_bytes = CALL_LIMIT - tree - (2 << 20)
        if part_bytes < (4 << 20):
            raise BundleError(f"the working tree alone is {tree / 2**20:.1f} MiB: too "
                              "little of a device call's 64 MiB is left for the parts.")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    whole = out / "bundle.tar"
    with tarfile.open(whole, "w", dereference=True) as tar:
        config_bytes = json.dumps(raw, indent=1).encode()
        info = tarfile.TarInfo("config.json")
        info.size = len(config_bytes)
        tar.addfile(info, fileobj=io.BytesIO(config_bytes))
        for name, path in files.items():
            tar.add(path, arcname=name)
    parts = []
    with whole.open("rb") as stream:
        while chunk := stream.read(part_bytes):
            name = f"part-{len(parts):02d}"
            (out / name).write_bytes(chunk)
            parts.append({"name": name, "bytes": len(chunk),
                          "sha256": hashlib.sha256(chunk).hexdigest()})
    whole.unlink()
    manifest = {"config": str(config_path), "parts": parts,
                "files": {name: path.stat().st_size for name, path in files.items()},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def device_calls(manifest: dict, minutes: float, bundle: str = BUNDLE_DIR) -> list[dict]:
    """The ``run`` calls that carry the parts and train, in order: the first
    runs ``smoke`` (a broken CUDA path costs one short call, not the lease),
    the last trains; the parts wait on the machine in between."""
    module = "PYTHONUNBUFFERED=1 python3 -m vllm_longspec.train.gpu_bundle"
    parts = [f"{bundle}/{part['name']}" for part in manifest["parts"]]
    carries = [[parts[0], f"{bundle}/{MANIFEST}"]] + [[part] for part in parts[1:]]
    if len(carries) == 1:
        carries.append([])
    commands = [f"{module} smoke --out $OUT && ls -l {bundle}"]
    commands += [f"ls -l {bundle}"] * (len(carries) - 2)
    commands.append(f"set -o pipefail; {module} train {bundle} --minutes {minutes:g} "
                    f"--out $OUT 2>&1 | tee $OUT/train.log")
    return [{"carry": carry, "command": command}
            for carry, command in zip(carries, commands, strict=True)]


# ---- train (there) -------------------------------------------------------------

def unpack(bundle: Path) -> Path:
    """Check every part against the manifest and unpack them (once)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    missing, corrupt = [], []
    for part in manifest["parts"]:
        path = bundle / part["name"]
        if not path.is_file():
            missing.append(part["name"])
        elif hashlib.sha256(path.read_bytes()).hexdigest() != part["sha256"]:
            corrupt.append(part["name"])
    if missing or corrupt:
        raise BundleError(
            f"parts missing: {missing or 'none'}, corrupt: {corrupt or 'none'} in "
            f"{bundle}: carry them again (the machine keeps them only while warm).")
    unpacked = bundle / "unpacked"
    marker = unpacked / ".complete"
    if marker.is_file() and marker.read_text() == manifest["created"]:
        return unpacked
    if unpacked.exists():
        shutil.rmtree(unpacked)
    with tempfile.TemporaryFile() as whole:
        for part in manifest["parts"]:
            whole.write((bundle / part["name"]).read_bytes())
        whole.seek(0)
        with tarfile.open(fileobj=whole, mode="r") as tar:
            tar.extractall(unpacked, filter="data")
    marker.write_text(manifest["created"])
    return unpacked


def load_bundle_config(unpacked: Path, output_dir: Path, device: str):
    from vllm_longspec.train.config import config_from_dict

    text = (unpacked / "config.json").read_text()
    raw = json.loads(text.replace(PLACEHOLDER, str(unpacked.resolve())))
    raw.update(output_dir=str(output_dir), device=device)
    return config_from_dict(raw)


def _stage_tokens(stage) -> int:
    return stage.tokens if stage.tokens is not None else stage.steps * stage.batch_tokens


def calibrate(config, scratch: Path) -> tuple[list[float], float]:
    """Seconds per training token of each stage (CALIBRATION_STEPS steps of it
    alone, the first one, a warm-up, not counted), and the seconds the probes
    spent outside their steps (loading the target, indexing sources): an upper
    bound on the real run's set-up."""
    from vllm_longspec.train.trainer import Trainer

    costs, setup = [], 0.0
    for index, stage in enumerate(config.stages):
        probe = dataclasses.replace(stage, steps=CALIBRATION_STEPS, tokens=None)
        out = scratch / f"calibrate-{index}"
        started = time.monotonic()
        trainer = Trainer(config.replace(stages=(probe,), output_dir=str(out),
                                         checkpoint_every=10**9, log_every=1))
        trainer.run(max_steps=CALIBRATION_STEPS)
        wall = time.monotonic() - started
        del trainer
        _empty_device_cache(config.device)
        records = [json.loads(line)
                   for line in (out / "metrics.jsonl").read_text().splitlines()]
        seconds = [r["step_seconds"] for r in records]
        setup += wall - sum(seconds)
        timed = sorted(seconds[1:])
        costs.append(timed[len(timed) // 2] / stage.batch_tokens)
        log.info("stage %s: %.0f training tokens/s", stage.name, 1 / costs[-1])
    return costs, setup


def fit_to_time(config, costs: list[float], seconds: float):
    """The config with every stage's tokens scaled by one factor, at most 1 (the
    config's budgets are the most a run trains), so that the stages take at
    most ``seconds`` at the calibrated costs; at least one step each."""
    planned = sum(_stage_tokens(s) * c for s, c in zip(config.stages, costs, strict=True))
    factor = min(1.0, seconds / planned)
    stages = []
    for stage in config.stages:
        steps = max(1, int(_stage_tokens(stage) * factor // stage.batch_tokens))
        stages.append(dataclasses.replace(stage, steps=steps, tokens=None))
    return config.replace(stages=tuple(stages))


def _empty_device_cache(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def train(bundle: Path, out: Path, minutes: float | None, device: str = "cuda",
          margin_s: float = EXPORT_MARGIN_S) -> dict:
    """Unpack, fit the stages to ``minutes``, train; after every
    ``checkpoint_every`` steps the draft as it stands, the metrics and a summary
    are written to ``out``, so a call cut short still brings a draft back."""
    from vllm_longspec.train.trainer import Trainer

    started = time.monotonic()
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BundleError("no CUDA device here: train with --device cpu, or on a GPU.")
    unpacked = unpack(bundle)
    run_dir = bundle / "run"
    config = load_bundle_config(unpacked, run_dir, device)
    costs, deadline = None, None
    if minutes is not None:
        deadline = started + 60 * minutes - margin_s
        with tempfile.TemporaryDirectory(dir=bundle) as scratch:
            costs, setup = calibrate(config, Path(scratch))
        left = deadline - time.monotonic() - setup
        if left <= 0:
            raise BundleError(f"--minutes {minutes:g} was used up by unpacking and timing.")
        config = fit_to_time(config, costs, 0.95 * left)
    for stage in config.stages:
        log.info("stage %s: %d steps of %d tokens", stage.name, stage.num_steps,
                 stage.batch_tokens)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    trainer = Trainer(config)
    train_started = time.monotonic()
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        draft_dir = trainer.run(max_steps=config.checkpoint_every, max_seconds=left)
        finished = draft_dir is not None
        summary = _deliver(trainer, draft_dir or trainer.export(), out, {
            "device": _device_name(device), "minutes": minutes, "finished": finished,
            "train_seconds": round(time.monotonic() - train_started, 1),
            "stages": [{"name": s.name, "steps": s.num_steps,
                        "batch_tokens": s.batch_tokens} for s in config.stages],
            "calibrated_tokens_per_s": costs and [round(1 / c) for c in costs],
            "wall_seconds": round(time.monotonic() - started, 1)})
        if finished or (deadline is not None and time.monotonic() >= deadline):
            return summary


def _deliver(trainer, draft_dir: Path, out: Path, summary: dict) -> dict:
    """Copy the draft and metrics to ``out`` and write the summary there."""
    summary = {**summary, "steps": trainer.progress.global_step,
               "tokens": trainer.progress.tokens_seen,
               "tokens_per_s": round(trainer.progress.tokens_seen
                                     / max(summary["train_seconds"], 1e-9)),
               "last_loss": trainer.progress.last_loss}
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(draft_dir, out / "draft", dirs_exist_ok=True)
    for name in ("metrics.jsonl", "loss_curve.png"):
        if (trainer.output_dir / name).is_file():
            shutil.copy(trainer.output_dir / name, out / name)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _tiny_run(root: Path) -> Path:
    """A config for a tiny random target with what the real run uses: a draft
    vocabulary, AOI, KL to the whole target distribution, a loss on every
    position, sequences longer than the window, two stages."""
    import numpy as np

    from vllm_longspec.train.tiny_target import save_tiny_llama

    save_tiny_llama(root / "target")
    rng = np.random.default_rng(0)
    np.save(root / "tokens.npy", rng.integers(0, 256, 40_000).astype(np.uint32))
    np.save(root / "vocab.npy", np.arange(0, 256, 2))
    stage = {"name": "aoi", "sources": [{"type": "tokens",
                                         "paths": [str(root / "tokens.npy")]}],
             "seq_len": 256, "batch_tokens": 1024, "grad_accum": 2, "tokens": 8192,
             "loss_on": "all"}
    config = {"target": str(root / "target"), "output_dir": str(root / "unused"),
              "draft_vocab": str(root / "vocab.npy"), "sliding_window": 64,
              "distill_weight": 1.0, "checkpoint_every": 2, "exclude_list_file": None,
              "num_threads": None,
              "stages": [stage, {**stage, "name": "plain", "aoi": False, "seq_len": 512}]}
    (root / "config.json").write_text(json.dumps(config))
    return root / "config.json"


def smoke(out: Path, device: str = "cuda", minutes: float = 0.5) -> dict:
    """The whole path on ``device`` with a tiny random target (no weights to
    carry): pack, unpack, calibrate, fit to ``minutes``, train, deliver; the
    loss must stay finite."""
    import math

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        pack(_tiny_run(root), root / "bundle", part_bytes=256 << 10)
        summary = train(root / "bundle", out, minutes, device, margin_s=2.0)
    if not (summary["last_loss"] is not None and math.isfinite(summary["last_loss"])):
        raise BundleError(f"the smoke run's loss is {summary['last_loss']}")
    return summary


# ---- command line ----------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-longspec gpu-bundle",
                                     description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="write the bundle's parts and print the device calls")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--out", type=Path, default=ROOT / BUNDLE_DIR)
    p.add_argument("--part-mib", type=float,
                   help="size of a part (default: what a call leaves beside the working tree)")
    p.add_argument("--minutes", type=float, default=7.0,
                   help="training time of the last call, as printed")
    t = commands.add_parser("train", help="(GPU machine) unpack, train, write to --out")
    t.add_argument("bundle", type=Path)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--minutes", type=float,
                   help="fit the stages to this many minutes of the call (default: "
                   "the config's budgets, untimed)")
    t.add_argument("--device", default="cuda")
    s = commands.add_parser("smoke", help="(GPU machine) the whole path, tiny random target")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--device", default="cuda")
    s.add_argument("--minutes", type=float, default=0.5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[gpu-bundle] %(message)s")
    try:
        if args.command == "pack":
            part_bytes = None if args.part_mib is None else int(args.part_mib * 2**20)
            manifest = pack(args.config, args.out, part_bytes)
            total = sum(part["bytes"] for part in manifest["parts"])
            print(f"{len(manifest['parts'])} parts, {total / 2**20:.1f} MiB, in {args.out}")
            print("device calls, in order, each within seconds of the last:")
            for index, call in enumerate(device_calls(manifest, args.minutes), 1):
                print(f"  {index}. carry={json.dumps(call['carry'])} "
                      f"command={json.dumps(call['command'])}")
        elif args.command == "train":
            print(json.dumps(train(args.bundle, args.out, args.minutes, args.device),
                             indent=1))
        else:
            print(json.dumps(smoke(args.out, args.device, args.minutes), indent=1))
    except BundleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
