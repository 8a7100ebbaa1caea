"""The Wan routing benchmark's dry run (a subprocess on the CPU): every configuration runs, and the routed euler
output equals the two-KSamplerAdvanced chain's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]


def test_wan_routing_dry_run_measures_every_configuration(tmp_path, comfyui_install):
    env = {**os.environ, "COMFYUI_PATH": str(comfyui_install[0]), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "wan_routing.json"
    command = [sys.executable, str(PACK_ROOT / "bench" / "bench_wan_routing.py"), "--dry-run", "--out", str(out)]
    done = subprocess.run(command, cwd=PACK_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["configurations"]) == {"high_only", "routed_resident", "routed_sequential", "chained"}
    assert all(len(row["all_s"]) == 1 and row["best_s"] > 0 for row in results["configurations"].values())
    consistency = results["consistency"]
    assert consistency["euler_routed_vs_chained_max_abs"] <= 1e-5 * max(1.0, consistency["euler_output_max_abs"])
    assert results["switch_step"] == 3 and results["latent"] == [1, 16, 1, 8, 8]
    assert "| routed_resident |" in done.stdout
