#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment: ComfyUI's requirements pinned to the versions CI
# uses, torch (pip takes it from local wheels when PIP_FIND_LINKS points at them, else the CUDA build from
# PyPI, several GB), plus pytest, ruff and Playwright. Sourced by test.sh and demo.sh; exports COMFYUI_PATH
# and VENV.
set -euo pipefail

PACK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${COMFYUI_PATH:-}" ]]; then
    if [[ "$(basename "$(dirname "$PACK_ROOT")")" == "custom_nodes" ]]; then
        COMFYUI_PATH="$(dirname "$(dirname "$PACK_ROOT")")"
    else
        COMFYUI_PATH="$PACK_ROOT/../shared/ComfyUI"
    fi
fi
if [[ ! -f "$COMFYUI_PATH/main.py" ]]; then
    echo "ComfyUI not found at '$COMFYUI_PATH': set COMFYUI_PATH to a ComfyUI checkout" >&2
    exit 1
fi
COMFYUI_PATH="$(cd "$COMFYUI_PATH" && pwd)"
export COMFYUI_PATH

CONSTRAINTS="$PACK_ROOT/../shared/ci/comfyui-0.3.64-constraints.txt"
VENV="${VENV:-$PACK_ROOT/.venv}"
export VENV
packages=(torch==2.14.1 torchvision==0.29.1 -r "$COMFYUI_PATH/requirements.txt" requests pytest ruff playwright)
constraint_args=()
[[ -f "$CONSTRAINTS" ]] && constraint_args=(-c "$CONSTRAINTS")

stamp="$(cat "$COMFYUI_PATH/requirements.txt" "${CONSTRAINTS}" 2>/dev/null | sha256sum | cut -c1-16)-${packages[*]}"
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.dm-stamp" 2>/dev/null)" != "$stamp" ]]; then
    echo "setting up $VENV (a few minutes on first run)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -qq --disable-pip-version-check "${packages[@]}" "${constraint_args[@]}"
    echo "$stamp" > "$VENV/.dm-stamp"
fi
