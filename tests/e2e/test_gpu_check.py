"""The GPU check's dry run (``scripts/gpu_check.py --dry-run``): tiny models on the CPU, two real servers
(as users start ComfyUI, and with the classic loader where ComfyUI has that flag), every feature compared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

PACK_ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_samples_every_feature_on_both_loaders(tmp_path, comfyui_install):
    comfyui, _ = comfyui_install
    report_path = tmp_path / "report.json"
    env = {**os.environ, "COMFYUI_PATH": str(comfyui), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, str(PACK_ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(report_path)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert report_path.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    failed = {name: (f["status"], f["error"][:500]) for name, f in report["features"].items() if f["status"] != "ok"}
    assert not failed and report["passed"] and run.returncode == 0, failed or run.stdout[-3000:]
    assert set(report["features"]) >= {"task_vector", "superdiff_or", "superdiff_and", "training", "streaming_save"}
    assert report["features"]["streaming_save"]["numbers"]["unet_keys_saved"] > 0
    assert report["features"]["task_vector"]["numbers"]["max_abs_feature_effect"] > 0  # τ changes the sample
    has_flag = '"--disable-dynamic-vram"' in (comfyui / "comfy" / "cli_args.py").read_text()
    assert ("--disable-dynamic-vram" in report["servers"]["classic"]["flags"]) == has_flag
    assert report_path.with_name("report_dynamic_server.log").is_file()
