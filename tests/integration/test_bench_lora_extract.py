"""The LoRA-extraction benchmark's dry run (tiny shapes, in process): every configuration runs, ours keeps the
optimal error at every backend, and core's clamped factors are never better than the truncated SVD."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_lora_extract.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_lora_extract", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_measures_every_configuration(bench, comfyui, tmp_path):
    result = bench.main(["--dry-run", "--work-dir", str(tmp_path), "--results", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(result))
    runs = {(run["backend"], run["rank"]): run for run in result["runs"]}
    assert set(runs) == {(b, r) for b in ("gram", "svd", "lowrank", "core") for r in (2, 4)}
    for rank in (2, 4):
        optimal = runs[("svd", rank)]["relative_error"]
        assert runs[("gram", rank)]["relative_error"] == pytest.approx(optimal, rel=1e-3)
        assert runs[("svd", rank)]["reported_relative_error"] == pytest.approx(optimal, rel=1e-2)
        assert runs[("core", rank)]["relative_error"] >= optimal * (1 - 1e-3)
    assert runs[("svd", 4)]["relative_error"] < runs[("svd", 2)]["relative_error"]
    assert "| 4 | ours, gram |" in bench.table(result)
