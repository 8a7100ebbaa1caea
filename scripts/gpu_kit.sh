#!/usr/bin/env bash
# Prepare .gpu-kit/ (ignored by git): what a GPU machine with no network needs to run ComfyUI 0.33.0 in
# process or as a server, carried with the working tree (`carry: [".gpu-kit"]`, under 52 MiB):
#
#   .gpu-kit/ComfyUI/   the ComfyUI snapshot, without the tokenizer files of text encoders nothing here loads
#   .gpu-kit/ComfyUI-floor/  the same of the floor ComfyUI (0.3.64), where bench/gpu.sh also measures
#   .gpu-kit/wheels/    the ComfyUI requirements that the GPU image lacks (cp312 manylinux wheels)
#   .gpu-kit/avstub/    an import-only stand-in for PyAV (its wheel is too big; video nodes are unusable)
#   .gpu-kit/setup.sh   source it there: installs the wheels into /tmp/site, exports PYTHONPATH,
#                       COMFYUI_PATH and COMFYUI (the snapshot), DM_FLOOR_COMFYUI (the floor's)
#
#   bash scripts/gpu_kit.sh                # from ../shared/ComfyUI-0.33.0 (or COMFYUI_PATH)
#
# comfy-kitchen's wheel holds 235 MB of compiled CUDA/HIP kernels; the kit's copy drops them, so ComfyUI
# uses that package's PyTorch (eager) and Triton code paths instead (same results; only quantised and
# fused kernels are slower). Downloads are cached in ${DM_GPU_KIT_CACHE:-~/.cache/diffusion-merge-gpu-kit}.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${DM_SHARED:-../shared}"
SNAPSHOT="${COMFYUI_PATH:-$SHARED/ComfyUI-0.33.0}"
FLOOR="${DM_FLOOR_COMFYUI:-$SHARED/ComfyUI}"  # 0.3.64, the floor that requires-comfyui states
KIT=.gpu-kit
CACHE="${DM_GPU_KIT_CACHE:-$HOME/.cache/diffusion-merge-gpu-kit}"
LIMIT_MIB=52

version="$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$SNAPSHOT/comfyui_version.py")"
constraints="$SHARED/ci/comfyui-$version-constraints.txt"
[[ -f "$constraints" ]] || { echo "no pinned versions for ComfyUI $version ($constraints)" >&2; exit 1; }
pinned() { grep -iE "^${1//[-_]/[-_]}==" "$constraints" | head -1 || true; }  # "kornia-rs" finds "kornia_rs==…"

[[ -d "$KIT" ]] && chmod -R u+w "$KIT"  # copied from read-only snapshots
rm -rf "$KIT"
mkdir -p "$KIT/wheels" "$CACHE"

# 1. the snapshot, and the floor ComfyUI that bench/gpu.sh also measures on, minus tokenizer data of text
#    encoders nothing here loads (SD1's CLIP stays)
copy_snapshot() {
python3 - "$1" "$2" <<'EOF'
import shutil, sys
from pathlib import Path
source, target = Path(sys.argv[1]), Path(sys.argv[2])
keep = {"sd1_tokenizer"}
def ignore(folder, names):
    skipped = {n for n in names if n in {"__pycache__", ".git", ".github", "tests", "tests-unit"}}
    if Path(folder).name == "text_encoders":
        skipped |= {n for n in names if (n.endswith("_tokenizer") or n.endswith("_tokenizer.json")) and n not in keep}
    return skipped
shutil.copytree(source, target, ignore=ignore)
EOF
}
copy_snapshot "$SNAPSHOT" "$KIT/ComfyUI"
if [[ -f "$FLOOR/main.py" ]]; then copy_snapshot "$FLOOR" "$KIT/ComfyUI-floor"; fi

# 2. wheels: the ones beside ../shared/gpu/setup.sh (0.3.64's needs), plus what 0.33.0 added
cp "$SHARED"/gpu/wheels/*.whl "$KIT/wheels/"
for name in comfy-aimdo blake3 simpleeval kornia kornia-rs comfy-kitchen; do
    spec="$(pinned "$name")"
    [[ -n "$spec" ]] || { echo "$name is not pinned in $constraints" >&2; exit 1; }
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$CACHE" "$spec" 2>&1 | grep -v "is ignored: it is neither" || true
done
for name in comfy_aimdo blake3 simpleeval kornia kornia_rs; do
    spec="$(pinned "${name//_/-}")"
    cp "$CACHE/${name}-${spec#*==}-"*.whl "$KIT/wheels/"
done
kitchen="$(pinned comfy-kitchen)"
python3 - "$CACHE"/comfy_kitchen-"${kitchen#*==}"-*.whl "$KIT/wheels" <<'EOF'
import sys, zipfile
from pathlib import Path
source, folder = Path(sys.argv[1]), Path(sys.argv[2])
dropped = ("comfy_kitchen/backends/cuda/_C.", "comfy_kitchen/backends/hip/_C.")
with zipfile.ZipFile(source) as wheel, zipfile.ZipFile(folder / source.name, "w", zipfile.ZIP_DEFLATED) as slim:
    for item in wheel.infolist():
        if item.filename.startswith(dropped):
            continue
        data = wheel.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not line.startswith(dropped)).encode()
        slim.writestr(item, data)
EOF

# 3. PyAV stand-in (../shared/gpu/avstub covers 0.3.64; this one also what 0.33.0 imports)
cp -r scripts/gpu_kit_files/avstub "$KIT/avstub"
chmod -R u+w "$KIT"

# 4. the setup to source on the GPU machine
cat > "$KIT/setup.sh" <<'EOF'
# Source on the GPU machine (Python 3.12 + CUDA torch preinstalled, no network), from any folder:
#   source .gpu-kit/setup.sh && python3 your_script.py
# Installs the kit's wheels into /tmp/site and exports PYTHONPATH (those + the PyAV stand-in), COMFYUI_PATH
# and COMFYUI (the kit's ComfyUI snapshot).
DM_GPU_KIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export COMFYUI_PATH="$DM_GPU_KIT/ComfyUI" COMFYUI="$DM_GPU_KIT/ComfyUI" DM_FLOOR_COMFYUI="$DM_GPU_KIT/ComfyUI-floor"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$DM_GPU_KIT"/wheels/*.whl || return 1
export PYTHONPATH="/tmp/site:$DM_GPU_KIT/avstub${PYTHONPATH:+:$PYTHONPATH}"
EOF

size_kib="$(du -sk "$KIT" | cut -f1)"
echo "wrote $KIT: $((size_kib / 1024)) MiB (ComfyUI $version, $(ls "$KIT/wheels" | wc -l) wheels)"
if (( size_kib > LIMIT_MIB * 1024 )); then
    echo "the kit is over $LIMIT_MIB MiB: the working tree that travels to the GPU machine is capped at 64 MiB" >&2
    exit 1
fi
