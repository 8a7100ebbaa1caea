"""Benchmark: every merge method on SDXL-size task vectors resident on a GPU, in one short run (issue 17).

Three task vectors with the SDXL UNet's 1680 keys (2.57 B parameters each, fp16) are generated on the device,
and ``merging.iter_merged(device="cuda")`` is drained for each method, timed with the device synchronised
(median and best of a few runs after a warm-up)::

    python3 bench/gpu_merge.py --out "$OUT"          # on the GPU machine: ≈ 1–2 minutes on an H200
    python3 bench/gpu_merge.py --dry-run --out /tmp/gm   # CPU, tiny shapes, seconds (tests run this)

Cases: weighted sum, TIES k = 0.2 with the whole-model top-k and per tensor, DARE p = 0.9, LaS k = 0.2, and
a *plain per-key torch TIES* for reference (each task's threshold from ``torch.quantile`` of a strided 2²⁴-entry
sample, then one stack / trim / elect / mean per key — approximate, what a straightforward script does).
DRM (drop rate 0.8, auto and vertical) is timed on one key per distinct 2-D shape plus all other keys once,
and extrapolated to the full model per shape (the JSON says so). Besides the timings the run records:

* checks — CUDA against the CPU on a reduced model for every method (max relative difference), the exact
  thresholds (global radix select and per-segment select) against ``torch.topk`` on the device, and DRM's
  ranks and trims against the CPU's on small random weights;
* micro-benchmarks that say where time can still go: device-to-device copy bandwidth, a 2¹⁹-bin histogram
  by ``index_add_`` and by ``bincount`` (which synchronises), one fp64 ``eigh`` of 1280² and 3840².

Writes ``gpu_merge.json`` into ``--out`` and prints a table. Needs only this repository and torch.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sdxl_shapes import load_shapes  # noqa: E402

import merging  # noqa: E402
from merging import drm as drm_module  # noqa: E402
from merging.chunks import Scratch  # noqa: E402
from merging.topk import kth_largest_in_segments, kth_largest_magnitude  # noqa: E402

GIB = 1024**3
WEIGHTS = [0.5, 0.3, 0.2]
CASES = {  # name: (method, parameters, goal in seconds on the H200)
    "weighted": ("weighted", {"weights": WEIGHTS}, 0.05),
    "ties_global": ("ties", {"k": 0.2}, 0.15),
    "ties_per_tensor": ("ties", {"k": 0.2, "topk_scope": "per_tensor"}, 0.15),
    "dare": ("dare", {"p": 0.9, "seed": 0}, 0.15),
    "las": ("las", {"k": 0.2}, 0.15),
}
BEFORE_H200 = {  # the figures (the pack before these fixes), same inputs
    "weighted": 0.13,
    "ties_global": 0.605,
    "ties_per_tensor": 16.3,
    "dare": 0.64,
    "las": 0.54,
    "plain_ties_sampled_quantile": 0.76,
    "drm_auto": 106.0,
    "drm_vertical": 178.0,
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device, repeats: int, budget_s: float) -> dict:
    """Warm-up once, then up to ``repeats`` timed runs (fewer when a run is slow); wall seconds, synchronised."""
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    runs = [time.perf_counter() - started]  # the warm-up, reported separately
    times = []
    while len(times) < repeats and sum(times) + runs[0] < budget_s:
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    times = times or runs
    return {"best_s": min(times), "median_s": statistics.median(times), "runs_s": times, "warmup_s": runs[0]}


def peak_memory(device: torch.device, function: Callable[[], object]) -> float | None:
    if device.type != "cuda":
        function()
        return None
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    function()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / GIB


def task_vectors(shapes: dict, count: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """Random τ per key: N(0, (0.01/√fan_in)²) for weights, N(0, 0.001²) for 1-D keys (fp16, like real deltas)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    vectors = []
    for _ in range(count):
        vector = {}
        for key, shape in shapes.items():
            scale = 0.01 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 0.001
            values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            vector[key] = values.mul_(scale).to(dtype)
        vectors.append(vector)
    return vectors


