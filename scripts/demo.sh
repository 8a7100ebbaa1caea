#!/usr/bin/env bash
# The demo: start ComfyUI on the CPU with this pack loaded, run every example workflow with the tiny
# built-in demo model, print a summary and write demo_out/summary.json. Exits non-zero if a workflow fails
# or a node of the pack is missing. Everything ComfyUI writes goes to demo_out/ (user, input, output, temp,
# comfyui.log); the ComfyUI checkout is not touched.
#
#   bash scripts/demo.sh                  # run the examples, then stop the server
#   bash scripts/demo.sh --serve          # ... then keep the UI running at http://127.0.0.1:8188
#   bash scripts/demo.sh --serve --port 8190
#
# ComfyUI is $COMFYUI_PATH, else the ComfyUI this pack sits in (custom_nodes/), else ../shared/ComfyUI.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONDONTWRITEBYTECODE=1
exec "$VENV/bin/python" scripts/run_examples.py --comfyui "$COMFYUI_PATH" "$@"
