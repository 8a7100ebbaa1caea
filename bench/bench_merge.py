"""Benchmark: merge-and-save from files — ours (``merging.merge_checkpoint_files``) against sd-mecha, DRM, Flux.

Three commands (issue 4's benchmark); each prints a markdown table and writes ``bench/results/merge_*.json``::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_merge.py sdxl --repeats 2   # weighted + TIES, ours vs sd-mecha
    .venv/bin/python bench/bench_merge.py drm                                  # DRM on the same SDXL inputs (CPU)
    .venv/bin/python bench/bench_merge.py flux --cleanup                       # TIES of 2 fp8 Flux-dev fine-tunes
    .venv/bin/python bench/bench_merge.py sdxl --keys 40 --threads 1           # quick check, seconds

Inputs are synthetic (``make_synthetic.py``): one base and N fine-tunes (base + 1 % seeded noise, a different
noise seed each) with every key of the SDXL UNet or the FLUX.1-dev transformer, generated into ``--work-dir``
and reused by later runs. Every merge runs in a fresh subprocess with the inputs dropped from the page cache
first; reported are the subprocess's wall time (Python start and imports included), peak RSS (``wait4``'s
``ru_maxrss``), CPU time and bytes read/written (``/proc/self/io``). Both tools' children import the same
modules before merging (torch, this pack's ``merging``; sd-mecha's child adds sd-mecha), and the RSS after
imports is recorded. sd-mecha is imported from ``--sdmecha`` (a ``pip install --target`` folder), never from
the project's venv. A few keys of every output are checked against the merge's equations computed here.
``--library DIR`` runs our children on another copy of ``merging/`` (``DIR/merging``: scratch experiments).
Results are saved after every run, so an interrupted benchmark keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if os.environ.get("DM_BENCH_LIBRARY"):  # --library: a scratch copy of merging/ for our children, imported
    sys.path.insert(0, os.environ["DM_BENCH_LIBRARY"])  # before the helpers below put the repository first
    importlib.import_module("merging")

from bench_task_vector import _io_counters, _memory, drop_from_page_cache, measured_child, threads_environment
from make_synthetic import CHECKPOINT_PREFIX, matches, select_keys, write_synthetic
from sdxl_shapes import SHAPES_PATH as SDXL_SHAPES
from sdxl_shapes import load_shapes

import merging
from merging.io import DTYPE_NAMES, SafetensorsFile, parse_dtype

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
FLUX_SHAPES = ROOT / "bench" / "flux_unet_shapes.json"
GIB = 1024**3
WEIGHTS = (0.5, 0.3, 0.2)
TIES_K = 0.2
VERIFIED_KEYS = 8

# (tool, method, our parameters) for each SDXL configuration; sd-mecha builds its own recipe (mecha_recipe)
SDXL_CASES = {
    "weighted": [("ours", "weighted", {"weights": list(WEIGHTS)}), ("sd-mecha", "weighted", {})],
    "ties": [("ours", "ties", {"k": TIES_K}), ("sd-mecha", "ties", {})],
    "ties-per-tensor": [("ours", "ties", {"k": TIES_K, "topk_scope": "per_tensor"})],
}


# -- the measured children ------------------------------------------------------------------------------


def child_ours(base: str, finetuned: list[str], out: str, method: str, params: dict, dtype: str) -> dict:
    """Runs in the subprocess: one ``merging.merge_checkpoint_files`` call."""
    stages = {"after_import": _memory()}
    started = time.perf_counter()
    merging.merge_checkpoint_files(base, finetuned, out, method, dtype=dtype, **params)
    return {"merge_s": time.perf_counter() - started, "memory_kib": {**stages, "end": _memory()}}


def child_drm(base: str, finetuned: list[str], out: str, method: str, params: dict, dtype: str) -> dict:
    """Like :func:`child_ours`, also timing each SVD-branch matrix (``merging.drm.merge_matrix`` calls)."""
    import merging.drm

    timings = []
    inner = merging.drm.merge_matrix

    def timed(deltas: torch.Tensor, **kwargs):
        started = time.perf_counter()
        result = inner(deltas, **kwargs)
        timings.append([list(deltas.shape[1:]), time.perf_counter() - started])
        return result

    merging.drm.merge_matrix = timed
    report = child_ours(base, finetuned, out, method, params, dtype)
    return {**report, "matrix_s": timings}


def child_mecha(base: str, finetuned: list[str], out: str, method: str, params: dict, dtype: str) -> dict:
    """Runs in the subprocess: the same merge expressed with sd-mecha's API, fp32 merge, ``dtype`` output."""
    import sd_mecha
    from tqdm import tqdm

    stages = {"after_import": _memory()}
    started = time.perf_counter()
    recipe = mecha_recipe(sd_mecha, base, finetuned, method)
    quiet = lambda *args, **kwargs: tqdm(*args, **{**kwargs, "disable": True})  # noqa: E731
    sd_mecha.merge(recipe, output=out, merge_dtype=torch.float32, output_dtype=parse_dtype(dtype), tqdm=quiet)
    report = {"merge_s": time.perf_counter() - started, "memory_kib": {**stages, "end": _memory()}}
    return {**report, "sd_mecha": sd_mecha_version()}


