#!/usr/bin/env bash
# Demo on the default target model. Extra args go to the demo.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
exec .venv/bin/python -m vllm_longspec.demo "$@"
