#!/usr/bin/env bash
# The test command: for every ComfyUI the pack supports, set up its venv if needed, then lint, format check, type check,
# the example-workflow check and the whole test suite (unit, integration against ComfyUI in process, e2e
# against a real ComfyUI server and in its frontend in headless Chromium).
#
#   bash scripts/test.sh                      # ComfyUI 0.33.0 (newest) and 0.3.64 (the floor), each in its venv
#   bash scripts/test.sh tests/unit -q        # arguments go to pytest, for each ComfyUI
#   COMFYUI_PATH=/path/to/ComfyUI bash scripts/test.sh          # one ComfyUI only (VENV may name its venv)
#   VENV=.venv-0.3.64 bash scripts/test.sh                       # the ComfyUI that venv was made for
#
# With no COMFYUI_PATH, a pack installed in ComfyUI/custom_nodes/ tests that ComfyUI; otherwise the
# snapshots beside the project are tested (../shared/ComfyUI-0.33.0, ../shared/ComfyUI = 0.3.64).
set -euo pipefail
cd "$(dirname "$0")/.."
PACK_ROOT="$(pwd)"

if [[ -n "${VENV:-}" && -z "${COMFYUI_PATH:-}" && -f "$VENV/.dm-stamp" ]]; then
    # a venv made by setup_venv.sh names the ComfyUI it was made for in its stamp
    made_for="$(sed -n 's/.* -r \(.*\)\/requirements\.txt .*/\1/p' "$VENV/.dm-stamp")"
    [[ -f "$made_for/main.py" ]] && COMFYUI_PATH="$made_for"
fi
targets=()
if [[ -n "${COMFYUI_PATH:-}" ]]; then
    targets=("$COMFYUI_PATH")
elif [[ "$(basename "$(dirname "$PACK_ROOT")")" == "custom_nodes" ]]; then
    targets=("$(dirname "$(dirname "$PACK_ROOT")")")
else
    targets=("$PACK_ROOT/../shared/ComfyUI-0.33.0" "$PACK_ROOT/../shared/ComfyUI")
    if [[ -n "${VENV:-}" ]]; then
        echo "VENV names one environment, but two ComfyUI versions are tested: set COMFYUI_PATH too" \
            "(the ComfyUI it was made for)" >&2
        exit 2
    fi
fi

source scripts/setup_browser.sh   # chromium for tests/e2e/test_browser.py (Playwright comes with each venv)
source scripts/setup_dataset.sh   # Fashion-MNIST for the mini family's training and metrics tests

if (( ${#targets[@]} > 1 )); then  # make the missing venvs side by side (mostly unpacking and compiling)
    pids=()
    for index in "${!targets[@]}"; do
        (export COMFYUI_PATH="${targets[$index]}"; source scripts/setup_venv.sh) > "/tmp/dm-setup-venv-$$-$index.log" 2>&1 &
        pids+=($!)
    done
    for index in "${!pids[@]}"; do
        if ! wait "${pids[$index]}"; then
            cat "/tmp/dm-setup-venv-$$-$index.log" >&2
            echo "setting up the venv for ${targets[$index]} failed" >&2
            exit 1
        fi
        cat "/tmp/dm-setup-venv-$$-$index.log"
        rm -f "/tmp/dm-setup-venv-$$-$index.log"
    done
fi
export OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1

# mypy checks merging/ and nodes/ as the package `diffusion_merge` (a link to the pack, whatever its folder is
# called, so the relative imports resolve); settings in pyproject.toml.
typecheck() {
    local root
    root="$(mktemp -d)"
    ln -s "$PACK_ROOT" "$root/diffusion_merge"
    local status=0
    (cd "$root" && "$1/bin/mypy" --config-file "$PACK_ROOT/pyproject.toml" -p diffusion_merge.merging -p diffusion_merge.nodes) ||
        status=$?
    rm -rf "$root"
    return $status
}

linted=""
for target in "${targets[@]}"; do
    (
        export COMFYUI_PATH="$target"
        source scripts/setup_venv.sh
        echo "=== ComfyUI $COMFYUI_VERSION ($COMFYUI_PATH) with $VENV"
        if [[ -z "$linted" ]]; then  # ruff and mypy are pinned to the same release for every ComfyUI: once is enough
            "$VENV/bin/ruff" check .
            "$VENV/bin/ruff" format --check .
            typecheck "$VENV"
        fi
        "$VENV/bin/python" scripts/build_workflows.py --check  # shipped example workflows match the node definitions
        "$VENV/bin/python" -m pytest "$@"
    )
    linted=yes
done