def mecha_recipe(sd_mecha, base: str, finetuned: list[str], method: str):
    """θ₀ + Σ wᵢ(θᵢ − θ₀) (chained ``add_difference``) or θ₀ + ties_sum(θᵢ − θ₀; k, sign by mass).

    The raw ``add_difference`` merge method is used: sd-mecha's public ``add_difference`` wrapper raises
    AttributeError on plain model nodes (merge spaces compared before they are resolved; 1.1.5–1.1.8).
    """
    from sd_mecha.extensions.builtin.merge_methods import linear

    base_node = sd_mecha.model(base)
    deltas = [sd_mecha.subtract(sd_mecha.model(path), base_node) for path in finetuned]
    if method == "weighted":
        merged = base_node
        for weight, delta in zip(WEIGHTS, deltas, strict=True):
            merged = linear.add_difference(merged, delta, alpha=weight)
        return merged
    return linear.add_difference(base_node, sd_mecha.ties_sum(*deltas, k=TIES_K, vote_sgn=True), alpha=1.0)


def sd_mecha_version() -> str:
    from importlib.metadata import version

    return version("sd-mecha")


CHILDREN = {"ours": child_ours, "sd-mecha": child_mecha, "drm": child_drm}


def run_child(kind: str, arguments: dict) -> None:
    """Entry point of a measured subprocess: run, then print the report (with I/O counters) as JSON."""
    report = CHILDREN[kind](**arguments)
    report.update(torch_threads=torch.get_num_threads(), io=_io_counters())
    print(json.dumps(report))


# -- inputs ---------------------------------------------------------------------------------------------


def ensure_inputs(
    work_dir: Path, model: str, shapes: dict, finetunes: int, dtype: torch.dtype, relative_delta: float
) -> dict:
    """Base + ``finetunes`` fine-tunes (noise seeds 1…N) in ``work_dir``, generated unless already there."""
    work_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{model}_{{}}_{len(shapes)}keys_{DTYPE_NAMES[dtype].lower()}.safetensors"
    plan = [("base", "base", 0)] + [(f"ft{i}", "finetuned", i) for i in range(1, finetunes + 1)]
    made = {}
    for name, variant, noise_seed in plan:
        path = work_dir / stem.format(name)
        recipe = {"noise_seed": noise_seed, "dtype": dtype}
        if matches(path, shapes, variant, 0, relative_delta, **recipe):
            logger.info("reusing %s", path)
            made[name] = {"path": str(path), "generated_s": None}
            continue
        logger.info("generating %s …", path)
        started = time.perf_counter()
        write_synthetic(path, shapes, variant, 0, relative_delta, **recipe)
        made[name] = {"path": str(path), "generated_s": time.perf_counter() - started}
        logger.info("  %.2f GB in %.1f s", path.stat().st_size / 1e9, made[name]["generated_s"])
    return made


