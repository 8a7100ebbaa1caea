#!/usr/bin/env bash
# Create (or reuse) the virtual environment for one ComfyUI: its requirements pinned to the versions CI uses
# (../shared/ci/comfyui-<version>-constraints.txt when there is one for that release), torch 2.14.1 (pip takes
# it from the machine's local wheels where it has them, else the CUDA build from PyPI, several GB), plus pytest,
# ruff, mypy (pinned here: the CI constraints do not list it) and playwright. Sourced by test.sh and demo.sh.
#
# In:  COMFYUI_PATH  the ComfyUI checkout (default: the one this pack sits in as custom_nodes/<pack>, else the
#                    newest snapshot beside the project, ../shared/ComfyUI-0.33.0)
#      VENV          the environment (default: .venv-<ComfyUI version> in the pack root). One you made yourself
#                    (no stamp of ours inside) is used as it is, never installed into.
# Out: COMFYUI_PATH, VENV, COMFYUI_VERSION exported.
set -euo pipefail

PACK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="$PACK_ROOT/../shared"
if [[ -z "${COMFYUI_PATH:-}" ]]; then
    if [[ "$(basename "$(dirname "$PACK_ROOT")")" == "custom_nodes" ]]; then
        COMFYUI_PATH="$(dirname "$(dirname "$PACK_ROOT")")"
    else
        COMFYUI_PATH="$SHARED/ComfyUI-0.33.0"
    fi
fi
if [[ ! -f "$COMFYUI_PATH/main.py" ]]; then
    echo "ComfyUI not found at '$COMFYUI_PATH': set COMFYUI_PATH to a ComfyUI checkout" >&2
    exit 1
fi
COMFYUI_PATH="$(cd "$COMFYUI_PATH" && pwd)"
COMFYUI_VERSION="$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$COMFYUI_PATH/comfyui_version.py" 2>/dev/null || true)"
COMFYUI_VERSION="${COMFYUI_VERSION:-unknown}"
export COMFYUI_PATH COMFYUI_VERSION

CONSTRAINTS="$SHARED/ci/comfyui-$COMFYUI_VERSION-constraints.txt"
packages=(torch==2.14.1 torchvision==0.29.1 -r "$COMFYUI_PATH/requirements.txt" requests pytest ruff mypy==2.4.1 playwright)
constraint_args=()
[[ -f "$CONSTRAINTS" ]] && constraint_args=(-c "$CONSTRAINTS")
stamp="$(cat "$COMFYUI_PATH/requirements.txt" "$CONSTRAINTS" 2>/dev/null | sha256sum | cut -c1-16)-${packages[*]}"

if [[ -n "${VENV:-}" && -x "$VENV/bin/python" && ! -f "$VENV/.dm-stamp" ]]; then
    echo "using $VENV as it is (made outside these scripts) for ComfyUI $COMFYUI_VERSION"
else
    VENV="${VENV:-$PACK_ROOT/.venv-$COMFYUI_VERSION}"
    if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.dm-stamp" 2>/dev/null)" != "$stamp" ]]; then
        echo "setting up $VENV for ComfyUI $COMFYUI_VERSION (a few minutes on first run)"
        [[ -f "$CONSTRAINTS" ]] || echo "no pinned versions for ComfyUI $COMFYUI_VERSION: installing the newest allowed"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -qq --disable-pip-version-check "${packages[@]}" "${constraint_args[@]}"
        echo "$stamp" > "$VENV/.dm-stamp"
    fi
fi
export VENV
