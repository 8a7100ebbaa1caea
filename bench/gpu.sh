#!/usr/bin/env bash
# Every GPU figure of the pack in ONE call on a lent GPU machine (issue 17), plus the feature check on the newest
# ComfyUI (issue 13). Results land in $OUT (else ./gpu-results): gpu_merge.json, gpu_runtime_floor.json,
# gpu_runtime.json, gpu_check.json with its two server logs, and gpu.log (everything printed; the device tool
# brings back at most 8 files).
#
#   bash scripts/gpu_kit.sh            # here, once: .gpu-kit/ (ComfyUI 0.33.0 + the floor 0.3.64, wheels)
#   bash bench/gpu.sh                  # there, with .gpu-kit carried: merge, runtime_floor, check (≈ 9 min, H200)
#   bash bench/gpu.sh --parts runtime  # a subset of: merge, runtime_floor (0.3.64), runtime (0.33.0), check
#   bash bench/gpu.sh --dry-run        # on the CPU with tiny sizes, this machine's venv and ../shared
#
# The parts run one after the other; a part that fails is reported and the others still run (exit status 1).
set -uo pipefail
cd "$(dirname "$0")/.."
parts="merge,runtime_floor,check"  # ≈ 9 minutes: one device call of at most 10
dry=()
while (( $# )); do
    case "$1" in
        --dry-run) dry=(--dry-run) ;;
        --parts) parts="$2"; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

if (( ${#dry[@]} )); then
    python="${VENV:-.venv-0.3.64}/bin/python"
    [[ -x "$python" ]] || python="$(command -v python3)"
    newest="${COMFYUI_PATH:-../shared/ComfyUI-0.33.0}"
    floor="${DM_FLOOR_COMFYUI:-../shared/ComfyUI}"
    export OMP_NUM_THREADS=1
else
    source .gpu-kit/setup.sh || { echo "no .gpu-kit/: run 'bash scripts/gpu_kit.sh' here and carry .gpu-kit" >&2; exit 1; }
    python=python3
    newest="$COMFYUI_PATH"
    floor="$DM_FLOOR_COMFYUI"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee -a "$out/gpu.log"
fi

failed=()
part() {  # part NAME COMMAND...: run it, keep its whole output in gpu.log, show its end, remember a failure
    local name="$1"; shift
    [[ ",$parts," == *",$name,"* ]] || return 0
    local started=$SECONDS status
    echo "== $name: $*" | tee -a "$out/gpu.log"
    "$@" > "$out/$name.part.log" 2>&1
    status=$?
    cat "$out/$name.part.log" >> "$out/gpu.log"
    tail -n 40 "$out/$name.part.log"
    rm -f "$out/$name.part.log"
    echo "== $name: exit $status after $((SECONDS - started)) s" | tee -a "$out/gpu.log"
    (( status == 0 )) || failed+=("$name")
}

part merge "$python" bench/gpu_merge.py --out "$out" "${dry[@]}"
part runtime_floor env COMFYUI_PATH="$floor" "$python" bench/gpu_runtime.py --out "$out/runtime_floor" "${dry[@]}"
part runtime env COMFYUI_PATH="$newest" "$python" bench/gpu_runtime.py --out "$out/runtime" "${dry[@]}"
part check env COMFYUI_PATH="$newest" "$python" scripts/gpu_check.py --out "$out/gpu_check.json" "${dry[@]}"

# one level of folders at most comes back from the device: flatten the runtime reports
for name in runtime runtime_floor; do
    [[ -f "$out/$name/gpu_runtime.json" ]] && mv "$out/$name/gpu_runtime.json" "$out/gpu_$name.json" && rmdir "$out/$name" 2>/dev/null
done
if (( ${#failed[@]} )); then
    echo "failed parts: ${failed[*]}"
    exit 1
fi
echo "all parts passed; results in $out"
