"""The GPU kit's PyAV stand-in (``scripts/gpu_kit_files/avstub``) lets the ComfyUI under test import its video
types without PyAV, as on a GPU machine where PyAV's wheel cannot travel. Run in a separate process, so the
stand-in never shadows the real PyAV of the test process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
STUB = PACK_ROOT / "scripts" / "gpu_kit_files" / "avstub"

CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
import av
assert av.__file__.startswith(sys.argv[2]), av.__file__  # the stand-in, not PyAV
import comfy_api.latest  # imports ComfyUI's video types, which import PyAV names at module level
from av.video.reformatter import ColorTrc
assert ColorTrc.BT709 is ColorTrc.BT709 and ColorTrc.BT709 is not ColorTrc.SMPTE2084
try:
    av.open("video.mp4")
except ImportError as error:
    print("refused:", error)
"""


def test_comfyui_imports_its_video_types_with_the_pyav_stand_in(comfyui_install):
    comfyui, _ = comfyui_install
    env = {**os.environ, "PYTHONPATH": str(STUB), "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", CHECK, str(comfyui), str(STUB)],
        env=env,
        cwd=comfyui,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "refused: PyAV (av) is not installed" in run.stdout
