#!/usr/bin/env bash
# The GPU check in one command, on a GPU machine with no network (see scripts/gpu_check.py for what it does):
#
#   bash scripts/gpu_kit.sh          # here, once: prepares .gpu-kit/ (ComfyUI 0.33.0, wheels, setup)
#   bash scripts/gpu_check.sh        # there, with .gpu-kit carried: report in $OUT (else the current folder)
#
# Writes gpu_check.json, gpu_check.log and both servers' logs; exits 1 if a feature failed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -f .gpu-kit/setup.sh ]]; then
    echo "no .gpu-kit/: run 'bash scripts/gpu_kit.sh' where ../shared exists, and carry .gpu-kit" >&2
    exit 1
fi
source .gpu-kit/setup.sh
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
out="${OUT:-.}"
mkdir -p "$out"
python3 scripts/gpu_check.py --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