def drain(vectors: list[dict], method: str, params: dict, device: torch.device) -> None:
    for _key, _delta in merging.iter_merged(vectors, method, device=device, **params):
        pass


def plain_ties(vectors: list[dict], k: float, device: torch.device) -> None:
    """Reference: what a straightforward per-key torch TIES does (sampled global threshold, then key by key)."""
    keys = list(vectors[0])
    total = sum(vectors[0][key].numel() for key in keys)
    stride = max(1, total // (1 << 24))
    thresholds = []
    for vector in vectors:
        sample = torch.cat([vector[key].reshape(-1)[::stride].float().abs() for key in keys])
        thresholds.append(torch.quantile(sample[: 1 << 24], 1.0 - k))
    thresholds = torch.stack(thresholds).view(-1, 1)
    for key in keys:
        stack = torch.stack([vector[key].reshape(-1).float() for vector in vectors])
        stack = stack * (stack.abs() >= thresholds)
        elected = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(stack) == elected) & (stack != 0)
        _merged = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)


def one_key_per_linear_shape(shapes: dict) -> dict:
    chosen = {}
    for key, shape in shapes.items():
        if drm_module.is_linear(key, shape, conv=False):
            chosen.setdefault(tuple(shape), key)
    return {key: shapes[key] for key in chosen.values()}


def bench_drm(vectors: list[dict], shapes: dict, device: torch.device, direction: str, budget_s: float) -> dict:
    """Each distinct 2-D shape's merge timed once (after a warm-up of the same shape), the other keys once
    together; the full model's time extrapolated as Σ over 2-D keys of their shape's time + the rest."""
    linear = one_key_per_linear_shape(shapes)
    per_shape = {}
    started = time.perf_counter()
    for key, shape in linear.items():
        subset = [{key: vector[key]} for vector in vectors]
        result = timed(lambda s=subset: drain(s, "drm", {"direction": direction}, device), device, 1, math.inf)
        per_shape[str(list(shape))] = {"key": key, "seconds": result["best_s"]}
        if time.perf_counter() - started > budget_s:
            break
    others = [k for k, s in shapes.items() if not drm_module.is_linear(k, s, conv=False)]
    rest = [{key: vector[key] for key in others} for vector in vectors]
    rest_time = timed(lambda: drain(rest, "drm", {"direction": direction}, device), device, 1, math.inf)["best_s"]
    counts: dict[str, int] = {}
    for key, shape in shapes.items():
        if drm_module.is_linear(key, shape, conv=False):
            counts[str(list(shape))] = counts.get(str(list(shape)), 0) + 1
    complete = all(shape in per_shape for shape in counts)
    linear_total = sum(per_shape[s]["seconds"] * n for s, n in counts.items() if s in per_shape)
    return {
        "measured": "one key per distinct 2-D shape (timed after a warm-up of the same shape) + all other keys "
        "once; full model extrapolated as sum over 2-D keys of their shape's time + the other keys' time",
        "per_shape": {s: {**v, "keys_of_this_shape": counts[s]} for s, v in per_shape.items()},
        "other_keys": len(others),
        "other_keys_s": rest_time,
        "extrapolated_s": linear_total + rest_time if complete else None,
        "complete": complete,
    }


