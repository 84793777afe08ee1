#!/usr/bin/env bash
# The self-distillation data of issue 15 ("distill-v2"): the target's own answers
# to 1k-7k-token prompts cut from local files in several languages (C and C++
# headers, Perl, Tcl, shell, Python, HTML and text documentation), read from
# the machine itself; benchmark documents are excluded by construction
# (benchmarks/sources.txt). Resumable: run it again and it continues after the
# last record written. Runs niced on one thread so that other work keeps a core.
#
#   bash scripts/distill_data.sh            # ~/.cache/vllm-longspec/data/distill-v2.jsonl
#   OUT=... NUM_PROMPTS=... bash scripts/distill_data.sh
#
# Counts and tokens: python -m vllm_longspec.train.data_card OUT (docs/training.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$HOME/.cache/vllm-longspec/data/distill-v2.jsonl}"
NUM_PROMPTS="${NUM_PROMPTS:-6000}"
STDLIB="$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")"
SITE="$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
mkdir -p "$(dirname "$OUT")"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}"
# The job is paused (SIGSTOP) while benchmarks and the test suite run; vLLM's
# engine would otherwise declare its worker dead after 300 s without a step.
export VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS="${VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS:-604800}"
exec nice -n 19 .venv/bin/vllm-longspec distill \
  --sources "/usr/include/**/*.h" "$SITE/torch/include/**/*.h" \
            "/usr/share/perl*/**/*.pm" "/usr/share/**/*.tcl" "/usr/share/**/*.sh" \
            "$STDLIB/**/*.py" "$SITE/**/*.py" "/usr/share/doc/**/*.txt" \
            "/usr/share/**/*.html" "$SITE/**/*.md" \
  --out "$OUT" --num-prompts "$NUM_PROMPTS" \
  --min-prompt-tokens 1024 --max-prompt-tokens 7000 --max-new-tokens 400 \
  --batch-size 32 --seed 2
