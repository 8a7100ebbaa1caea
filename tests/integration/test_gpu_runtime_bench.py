"""The GPU runtime benchmark's CPU dry run: every section runs through real ComfyUI and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]


def test_gpu_runtime_dry_run_measures_every_configuration(tmp_path, comfyui_install):
    env = {**os.environ, "COMFYUI_PATH": str(comfyui_install[0]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(PACK_ROOT / "bench" / "gpu_runtime.py"), "--dry-run", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=PACK_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_runtime.json").read_text())
    assert results["dry_run"] and not results["model"]["is_sd15_size"]

    routing = results["routing"]["configurations"]
    assert set(routing) >= {"plain", "routed_ab_resident", "routed_ab_exact", "routed_ab_sequential", "split_ab"}
    assert set(routing) >= {"routed_clone_resident", "routed_clone_sequential", "split_clone"}
    assert all({"best_s", "vs_plain_pct", "cold_peak_vram_gib"} <= set(row) for row in routing.values())
    assert results["routing"]["routed_clone_output_finite"]
    assert results["routing"]["clone_weight_set"]["weights_computed"] > 0  # the resident set was made

    for count in ("2", "3"):
        superdiff = results["superdiff"]["by_components"][count]["configurations"]
        assert set(superdiff) == {"batched_call", "superdiff_or", "superdiff_and"}
        assert all({"ms_per_step", "vs_batched_call"} <= set(row) for row in superdiff.values())

    training = results["training"]["configurations"]
    ours = ("ours_plain", "ours_consistency", "ours_consistency_projection", "ours_checkpointing")
    # timings on a shared CPU say nothing (a difference of two tiny runs can even be negative): only that each ran
    assert all(isinstance(training[name]["s_per_step"], float) for name in ours)
    for name in ("core_plain", "core_checkpointing"):  # measured, or skipped for a TrainLoraNode API it names
        assert isinstance(training[name].get("s_per_step"), float) or "TrainLoraNode" in training[name]["skipped"]
    assert "| routing | plain |" in done.stdout  # the printed table