def input_paths(inputs: dict) -> tuple[Path, list[Path]]:
    base = Path(inputs["base"]["path"])
    return base, [Path(entry["path"]) for name, entry in inputs.items() if name != "base"]


# -- measuring ------------------------------------------------------------------------------------------


def measured_run(kind: str, arguments: dict, threads: str, options: argparse.Namespace) -> dict:
    """One cold-cache subprocess run of a child; its report plus wall time and wait4's resource usage."""
    for path in [arguments["base"], *arguments["finetuned"]]:
        drop_from_page_cache(Path(path))
    environment = threads_environment(threads)
    if kind == "sd-mecha":
        environment["PYTHONPATH"] = str(options.sdmecha)
    elif options.library:
        environment["DM_BENCH_LIBRARY"] = str(options.library.resolve())
    command = [sys.executable, __file__, "child", kind, json.dumps(arguments)]
    run = measured_child(command, environment, threads, f"{kind} merge")
    run["environment"] = {k: v for k, v in environment.items() if k.startswith(("MALLOC_", "DM_BENCH_"))}
    return run


def log_run(label: str, run: dict) -> None:
    logger.info(
        "  %s: wall %.1f s (user %.1f s, system %.1f s), peak RSS %.2f GiB, read %.1f GB, wrote %.1f GB",
        label,
        run["wall_s"],
        run["user_s"],
        run["system_s"],
        run["peak_rss_bytes"] / GIB,
        run["io"]["rchar"] / 1e9,
        run["io"]["wchar"] / 1e9,
    )


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),  # fewer under `taskset`: every tool on the same cores
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def add_run(options: argparse.Namespace, result: dict, run: dict, group: Sequence[str] | None = None) -> None:
    """Record a run (and, with ``group``, the best per group) and save the results so far."""
    result["runs"].append(run)
    if group:
        result["best"] = best_of(result["runs"], group)
    options.results_path.parent.mkdir(parents=True, exist_ok=True)
    options.results_path.write_text(json.dumps(result, indent=1) + "\n")


def best_of(runs: list[dict], group: Sequence[str]) -> list[dict]:
    """Per group (e.g. tool, method, scope, threads): the best wall time and the worst peak RSS."""
    best: dict[tuple, dict] = {}
    for run in runs:
        name = tuple(run[field] for field in group)
        entry = best.setdefault(name, {**{f: run[f] for f in group}, "wall_s": math.inf, "peak_rss_bytes": 0})
        entry["wall_s"] = min(entry["wall_s"], run["wall_s"])
        entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], run["peak_rss_bytes"])
        entry["runs"] = entry.get("runs", 0) + 1
    return list(best.values())


# -- checking outputs -----------------------------------------------------------------------------------