def reduced(shapes: dict, divisor: int) -> dict:
    """The same keys with every dimension divided (at least 1): a small model with the real structure."""
    return {key: tuple(max(1, d // divisor) for d in shape) for key, shape in shapes.items()}


def checks(shapes: dict, device: torch.device) -> dict:
    """Device results against the CPU's on a reduced model, and exact selections against torch.topk."""
    report: dict = {}
    small = reduced(shapes, 16)
    cpu_vectors = task_vectors(small, 3, torch.device("cpu"), torch.float16, seed=1)
    device_vectors = [{k: v.to(device) for k, v in vector.items()} for vector in cpu_vectors]
    cases = {**{name: (m, p) for name, (m, p, _) in CASES.items()}, "drm_auto": ("drm", {"direction": "auto"})}
    for name, (method, params) in cases.items():
        on_cpu = merging.merge_task_vectors(cpu_vectors, method, device="cpu", **params)
        on_device = merging.merge_task_vectors(device_vectors, method, device=device, **params)
        worst, equal = 0.0, True
        for key, expected in on_cpu.items():
            got = on_device[key]
            equal &= torch.equal(got, expected)
            scale = float(expected.abs().max()) or 1.0
            worst = max(worst, float((got - expected).abs().max()) / scale)
        report[name] = {"max_abs_diff_over_key_max": worst, "bit_identical": equal}
    generator = torch.Generator(device=device).manual_seed(2)
    values = [torch.randn(3, n, generator=generator, device=device) for n in (1 << 20, 12345, 7, 1 << 16)]
    ranks = [5, 300_000, 1_000_001]
    streamed = kth_largest_magnitude(lambda: (v.clone() for v in values), ranks, device)
    whole = torch.cat(values, dim=1).abs()
    expected = torch.stack([torch.topk(row, rank).values[-1] for row, rank in zip(whole, ranks, strict=True)])
    report["global_radix_select_equals_topk"] = bool(torch.equal(streamed, expected))
    joined = torch.cat(values, dim=1)
    sizes = [v.shape[1] for v in values]
    ids = torch.repeat_interleave(torch.arange(4, dtype=torch.int32, device=device), torch.tensor(sizes, device=device))
    seg_ranks = torch.tensor([[max(1, n // 5) for n in sizes]] * 3, device=device)
    got = kth_largest_in_segments(joined, ids, seg_ranks, Scratch(device))
    expected = torch.stack(
        [
            torch.stack([torch.topk(v[r].abs(), int(seg_ranks[r, s])).values[-1] for r in range(3)])
            for s, v in enumerate(values)
        ],
        dim=1,
    )
    report["segment_select_equals_topk"] = bool(torch.equal(got, expected))
    return report


def micro(device: torch.device, dry_run: bool) -> dict:
    """Ceilings and primitives: copy bandwidth, histogram by index_add_ vs bincount, fp64 eigh."""
    out: dict = {}
    n = (1 << 16) if dry_run else (1 << 29)  # 2 GiB of fp32 on the device
    source = torch.randn(n, device=device)
    target = torch.empty_like(source)
    copy = timed(lambda: target.copy_(source), device, 5, 2.0)
    out["copy_GBps"] = 2 * source.numel() * 4 / copy["median_s"] / 1e9
    bits = source[: 1 << 24 if not dry_run else n].abs().view(torch.int32) >> 12
    hist = torch.zeros(1 << 19, dtype=torch.int64, device=device)
    ones = torch.ones(1, dtype=torch.int64, device=device).expand(bits.numel())
    out["index_add_2e19_bins_16M_ms"] = timed(lambda: hist.index_add_(0, bits, ones), device, 5, 2.0)["median_s"] * 1e3
    out["bincount_2e19_bins_16M_ms"] = (
        timed(lambda: torch.bincount(bits, minlength=1 << 19), device, 5, 2.0)["median_s"] * 1e3
    )
    for size in (64, 128) if dry_run else (1280, 3840):
        matrix = torch.randn(size, size, device=device, dtype=torch.float64)
        gram = matrix @ matrix.T
        out[f"eigh_fp64_{size}_ms"] = timed(lambda g=gram: torch.linalg.eigh(g), device, 2, 3.0)["median_s"] * 1e3
    return out


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / GIB, 1), sms=props.multi_processor_count)
    return info


def table(result: dict) -> str:
    rows = ["| case | best | median | goal | before (issue, H200) | peak extra VRAM |", "|---|---|---|---|---|---|"]
    for name, case in result["cases"].items():
        if "error" in case:
            rows.append(f"| {name} | {case['error']} | | | | |")
            continue
        goal = f"{case['goal_s']} s" if case.get("goal_s") else "—"
        vram = f"{case['peak_vram_gib']:.2f} GiB" if case.get("peak_vram_gib") is not None else "—"
        before = BEFORE_H200.get(name)
        rows.append(
            f"| {name} | {case['best_s']:.3f} s | {case['median_s']:.3f} s | {goal} | "
            f"{f'{before} s' if before else '—'} | {vram} |"
        )
    for name, run in result["drm"].items():
        if "error" in run:
            rows.append(f"| {name} | {run['error']} | | | | |")
            continue
        estimate = run["extrapolated_s"]
        rows.append(
            f"| {name} (extrapolated) | {estimate:.1f} s | — | 30 s | {BEFORE_H200.get(name, '—')} s | — |"
            if estimate is not None
            else f"| {name} | incomplete (budget) | — | 30 s | — | — |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_merge.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks that the script runs")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case after the warm-up")
    parser.add_argument("--drm-budget", type=float, default=30.0, help="seconds per DRM direction before stopping")
    options = parser.parse_args()
    device = torch.device("cpu" if options.dry_run else "cuda")
    shapes = load_shapes()
    if options.dry_run:
        shapes = reduced(shapes, 64)
    started = time.perf_counter()
    result = {
        "benchmark": "merges of 3 SDXL-size task vectors resident on the device: iter_merged drained",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device),
        "dry_run": options.dry_run,
        "sizes": {"keys": len(shapes), "parameters_per_task": sum(math.prod(s) for s in shapes.values())},
        "before_h200_s": BEFORE_H200,
        "cases": {},
        "drm": {},
    }
    options.out.mkdir(parents=True, exist_ok=True)
    path = options.out / "gpu_merge.json"

    def save() -> None:
        result["total_s"] = time.perf_counter() - started
        path.write_text(json.dumps(result, indent=1) + "\n")

    def attempt(section: str, name: str, function: Callable[[], object]) -> None:
        """Record a section's result, or its error, and go on: one failure must not cost the whole run."""
        try:
            result[section][name] = function()
        except Exception as error:  # reported in the JSON; the run goes on
            result[section][name] = {"error": f"{type(error).__name__}: {error}"}
        save()

    result.update(checks={}, micro={})
    attempt("checks", "all", lambda: checks(load_shapes() if not options.dry_run else shapes, device))
    attempt("micro", "all", lambda: micro(device, options.dry_run))
    vectors = task_vectors(shapes, 3, device, torch.float16)
    synchronize(device)
    result["sizes"]["generated_s"] = time.perf_counter() - started
    for name, (method, params, goal) in CASES.items():

        def case(m=method, p=params, g=goal) -> dict:
            run = timed(lambda: drain(vectors, m, p, device), device, options.repeats, 12.0)
            run.update(method=m, params=p, goal_s=g)
            run["peak_vram_gib"] = peak_memory(device, lambda: drain(vectors, m, p, device))
            return run

        attempt("cases", name, case)
    attempt(
        "cases",
        "plain_ties_sampled_quantile",
        lambda: {
            **timed(lambda: plain_ties(vectors, 0.2, device), device, min(3, options.repeats), 12.0),
            "method": "reference (see docstring)",
        },
    )
    for direction in ("auto", "vertical"):
        attempt(
            "drm", f"drm_{direction}", lambda d=direction: bench_drm(vectors, shapes, device, d, options.drm_budget)
        )
    print(table(result))
    print(
        json.dumps(
            {"checks": result["checks"]["all"], "micro": result["micro"]["all"], "total_s": result["total_s"]}, indent=1
        )
    )


if __name__ == "__main__":
    main()
