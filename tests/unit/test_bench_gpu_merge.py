"""bench/gpu_merge.py (run by the lead on a GPU machine) works: its CPU dry run with tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_merge_benchmark_dry_run_produces_every_figure(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        str(ROOT / "bench" / "gpu_merge.py"),
        "--dry-run",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "gpu_merge.json").read_text())
    expected = {"weighted", "ties_global", "ties_per_tensor", "dare", "las", "plain_ties_sampled_quantile"}
    assert set(result["cases"]) == expected
    assert all(case["best_s"] > 0 for case in result["cases"].values())
    assert set(result["drm"]) == {"drm_auto", "drm_vertical"}
    assert all(run["complete"] and run["extrapolated_s"] > 0 for run in result["drm"].values())
    checks = result["checks"]["all"]
    assert checks["global_radix_select_equals_topk"] and checks["segment_select_equals_topk"]
    assert all(checks[name]["bit_identical"] for name in ("weighted", "ties_global", "dare", "las", "drm_auto"))
    assert {"copy_GBps", "index_add_2e19_bins_16M_ms", "eigh_fp64_64_ms"} <= set(result["micro"]["all"])
