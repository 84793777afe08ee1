#!/usr/bin/env bash
# Run the checks: setup (idempotent), ruff, pytest. Extra args go to pytest:
# `bash scripts/test.sh -m 'not e2e'` is the fast tier (no engine, a few minutes).
# The slowest tests are listed at the end, to keep an eye on CI's time limit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

echo "[test] ruff check ."
.venv/bin/ruff check .

echo "[test] pytest $*"
rc=0
.venv/bin/python -m pytest -x -q -p no:cacheprovider --durations=20 "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "[test] pytest collected no tests; an empty suite counts as a failure" >&2
fi
exit "$rc"
