#!/usr/bin/env bash
# The test command: set up the venv if needed, then lint, format check and the whole test suite
# (unit, integration against ComfyUI in process, e2e against a real ComfyUI server and in its frontend
# in headless Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh
source scripts/setup_browser.sh   # chromium + Playwright for tests/e2e/test_browser.py
source scripts/setup_dataset.sh   # Fashion-MNIST for the mini family's training and metrics tests

export OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/python" scripts/build_workflows.py --check   # shipped example workflows match the node definitions
"$VENV/bin/python" -m pytest "$@"