def checked_keys(shapes: dict) -> list[str]:
    """A few keys spread evenly over the model, plus its largest."""
    keys = list(shapes)
    chosen = {keys[i * len(keys) // VERIFIED_KEYS] for i in range(min(VERIFIED_KEYS, len(keys)))}
    chosen.add(max(keys, key=lambda k: math.prod(shapes[k])))
    return sorted(chosen)


def reference_delta(method: str, deltas: list[torch.Tensor], scope: str) -> torch.Tensor | None:
    """The merge's equations on one key, in fp32: Σ wᵢτᵢ, or per-tensor TIES (None for global TIES)."""
    if method == "weighted":
        return sum(w * d for w, d in zip(WEIGHTS, deltas, strict=True))
    if scope == "global":
        return None  # needs the whole model's threshold; exactness is pinned by tests/unit/test_merge_topk.py
    trimmed = []
    for delta in deltas:
        keep = min(delta.numel(), int(TIES_K * delta.numel()) + 1)
        threshold = delta.abs().flatten().topk(keep).values[-1]
        trimmed.append(delta * (delta.abs() >= threshold))
    stack = torch.stack(trimmed)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = (stack != 0) & (torch.sign(stack) == sign)
    return (stack * agree).sum(0) / agree.sum(0).clamp(min=1)


def verify(out: Path, base: Path, finetuned: list[Path], keys: Iterable[str], method: str, scope: str) -> dict:
    """Compare a few output keys with base + reference delta, in units of the output dtype's spacing."""
    output, base_file = SafetensorsFile(out), SafetensorsFile(base)
    finetuned_files = [SafetensorsFile(path) for path in finetuned]
    within_one, entries, changed, worst = 0, 0, 0, 0.0
    for key in keys:
        name = CHECKPOINT_PREFIX + key
        theta = base_file[name].float()
        got = output[name]
        changed += int((got.float() != theta.to(got.dtype).float()).sum())
        entries += got.numel()
        expected = reference_delta(method, [f[name].float() - theta for f in finetuned_files], scope)
        if expected is None:
            continue
        expected = (theta + expected).to(got.dtype)
        spacing = (torch.nextafter(expected.float(), torch.tensor(math.inf)) - expected.float()).clamp(min=1e-30)
        error = (got.float() - expected.float()).abs() / spacing
        within_one += int((error <= 1).sum())
        worst = max(worst, float(error.max()))
    report = {"keys_checked": len(list(keys)), "changed_share": changed / entries}
    if scope != "global" or method == "weighted":
        report.update(within_1_spacing_share=within_one / entries, worst_error_in_spacings=worst)
    return report


# -- benchmark 1: SDXL, ours vs sd-mecha ----------------------------------------------------------------


def bench_sdxl(options: argparse.Namespace) -> dict:
    shapes = select_keys(load_shapes(SDXL_SHAPES), options.keys)
    inputs = ensure_inputs(options.work_dir, "sdxl", shapes, 3, torch.float16, options.relative_delta)
    base, finetuned = input_paths(inputs)
    tools = options.tools.split(",")
    result = sdxl_result(shapes, inputs, base, finetuned)
    for threads in options.threads.split(","):
        for repeat in range(options.repeats):
            for method in options.methods.split(","):
                for tool, our_method, params in SDXL_CASES[method]:
                    if tool in tools:
                        run = sdxl_run(options, tool, our_method, params, threads, base, finetuned, shapes)
                        add_run(options, result, {**run, "repeat": repeat + 1}, ("tool", "method", "scope", "threads"))
    return result


def sdxl_result(shapes: dict, inputs: dict, base: Path, finetuned: list[Path]) -> dict:
    return {
        "benchmark": "SDXL merge-and-save from files: ours (merging.merge_checkpoint_files) vs sd-mecha",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "sizes": sizes(shapes, base, finetuned),
        "merges": {
            "weighted": f"θ₀ + Σ wᵢ(θᵢ − θ₀), w = {list(WEIGHTS)}",
            "ties": f"θ₀ + TIES(θᵢ − θ₀): k = {TIES_K}, sign by mass, disjoint mean, λ = 1",
            "sd-mecha weighted": "add_difference(add_difference(add_difference(θ₀, subtract(θ₁, θ₀), w₁), …)",
            "sd-mecha ties": f"add_difference(θ₀, ties_sum(subtract(θᵢ, θ₀)…, k={TIES_K}, vote_sgn=True)) "
            "— sd-mecha trims per tensor",
            "output": "fp16; merge arithmetic in fp32 (both)",
        },
        "generation": inputs,
        "runs": [],
    }


def sdxl_run(options, tool: str, method: str, params: dict, threads: str, base, finetuned, shapes) -> dict:
    """Run one configuration, check a few output keys, delete the output."""
    scope = params.get("topk_scope", "global" if tool == "ours" else "per_tensor") if method == "ties" else "-"
    out = options.work_dir / f"merged_{tool}_{method}.safetensors"
    arguments = {
        "base": str(base),
        "finetuned": [str(p) for p in finetuned],
        "out": str(out),
        "method": method,
        "params": params,
        "dtype": "fp16",
    }
    logger.info("%s %s (%s), threads=%s …", tool, method, scope, threads)
    run = measured_run(tool, arguments, threads, options)
    run.update(tool=tool, method=method, scope=scope, params=params)
    run["verified"] = verify(out, base, finetuned, checked_keys(shapes), method, scope)
    out.unlink()
    log_run(f"{tool} {method}", run)
    return run


def sizes(shapes: dict, base: Path, finetuned: list[Path]) -> dict:
    return {
        "keys": len(shapes),
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "input_bytes": base.stat().st_size + sum(p.stat().st_size for p in finetuned),
        "files": 1 + len(finetuned),
    }


def sdxl_table(result: dict) -> str:
    rows = [
        "| tool | merge | top-k | threads | wall (best) | peak RSS (worst) | RSS after import | runs | read "
        "| checked keys: entries |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for best in result["best"]:
        same = [r for r in result["runs"] if all(r[f] == best[f] for f in ("tool", "method", "scope", "threads"))]
        rows.append(
            f"| {best['tool']} | {best['method']} | {best['scope']} | {best['threads']} | {best['wall_s']:.1f} s "
            f"| {best['peak_rss_bytes'] / GIB:.2f} GiB | {after_import_gib(same[0]):.2f} GiB | {best['runs']} "
            f"| {same[0]['io']['rchar'] / 1e9:.1f} GB "
            f"| {verified_text(same[0]['verified'])} |"
        )
    return "\n".join(rows)


def after_import_gib(run: dict) -> float:
    return run["memory_kib"]["after_import"]["VmRSS"] / 2**20


def verified_text(verified: dict) -> str:
    changed = f"{verified['changed_share']:.1%} changed"
    if "within_1_spacing_share" not in verified:
        return changed
    return f"{changed}; {verified['within_1_spacing_share']:.4%} within 1 fp16 step of the equations"


# -- benchmark 2: DRM on the SDXL inputs ----------------------------------------------------------------


def bench_drm(options: argparse.Namespace) -> dict:
    """DRM on every key (``--full``), or on one key per (shape, kind) class with a per-shape extrapolation."""
    full_shapes = load_shapes(SDXL_SHAPES)
    shapes = select_keys(full_shapes if options.full else one_key_per_shape(full_shapes), options.keys)
    name = "sdxl" if options.full else "sdxl-drm-subset"
    inputs = ensure_inputs(options.work_dir, name, shapes, 3, torch.float16, options.relative_delta)
    base, finetuned = input_paths(inputs)
    result = {
        "benchmark": "DRM merge-and-save from files (merging.merge_checkpoint_files, CPU)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "measured_keys": "all" if options.full else "one key per (shape, SVD branch or not) class",
        "sizes": sizes(shapes, base, finetuned),
        "full_parameters": sum(math.prod(s) for s in full_shapes.values()),
        "generation": inputs,
        "runs": [],
    }
    for direction in options.directions.split(","):
        out = options.work_dir / f"merged_drm_{direction}.safetensors"
        arguments = {
            "base": str(base),
            "finetuned": [str(p) for p in finetuned],
            "out": str(out),
            "method": "drm",
            "params": {"direction": direction},
            "dtype": "fp16",
        }
        logger.info("DRM direction=%s on %d keys, threads=%s …", direction, len(shapes), options.threads)
        run = measured_run("drm", arguments, options.threads, options)
        out.unlink()
        run.update(direction=direction, extrapolated=extrapolate(run, shapes, full_shapes))
        log_run(f"drm {direction}", run)
        add_run(options, result, run)
    return result


def one_key_per_shape(shapes: dict) -> dict:
    """The first key of each (shape, 2-D weight or not) class: every distinct SVD problem exactly once."""
    chosen: dict[tuple, str] = {}
    for key, shape in shapes.items():
        chosen.setdefault((tuple(shape), key.endswith("weight") and len(shape) == 2), key)
    return {key: shapes[key] for key in shapes if key in set(chosen.values())}


def extrapolate(run: dict, shapes: dict, full_shapes: dict) -> dict:
    """Full-model estimate: each 2-D weight at its shape's measured SVD-branch time, the rest (reads, the
    raw branch, the save) scaled by parameter count from what the measured merge spent outside the SVD
    branch, plus the measured start-up. Exact when ``shapes`` is the full model; None when a 2-D shape was
    not measured (``--keys``)."""
    per_shape: dict[tuple, list[float]] = {}
    for shape, seconds in run["matrix_s"]:
        per_shape.setdefault(tuple(shape), []).append(seconds)
    matrix_measured = sum(s for _, s in run["matrix_s"])
    linear_full = [tuple(s) for k, s in full_shapes.items() if k.endswith("weight") and len(s) == 2]
    if any(shape not in per_shape for shape in linear_full):
        return None
    matrix_full = sum(sum(per_shape[s]) / len(per_shape[s]) for s in linear_full)
    params = sum(math.prod(s) for s in shapes.values())
    full_params = sum(math.prod(s) for s in full_shapes.values())
    start_up = run["wall_s"] - run["merge_s"]  # Python start and imports: paid once at any size
    other = max(0.0, run["merge_s"] - matrix_measured) * full_params / params + start_up
    return {
        "svd_branch_s": matrix_full,
        "other_s": other,
        "wall_s": matrix_full + other,
        "slowest_shapes": sorted(
            ([list(s), sum(v) / len(v), linear_full.count(s)] for s, v in per_shape.items()), key=lambda r: -r[1]
        )[:6],
    }


def drm_table(result: dict) -> str:
    rows = [
        "| direction | threads | measured keys | measured wall | peak RSS | SVD-branch (full, est.) "
        "| other (full, est.) | full SDXL wall (est.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        est = run["extrapolated"] or {"svd_branch_s": math.nan, "other_s": math.nan, "wall_s": math.nan}
        rows.append(
            f"| {run['direction']} | {run['threads']} | {result['sizes']['keys']} | {run['wall_s']:.1f} s "
            f"| {run['peak_rss_bytes'] / GIB:.2f} GiB | {est['svd_branch_s']:.0f} s | {est['other_s']:.0f} s "
            f"| {est['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(rows)


# -- benchmark 3: Flux-dev, fp8 ---------------------------------------------------------------------------


def bench_flux(options: argparse.Namespace) -> dict:
    shapes = select_keys(load_shapes(FLUX_SHAPES), options.keys)
    stored = parse_dtype(options.input_dtype)
    inputs = ensure_inputs(options.work_dir, "flux", shapes, 2, stored, options.relative_delta)
    base, finetuned = input_paths(inputs)
    result = {
        "benchmark": "FLUX.1-dev-shaped TIES merge (global top-k) of 2 fine-tunes from files",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "sizes": {**sizes(shapes, base, finetuned), "input_dtype": options.input_dtype},
        "merge": f"θ₀ + TIES(θᵢ − θ₀): k = {TIES_K} over the whole model, sign by mass, disjoint mean",
        "generation": inputs,
        "runs": [],
    }
    for dtype in options.out_dtypes.split(","):
        for repeat in range(options.repeats):
            out = options.work_dir / f"merged_flux_{dtype}.safetensors"
            arguments = {
                "base": str(base),
                "finetuned": [str(p) for p in finetuned],
                "out": str(out),
                "method": "ties",
                "params": {"k": TIES_K},
                "dtype": dtype,
            }
            logger.info("Flux TIES → %s, threads=%s …", dtype, options.threads)
            run = measured_run("ours", arguments, options.threads, options)
            run.update(out_dtype=dtype, repeat=repeat + 1, output_bytes=out.stat().st_size)
            run["verified"] = flux_check(out, base, checked_keys(shapes), parse_dtype(dtype))
            out.unlink()
            log_run(f"flux → {dtype}", run)
            add_run(options, result, run)
    return result


def flux_check(out: Path, base: Path, keys: list[str], dtype: torch.dtype) -> dict:
    """Output keys have the requested dtype, are finite, and differ from the base on some entries."""
    output, base_file = SafetensorsFile(out), SafetensorsFile(base)
    changed = entries = 0
    for key in keys:
        name = CHECKPOINT_PREFIX + key
        got = output[name]
        if got.dtype != dtype or not bool(torch.isfinite(got.float()).all()):
            raise RuntimeError(f"merged '{key}' is {got.dtype} or not finite")
        changed += int((got.float() != base_file[name].float().to(dtype).float()).sum())
        entries += got.numel()
    return {"keys_checked": len(keys), "changed_share": changed / entries, "tensors": len(output)}


def flux_table(result: dict) -> str:
    rows = [
        "| inputs | output | threads | wall | peak RSS | RSS after import | read | written |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sizes_ = result["sizes"]
    for run in result["runs"]:
        rows.append(
            f"| base + 2 × {sizes_['parameters'] / 1e9:.1f} B {sizes_['input_dtype']} "
            f"({sizes_['input_bytes'] / 1e9:.1f} GB) | {run['out_dtype']} | {run['threads']} "
            f"| {run['wall_s'] / 60:.1f} min | {run['peak_rss_bytes'] / GIB:.2f} GiB "
            f"| {after_import_gib(run):.2f} GiB | {run['io']['rchar'] / 1e9:.0f} GB "
            f"| {run['io']['wchar'] / 1e9:.1f} GB |"
        )
    return "\n".join(rows)


# -- command line ---------------------------------------------------------------------------------------


BENCHES = {
    "sdxl": (bench_sdxl, sdxl_table),
    "drm": (bench_drm, drm_table),
    "flux": (bench_flux, flux_table),
}


def parse_options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sdxl = commands.add_parser("sdxl", help="weighted + TIES merge-and-save, ours vs sd-mecha")
    sdxl.add_argument("--methods", default="weighted,ties,ties-per-tensor", help=f"of {', '.join(SDXL_CASES)}")
    sdxl.add_argument("--tools", default="ours,sd-mecha")
    sdxl.add_argument("--threads", default="1,default", help="OMP_NUM_THREADS values to run (default = unset)")
    sdxl.add_argument("--repeats", type=int, default=1, help="runs per configuration (best wall is reported)")
    sdxl.add_argument("--sdmecha", type=Path, default=Path("/tmp/dm-bench-merge/sdmecha"), help="pip --target dir")
    drm = commands.add_parser("drm", help="DRM merge-and-save on the SDXL inputs (CPU)")
    drm.add_argument("--directions", default="vertical,auto")
    drm.add_argument("--threads", default="default")
    drm.add_argument("--full", action="store_true", help="every key instead of one key per shape + estimate")
    flux = commands.add_parser("flux", help="TIES of base + 2 fp8 FLUX.1-dev fine-tunes from files")
    flux.add_argument("--input-dtype", default="fp8_e4m3fn")
    flux.add_argument("--out-dtypes", default="fp8_e4m3fn", help="comma-separated output dtypes")
    flux.add_argument("--threads", default="default")
    flux.add_argument("--repeats", type=int, default=1)
    for command, delta in ((sdxl, 0.01), (drm, 0.01), (flux, 0.1)):
        command.add_argument("--work-dir", type=Path, default=Path("/tmp/dm-bench-merge"))
        command.add_argument("--keys", type=int, default=None, help="only this many keys (quick runs)")
        command.add_argument("--relative-delta", type=float, default=delta, help="finetuned noise / weight scale")
        command.add_argument("--results", type=Path, default=None, help="results JSON")
        command.add_argument("--cleanup", action="store_true", help="delete the generated inputs afterwards")
        command.add_argument("--library", type=Path, default=None, help="run our merges on DIR/merging instead")
    child = commands.add_parser("child", help=argparse.SUPPRESS)
    child.add_argument("kind", choices=CHILDREN)
    child.add_argument("arguments", type=json.loads)
    return parser.parse_args(argv)


def main() -> None:
    options = parse_options()
    if options.command == "child":
        run_child(options.kind, options.arguments)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bench, table = BENCHES[options.command]
    default_results = RESULTS_DIR / f"merge_{options.command}.json"
    full_size = options.keys is None and options.library is None
    scratch_results = options.work_dir / default_results.name
    options.results_path = options.results or (default_results if full_size else scratch_results)
    result = bench(options)
    logger.info("results → %s", options.results_path)
    if options.cleanup:
        for entry in result["generation"].values():
            Path(entry["path"]).unlink(missing_ok=True)
    print(table(result))


if __name__ == "__main__":
    main()
