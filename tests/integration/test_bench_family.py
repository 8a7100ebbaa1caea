"""The mini-family benches (bench/bench_family_*.py) in their --quick mode, in this process on the committed
family: every configuration runs through the pack's real code paths and its numbers, table and sample grid are
written. Only that the benches still run and write sane numbers is checked here, never their results."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from diffusion_merge.merging import family_data

BENCH = Path(__file__).resolve().parents[2] / "bench"
pytestmark = pytest.mark.skipif(
    not family_data.dataset_available(), reason="Fashion-MNIST not installed (bash scripts/setup_dataset.sh)"
)


def bench_module(name: str):
    if name not in sys.modules:
        sys.path.insert(0, str(BENCH))
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_quick(name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    results = bench_module(name).main([*extra, "--quick", "--out", str(out)])
    assert json.loads(out.read_text())["table"] == results["table"]
    assert out.with_suffix(".png").stat().st_size > 0  # the sample grid beside the JSON
    assert results["quick"] and "NOT Inception FID" in results["metric_note"]
    return results


def finite(stat: dict) -> bool:
    return all(math.isfinite(v) for v in stat["values"])


def test_superdiff_or_quick_runs_every_configuration(comfyui, tmp_path):
    results = run_quick("bench_family_superdiff", tmp_path, "or")
    rows = results["configurations"]
    assert {"A", "B", "base", "coin flip A/B", "SuperDiff OR (A, B)", "average κ = ½ (A, B)"} <= set(rows)
    for row in rows.values():
        assert finite(row["cfid"]) and 0 < row["coverage"]["mean"] <= 1
    assert rows["A"]["share_in_A_half"]["mean"] >= 0.5  # A is base fine-tuned on garments 0–4


def test_superdiff_and_quick_runs_every_configuration(comfyui, tmp_path):
    results = run_quick("bench_family_superdiff", tmp_path, "and")
    rows = results["configurations"]
    assert {"joint prompt", "average κ = ½", "SuperDiff AND"} <= set(rows)
    for row in rows.values():
        assert 0 <= row["min_score"]["mean"] <= 1 and 0 <= row["both"]["mean"] <= 1
    assert rows["colour prompt alone"]["colour_right"]["mean"] == 1.0  # colour is what the prompt fixes


def test_merge_quick_runs_every_method(comfyui, tmp_path):
    results = run_quick("bench_family_merge", tmp_path)
    models = results["models"]
    assert len([name for name in models if name.startswith(("TA", "TIES", "DARE", "LaS", "DRM"))]) == 7
    for row in models.values():
        assert finite(row["cfid"]) and finite(row["cfid footwear"])


def test_deme_quick_runs_merge_ensemble_and_plain_lora(comfyui, tmp_path):
    results = run_quick("bench_family_deme", tmp_path)
    names = list(results["models"])
    assert names[0] == "base" and "routed ensemble" in names and any(n.startswith("plain LoRA") for n in names)
    assert results["plain_lora"]["trained_now"] and all(finite(r["cfid"]) for r in results["models"].values())


def test_clts_quick_trains_with_and_without_and_reads_the_curves(comfyui, tmp_path):
    results = run_quick("bench_family_clts", tmp_path)
    assert set(results["summary"]) == {"uniform", "CLTS", "MDLRC", "CLTS + MDLRC"}
    for runs in results["runs"].values():
        assert [step for step, _ in runs[0]["curve"]] == [0, 2, 4]  # base, then every 2 steps
    assert results["summary"]["uniform"]["steps to 100 %"][0] is not None


def test_steps_to_reach_interpolates_the_first_crossing():
    clts = bench_module("bench_family_clts")
    curve = [(0, 100.0), (50, 80.0), (100, 40.0), (150, 60.0)]
    assert clts.steps_to_reach(curve, 60.0) == 75.0
    assert clts.steps_to_reach(curve, 80.0) == 50.0
    assert clts.steps_to_reach(curve, 10.0) is None


def test_clts_targets_are_paired_per_seed():
    clts = bench_module("bench_family_clts")
    uniform = [{"seed": 0, "curve": [(0, 800.0), (20, 100.0)]}, {"seed": 1, "curve": [(0, 900.0), (20, 200.0)]}]
    targets = clts.seed_targets([800.0, 900.0], uniform)
    expected = [{"50 %": 450.0, "90 %": 170.0, "100 %": 100.0}, {"50 %": 550.0, "90 %": 270.0, "100 %": 200.0}]
    assert [pytest.approx(t) for t in targets] == expected
