"""Benchmark: task vector → LoRA on an SDXL-shaped task vector, ours against ComfyUI core's extractor.

For each rank (32, 64, 128 by default) and each of our backends (``gram``, ``svd``, ``lowrank``) it runs
``merging.extract_lora`` on a task vector read from a file, and ComfyUI's *Extract and Save Lora* on the same
task vector, each in a fresh subprocess, and reports wall time, peak RSS and the LoRA's relative error
‖τ − LoRA‖_F / ‖τ‖_F (over every key of τ, the LoRA read back from its file as the stock loader applies it)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_lora_extract.py --keys 48     # a subset on the CPU (~30 min)
    .venv/bin/python bench/bench_lora_extract.py --device cuda                   # all 1680 keys, on a GPU
    .venv/bin/python bench/bench_lora_extract.py --dry-run                       # tiny shapes, in process (a test)
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_lora_extract.py --per-shape   # each backend on single SDXL shapes

**Input.** ``sdxl_tau_<N>keys_a<α>.safetensors`` in ``--work-dir``: a task vector in this pack's saved layout
(fp16) with the SDXL UNet's keys (``sdxl_shapes.py``; ``--keys N`` takes N evenly spread). A fine-tune's change
is far from random noise: its singular values decay. Each matrix (convolutions as out × in·k·k) is
G₁·diag(sᵢ)·G₂ with Gaussian G₁, G₂ and sᵢ = (1 + i)^-α (α = 0.75 by default), scaled to 1 % of the
weight scale make_synthetic.py uses (N(0, 1/fan_in)); 1-D keys are N(0, (0.01·0.02)²). Seeded per key, so a
subset holds the same tensors as the full file. Generated once, reused while its metadata matches.

**Core.** ComfyUI's node takes a MODEL whose weights are the difference (the output of *ModelSubtract*).
``--core-mode node`` (the default with all keys) loads the task vector as a diffusion model with ComfyUI's own
loader (the whole task vector in memory, as core needs) and calls ``LoraSave.execute`` (rank, ``standard``,
``bias_diff``); the model load is not timed. ``--core-mode function`` (the default for subsets, which ComfyUI
cannot detect as a model) streams the keys from the file into core's own ``extract_lora`` and writes the
tensors as the node does (fp16 ``lora_up``/``lora_down``, 1-D weights as ``.diff``, biases as ``.diff_b``).
Core's factors are clamped at their 99th percentile; ours are not.

Results go to ``bench/results/lora_extract.json`` (``--results`` elsewhere) after every run; a markdown table
is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from make_synthetic import select_keys  # noqa: E402
from sdxl_shapes import load_shapes  # noqa: E402

import merging  # noqa: E402
from merging.io import SafetensorsFile  # noqa: E402
from merging.lora_extract import RankRule, low_rank_factors  # noqa: E402
from merging.task_vectors import ComputedDeltas, TaskVector  # noqa: E402

logger = logging.getLogger(__name__)

RESULTS = ROOT / "bench" / "results" / "lora_extract.json"
GIB = 1024**3
RELATIVE_DELTA = 0.01
FORMAT = "diffusion-merge/bench-lora-input/1"
DRY_SHAPES = {
    "input_blocks.0.0.weight": (32, 4, 3, 3),
    "input_blocks.0.0.bias": (32,),
    "input_blocks.1.1.proj_in.weight": (64, 32),
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (96, 32),
    "input_blocks.1.1.norm.weight": (32,),
    "out.2.weight": (4, 32, 3, 3),
}


# -- the input ----------------------------------------------------------------------------------------


def spectral_delta(key: str, shape: tuple[int, ...], alpha: float, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """One key of the synthetic task vector (see the module docstring); drawn on the CPU (seeded), multiplied
    on ``device``."""
    generator = torch.Generator().manual_seed((seed << 32) | zlib.crc32(key.encode()))
    if len(shape) < 2:
        return torch.randn(shape, generator=generator) * (RELATIVE_DELTA * 0.02)
    rows, cols = shape[0], math.prod(shape[1:])
    inner = min(rows, cols)
    spectrum = (1.0 + torch.arange(inner, dtype=torch.float32)) ** -alpha
    left = torch.randn(rows, inner, generator=generator).to(device) / math.sqrt(rows)
    right = torch.randn(inner, cols, generator=generator).to(device) / math.sqrt(cols)
    delta = ((left * spectrum.to(device)) @ right).cpu()
    target = RELATIVE_DELTA * math.sqrt(rows)  # ‖N(0, 1/fan_in) noise of that shape‖_F, times 1 %
    return delta.mul_(target / float(delta.norm())).reshape(shape)


def ensure_task_vector(work_dir: Path, shapes: dict, alpha: float, device: str = "cpu") -> Path:
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"sdxl_tau_{len(shapes)}keys_a{alpha:g}.safetensors"
    recipe = json.dumps({"format": FORMAT, "alpha": alpha, "keys": len(shapes), "relative": RELATIVE_DELTA})
    if path.is_file() and SafetensorsFile(path).metadata.get("dm_bench") == recipe:
        logger.info("reusing %s", path)
        return path
    logger.info("generating %s (%d keys) …", path, len(shapes))
    started = time.perf_counter()
    named = {"diffusion_model." + key: shape for key, shape in shapes.items()}

    def generate(key: str, _target) -> torch.Tensor:  # computed on `device`, returned on the CPU for the writer
        return spectral_delta(key.removeprefix("diffusion_model."), named[key], alpha, device=device)

    leaf = ComputedDeltas(named, generate, "bench")
    merging.save_task_vector(
        TaskVector(((1.0, leaf),)), path, dtype="fp16", metadata={"dm_bench": recipe}, device="cpu"
    )
    logger.info("  %.2f GB in %.1f s", path.stat().st_size / 1e9, time.perf_counter() - started)
    return path


# -- the runs (children) ------------------------------------------------------------------------------


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(tau: str, out: str, rank: int, backend: str, device: str) -> dict:
    vector = merging.load_task_vector(tau)
    rss_before = peak_rss_gib()
    synchronize(device)
    started = time.perf_counter()
    report = merging.extract_lora(vector, out, rank=rank, backend=backend, device=device)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "peak_rss_gib": peak_rss_gib(),
        "rss_before_gib": rss_before,
        "reported_energy": report.totals()["energy"],
        "reported_relative_error": report.totals()["relative_error"],
    }


def run_core(tau: str, out: str, rank: int, device: str, mode: str, comfyui: str | None) -> dict:
    """ComfyUI's extractor on the same task vector (see the module docstring for the two modes)."""
    work = Path(tempfile.mkdtemp(prefix="dm-bench-core-"))
    if "comfy" not in sys.modules:
        sys.path.insert(0, str(ROOT / "scripts"))
        import comfy_in_process  # ComfyUI on sys.path, its writable folders redirected

        comfy_in_process.boot(Path(comfyui), work, cpu=not device.startswith("cuda"))
    import comfy.utils
    from comfy_extras import nodes_lora_extract as core

    vector = merging.load_task_vector(tau)
    if mode == "node":
        import comfy.sd
        import folder_paths

        state = {key.removeprefix("diffusion_model."): vector.delta(key, "cpu").half() for key in vector.keys()}
        patcher = comfy.sd.load_diffusion_model_state_dict(state)
        del state
        rss_before = peak_rss_gib()
        synchronize(device)
        started = time.perf_counter()
        core.LoraSave.execute("bench/core", rank, "standard", True, model_diff=patcher)
        synchronize(device)
        seconds = time.perf_counter() - started
        written = max(Path(folder_paths.get_output_directory(), "bench").glob("core_*.safetensors"))
        Path(out).write_bytes(written.read_bytes())
    else:
        rss_before = peak_rss_gib()
        synchronize(device)
        started = time.perf_counter()
        output = {}
        for key in vector.keys():
            diff = vector.delta(key, device)
            module = key[: -len(".weight")] if key.endswith(".weight") else key[: -len(".bias")]
            if key.endswith(".weight") and diff.ndim >= 2:
                up, down = core.extract_lora(diff, rank)
                output[f"{module}.lora_up.weight"] = up.contiguous().half().cpu()
                output[f"{module}.lora_down.weight"] = down.contiguous().half().cpu()
            elif key.endswith(".weight"):
                output[f"{module}.diff"] = diff.contiguous().half().cpu()
            else:
                output[f"{module}.diff_b"] = diff.contiguous().half().cpu()
        comfy.utils.save_torch_file(output, out)
        synchronize(device)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "rss_before_gib": rss_before, "core_mode": mode}


def relative_error(tau: str, lora: str, device: str) -> float:
    """‖τ − LoRA‖_F / ‖τ‖_F over every key of τ, the LoRA as the stock loader applies it."""
    vector, approximation = merging.load_task_vector(tau), merging.load_lora(lora)
    error = total = 0.0
    for key in vector.keys():
        delta = vector.delta(key, device)
        total += float(delta.double().square().sum())
        if key in approximation:
            delta -= approximation.delta(key, device)
        error += float(delta.double().square().sum())
    return math.sqrt(error / total)


def child(kind: str, arguments: dict) -> dict:
    if arguments["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    report = run_core(**arguments) if kind == "core" else run_ours(**arguments)
    if arguments["device"].startswith("cuda"):
        report["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GIB
    report["relative_error"] = relative_error(arguments["tau"], arguments["out"], arguments["device"])
    report["lora_bytes"] = Path(arguments["out"]).stat().st_size
    report["torch_threads"] = torch.get_num_threads()
    return report


# -- the parent ---------------------------------------------------------------------------------------


def measured(kind: str, arguments: dict, in_process: bool) -> dict:
    if in_process:
        return child(kind, arguments)
    from bench_task_vector import spawn_measured

    environment = dict(os.environ)
    command = [sys.executable, __file__, "--child", kind, json.dumps(arguments)]
    code, stdout, stderr, wall, usage = spawn_measured(command, environment)
    if code != 0:
        raise RuntimeError(f"{kind} run failed (exit {code}):\n{stderr[-4000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    report.update(wall_s=wall, process_peak_rss_gib=usage["peak_rss_bytes"] / GIB)
    return report


def run_all(options: argparse.Namespace) -> dict:
    shapes = DRY_SHAPES if options.dry_run else select_keys(load_shapes(), options.keys)
    tau = ensure_task_vector(options.work_dir, shapes, options.alpha, options.device)
    core_mode = options.core_mode or ("node" if len(shapes) == len(load_shapes()) else "function")
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(options.device),
        "input": {
            "keys": len(shapes),
            "parameters": sum(math.prod(s) for s in shapes.values()),
            "alpha": options.alpha,
            "file_bytes": tau.stat().st_size,
        },
        "runs": [],
    }
    for rank in options.ranks:
        plans = [("ours", backend, {"backend": backend}) for backend in options.backends]
        if options.core:
            plans.append(("core", "core", {"mode": core_mode, "comfyui": str(options.comfyui)}))
        for kind, label, extra in plans:
            out = options.work_dir / f"lora_{label}_r{rank}.safetensors"
            arguments = {"tau": str(tau), "out": str(out), "rank": rank, "device": options.device, **extra}
            load = os.getloadavg()[0]
            run = measured(kind, arguments, options.dry_run or options.in_process)
            run.update(tool=kind, backend=label, rank=rank, load_average_1min=[load, os.getloadavg()[0]])
            result["runs"].append(run)
            logger.info(
                "%s r%d: %.1f s, %.2f GiB, error %.4f",
                label,
                rank,
                run["seconds"],
                run["peak_rss_gib"],
                run["relative_error"],
            )
            out.unlink(missing_ok=True)
            if options.results:
                options.results.parent.mkdir(parents=True, exist_ok=True)
                options.results.write_text(json.dumps(result, indent=1) + "\n")
    return result


PER_SHAPE = ((320, 320), (640, 640), (1280, 1280), (1280, 2048), (10240, 1280), (1280, 5120), (1280, 11520))


def per_shape(options: argparse.Namespace) -> dict:
    """Each backend on one spectral matrix per typical SDXL shape: best-of-2 seconds and the energy kept
    (relative to the optimum, the truncated SVD)."""
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(options.device)}
    rows = []
    for rows_, cols in PER_SHAPE:
        matrix = spectral_delta(f"shape{rows_}x{cols}", (rows_, cols), options.alpha).to(options.device)
        singular = torch.linalg.svdvals(matrix.double()).square()
        for rank in options.ranks:
            optimum = float(singular[:rank].sum() / singular.sum())
            for backend in options.backends:
                rule = RankRule(rank=rank)
                times = []
                for _ in range(2):
                    synchronize(options.device)
                    started = time.perf_counter()
                    factors = low_rank_factors(matrix, rule, backend)
                    synchronize(options.device)
                    times.append(time.perf_counter() - started)
                energy = factors.retained / factors.total
                rows.append(
                    {
                        "shape": [rows_, cols],
                        "rank": rank,
                        "backend": backend,
                        "seconds": min(times),
                        "energy": energy,
                        "optimum": optimum,
                    }
                )
                logger.info(
                    "%dx%d r%d %s: %.3f s, energy %.4f (optimum %.4f)",
                    rows_,
                    cols,
                    rank,
                    backend,
                    min(times),
                    energy,
                    optimum,
                )
    result["rows"] = rows
    return result


def per_shape_table(result: dict) -> str:
    backends = list(dict.fromkeys(row["backend"] for row in result["rows"]))
    lines = [
        "| shape | rank | " + " | ".join(f"{b}: s / energy" for b in backends) + " | optimum energy |",
        "|---|---|" + "---|" * (len(backends) + 1),
    ]
    groups: dict[tuple, dict] = {}
    for row in result["rows"]:
        groups.setdefault((tuple(row["shape"]), row["rank"]), {})[row["backend"]] = row
    for (shape, rank), by_backend in groups.items():
        cells = [f"{by_backend[b]['seconds']:.2f} / {by_backend[b]['energy']:.4f}" for b in backends]
        optimum = next(iter(by_backend.values()))["optimum"]
        lines.append(f"| {shape[0]}×{shape[1]} | {rank} | " + " | ".join(cells) + f" | {optimum:.4f} |")
    return "\n".join(lines)


def machine(device: str) -> dict:
    info = {
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(result: dict) -> str:
    lines = [
        "| rank | tool | seconds | peak RSS | relative error ‖τ − LoRA‖/‖τ‖ | LoRA file |",
        "|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        tool = "core *Extract and Save Lora*" if run["tool"] == "core" else f"ours, {run['backend']}"
        lines.append(
            f"| {run['rank']} | {tool} | {run['seconds']:.1f} s | {run['peak_rss_gib']:.2f} GiB "
            f"| {run['relative_error']:.4f} | {run['lora_bytes'] / 1e6:.0f} MB |"
        )
    return "\n".join(lines)


def parse_options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, help="N SDXL keys spread evenly (default: all 1680)")
    parser.add_argument("--ranks", type=lambda s: [int(r) for r in s.split(",")], default=[32, 64, 128])
    parser.add_argument("--backends", type=lambda s: s.split(","), default=["gram", "svd", "lowrank"])
    parser.add_argument("--no-core", dest="core", action="store_false", help="skip ComfyUI core's extractor")
    parser.add_argument("--core-mode", choices=["node", "function"], help="default: node for all keys, else function")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--alpha", type=float, default=0.75, help="spectrum decay: σᵢ ∝ (1 + i)^-α")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dm-bench-lora"))
    parser.add_argument(
        "--results", type=Path, help=f"results JSON (default {RESULTS.relative_to(ROOT)} for full runs)"
    )
    parser.add_argument(
        "--comfyui", type=Path, default=Path(os.environ.get("COMFYUI_PATH", ROOT.parent / "shared" / "ComfyUI"))
    )
    parser.add_argument("--in-process", action="store_true", help="run every configuration in this process")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, ranks 2 and 4, in process (for tests)")
    parser.add_argument("--per-shape", action="store_true", help="time each backend on single SDXL-shaped matrices")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARGUMENTS"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.dry_run:
        options.ranks = [2, 4]
        if options.results is None:
            options.results = options.work_dir / "results.json"
    elif options.results is None:
        options.results = RESULTS if options.keys is None else options.work_dir / "results.json"
    return options


def main(argv: Sequence[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = parse_options(argv)
    if options.child:
        kind, arguments = options.child
        print(json.dumps(child(kind, json.loads(arguments))))
        return None
    if options.per_shape:
        result = per_shape(options)
        path = options.results if options.results != RESULTS else RESULTS.with_name("lora_extract_per_shape.json")
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(per_shape_table(result))
        return result
    result = run_all(options)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
