"""Benchmark: extract a task vector from two SDXL-shaped fp16 files and save it, streamed.

One command (issue 3's benchmark)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_task_vector.py            # full SDXL UNet, 2.57 B params
    .venv/bin/python bench/bench_task_vector.py --keys 100 --threads 1        # a quick small run

It generates a synthetic base and finetuned checkpoint (``make_synthetic.py``) into ``--work-dir``, reusing
files a previous run left there; measures the disk's sequential read speed on those files (dropped from the
page cache first) and its write speed; then runs ``merging.task_vector_from_files`` +
``merging.save_task_vector`` in a subprocess per configuration, with the inputs dropped from the page cache,
and records its wall time, peak resident set (``wait4``'s ``ru_maxrss``), bytes it read and wrote
(``/proc/<pid>/io``) and effective throughput ((input + output bytes) / wall time). The saved τ is checked
against finetuned − base on a few keys, then deleted. Results go to ``bench/results/task_vector_extract.json``
(full size) and a markdown table row is printed for ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import math
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from make_synthetic import CHECKPOINT_PREFIX, matches, select_keys, write_synthetic
from sdxl_shapes import load_shapes

import merging
from merging.io import SafetensorsFile
from merging.task_vector_files import saved_key

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "bench" / "results" / "task_vector_extract.json"
GIB = 1024**3
CHUNK = 16 * 1024 * 1024
VERIFIED_KEYS = 8


# -- the measured child ---------------------------------------------------------------------------------


def child(finetuned: str, base: str, out: str, dtype: str, profile_out: str | None) -> None:
    """Runs in the subprocess: extract + save, then print its own phase timings as JSON on stdout."""
    stages = {"after_import": _memory()}
    started = time.perf_counter()
    profiler = cProfile.Profile() if profile_out else None
    if profiler:
        profiler.enable()
    vector = merging.task_vector_from_files(finetuned, base)
    opened = time.perf_counter()
    stages["after_open"] = _memory()
    merging.save_task_vector(vector, out, dtype=dtype)
    saved = time.perf_counter()
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile_out)
    stages["after_save"] = _memory()
    report = {
        "open_s": opened - started,
        "save_s": saved - opened,
        "extract_s": saved - started,
        "torch_threads": torch.get_num_threads(),
        "memory_kib": stages,
        "io": _io_counters(),
    }
    print(json.dumps(report))


def _memory() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, in KiB."""
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0])
    return fields


def _io_counters() -> dict[str, int]:
    with open("/proc/self/io") as handle:
        return {name: int(value) for name, value in (line.split(":") for line in handle)}


# -- the parent -----------------------------------------------------------------------------------------


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages, so the next read comes from the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def cached_bytes(path: Path) -> int | None:
    """How much of the file is in the page cache (util-linux ``fincore``), or None when unknown."""
    if not shutil.which("fincore"):
        return None
    result = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True, text=True
    )
    try:
        return int(result.stdout.split()[0])
    except (IndexError, ValueError):
        return None


def read_throughput(paths: list[Path]) -> dict:
    """Sequential buffered reads of whole files from a cold page cache, in bytes/s."""
    for path in paths:
        drop_from_page_cache(path)
    cached = sum(cached_bytes(p) or 0 for p in paths)
    buffer = bytearray(CHUNK)
    total = 0
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    seconds = time.perf_counter() - started
    for path in paths:
        drop_from_page_cache(path)
    return {"bytes": total, "seconds": seconds, "bytes_per_s": total / seconds, "cached_before_bytes": cached}


def write_throughput(directory: Path, size: int) -> dict:
    """Sequential writes of ``size`` incompressible bytes ending with fsync (as ``write_safetensors`` does)."""
    block = os.urandom(64 * 1024 * 1024)
    path = directory / ".write-probe.tmp"
    written = 0
    started = time.perf_counter()
    try:
        with open(path, "wb", buffering=0) as handle:
            while written < size:
                written += handle.write(block[: min(len(block), size - written)])
            os.fsync(handle.fileno())
        seconds = time.perf_counter() - started
    finally:
        path.unlink(missing_ok=True)
    return {"bytes": written, "seconds": seconds, "bytes_per_s": written / seconds}


def ensure_inputs(work_dir: Path, shapes, seed: int, relative_delta: float) -> dict:
    """Generate base and finetuned files unless matching ones are already there; returns paths and timings."""
    work_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for variant in ("base", "finetuned"):
        path = work_dir / f"sdxl_{variant}_{len(shapes)}keys.safetensors"
        if matches(path, shapes, variant, seed, relative_delta):
            logger.info("reusing %s", path)
            made[variant] = {"path": str(path), "generated_s": None}
            continue
        logger.info("generating %s …", path)
        started = time.perf_counter()
        write_synthetic(path, shapes, variant, seed, relative_delta)
        made[variant] = {"path": str(path), "generated_s": time.perf_counter() - started}
        logger.info("  %.2f GB in %.1f s", path.stat().st_size / 1e9, made[variant]["generated_s"])
    return made


def spawn_measured(command: list[str], environment: dict) -> tuple[int, str, str, float, dict]:
    """Run a command; return (exit status, stdout, stderr, wall seconds, its resource usage from wait4)."""
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=environment, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        resources = {
            "peak_rss_bytes": usage.ru_maxrss * 1024,
            "user_s": usage.ru_utime,
            "system_s": usage.ru_stime,
            "minor_page_faults": usage.ru_minflt,
            "major_page_faults": usage.ru_majflt,
        }
        return process.returncode, stdout.read().decode(), stderr.read().decode(), wall, resources


def threads_environment(threads: str) -> dict:
    """``os.environ`` with OMP_NUM_THREADS set to ``threads``, or unset (torch's default) for ``"default"``."""
    environment = dict(os.environ)
    environment.pop("OMP_NUM_THREADS", None)
    if threads != "default":
        environment["OMP_NUM_THREADS"] = threads
    return environment


def measured_child(command: list[str], environment: dict, threads: str, what: str) -> dict:
    """Run a child that prints its report as the last line of stdout: the report plus the thread setting, wall
    time, the load average before and after, and wait4's resource usage (shared with ``bench_merge.py``)."""
    load_before = os.getloadavg()[0]
    code, stdout, stderr, wall, resources = spawn_measured(command, environment)
    if code != 0:
        raise RuntimeError(f"{what} failed (exit {code}):\n{stderr[-4000:]}")
    run = json.loads(stdout.strip().splitlines()[-1])
    # other users' processes share the CPUs: the 1-minute load average tells how noisy a run was
    run.update(threads=threads, wall_s=wall, load_average_1min=[load_before, os.getloadavg()[0]], **resources)
    return run


def verify(out: Path, finetuned: Path, base: Path, shapes, dtype: torch.dtype) -> dict:
    """Compare a few saved keys (evenly spread, plus the largest) with (finetuned − base) rounded to ``dtype``."""
    saved, ft_file, base_file = SafetensorsFile(out), SafetensorsFile(finetuned), SafetensorsFile(base)
    if len(saved) != len(shapes):
        raise RuntimeError(f"saved τ has {len(saved)} keys, expected {len(shapes)}")
    keys = list(shapes)
    chosen = {keys[i * len(keys) // VERIFIED_KEYS] for i in range(min(VERIFIED_KEYS, len(keys)))}
    chosen.add(max(keys, key=lambda k: math.prod(shapes[k])))
    for key in sorted(chosen):
        expected = (ft_file[CHECKPOINT_PREFIX + key].float() - base_file[CHECKPOINT_PREFIX + key].float()).to(dtype)
        got = saved[saved_key("diffusion_model." + key)]
        if got.dtype != dtype or not torch.equal(got, expected):
            raise RuntimeError(f"saved τ differs from finetuned − base at '{key}'")
    return {"keys_checked": len(chosen), "exact": True}


def profile_summary(path: Path, top: int = 15) -> list[dict]:
    stats = pstats.Stats(str(path))
    rows = []
    for (filename, line, function), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append(
            {
                "function": f"{Path(filename).name}:{line}({function})",
                "calls": calls,
                "tottime_s": round(tottime, 3),
                "cumtime_s": round(cumtime, 3),
            }
        )
    return sorted(rows, key=lambda r: -r["tottime_s"])[:top]


def markdown_row(result: dict, run: dict) -> str:
    sizes, disk = result["sizes"], result["disk"]
    return (
        f"| {result['date'][:10]} | {result['machine']['cpus']} CPU, threads={run['threads']} "
        f"| {sizes['parameters'] / 1e9:.2f} B fp16 | {run['wall_s']:.1f} s | {run['extract_s']:.1f} s "
        f"| {run['peak_rss_bytes'] / GIB:.2f} GiB | {run['memory_kib']['after_import']['VmRSS'] / 2**20:.2f} GiB "
        f"| {disk['read']['bytes_per_s'] / 1e6:.0f} MB/s | {disk['write']['bytes_per_s'] / 1e6:.0f} MB/s "
        f"| {run['effective_bytes_per_s'] / 1e6:.0f} MB/s | {result['disk_floor_s']:.1f} s |"
    )


MARKDOWN_HEADER = (
    "| date | machine | model | wall | extract+save | peak RSS | RSS after import | disk read | disk write "
    "| effective (in+out)/wall | disk floor |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def measure(run_args: argparse.Namespace) -> dict:
    shapes = select_keys(load_shapes(), run_args.keys)
    work_dir = run_args.work_dir
    inputs = ensure_inputs(work_dir, shapes, run_args.seed, run_args.relative_delta)
    finetuned, base = Path(inputs["finetuned"]["path"]), Path(inputs["base"]["path"])
    dtype = merging.io.parse_dtype(run_args.dtype)
    input_bytes = finetuned.stat().st_size + base.stat().st_size
    output_bytes = sum(math.prod(s) for s in shapes.values()) * torch.empty((), dtype=dtype).element_size()

    logger.info("measuring disk read speed on the inputs (%.2f GB) …", input_bytes / 1e9)
    disk = {"read": read_throughput([finetuned, base])}
    logger.info("  read %.0f MB/s", disk["read"]["bytes_per_s"] / 1e6)
    probe = min(output_bytes, int(run_args.write_probe_gib * GIB))
    disk["write"] = write_throughput(work_dir, probe)
    logger.info("  write %.0f MB/s (%.2f GB with fsync)", disk["write"]["bytes_per_s"] / 1e6, probe / 1e9)
    floor = input_bytes / disk["read"]["bytes_per_s"] + output_bytes / disk["write"]["bytes_per_s"]

    out = work_dir / "tau.safetensors"
    runs = []
    for threads in run_args.threads.split(","):
        for repeat in range(run_args.repeats):
            logger.info("extract + save, threads=%s, run %d …", threads, repeat + 1)
            run = measured_run(finetuned, base, out, run_args.dtype, threads)
            run["verified"] = verify(out, finetuned, base, shapes, dtype)
            run["effective_bytes_per_s"] = (input_bytes + output_bytes) / run["wall_s"]
            out.unlink()
            runs.append(run)
            logger.info(
                "  wall %.1f s (user %.1f s, system %.1f s), peak RSS %.2f GiB, %.0f MB/s effective, read %.2f GB",
                run["wall_s"],
                run["user_s"],
                run["system_s"],
                run["peak_rss_bytes"] / GIB,
                run["effective_bytes_per_s"] / 1e6,
                run["io"]["rchar"] / 1e9,
            )
    result = {
        "benchmark": "task vector extract + save (merging.task_vector_from_files + merging.save_task_vector)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "sizes": {
            "keys": len(shapes),
            "parameters": sum(math.prod(s) for s in shapes.values()),
            "input_bytes": input_bytes,
            "output_bytes": output_bytes,
            "output_dtype": run_args.dtype,
        },
        "generation": inputs,
        "disk": disk,
        "disk_floor_s": floor,
        "runs": runs,
        "best": {},
    }
    for threads in run_args.threads.split(","):
        mine = [r for r in runs if r["threads"] == threads]
        result["best"][threads] = {
            "wall_s": min(r["wall_s"] for r in mine),
            "extract_s": min(r["extract_s"] for r in mine),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in mine),
        }
    if run_args.profile:
        logger.info("profiled run (threads=1) …")
        profile_path = work_dir / "extract.prof"
        profiled = measured_run(finetuned, base, out, run_args.dtype, "1", profile_path)
        out.unlink()
        result["profile"] = {"wall_s": profiled["wall_s"], "top_by_tottime": profile_summary(profile_path)}
    return result


def measured_run(finetuned: Path, base: Path, out: Path, dtype: str, threads: str, profile_out=None) -> dict:
    for path in (finetuned, base):
        drop_from_page_cache(path)
    command = [sys.executable, __file__, "--child", str(finetuned), str(base), str(out), "--dtype", dtype]
    if profile_out:
        command += ["--profile-out", str(profile_out)]
    return measured_child(command, threads_environment(threads), threads, "extraction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dm-bench"), help="where the inputs live")
    parser.add_argument("--keys", type=int, default=None, help="only this many SDXL keys (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--relative-delta", type=float, default=0.01, help="finetuned noise / weight scale")
    parser.add_argument("--dtype", default="fp16", help="saved τ dtype")
    parser.add_argument("--threads", default="1,default", help="comma-separated OMP_NUM_THREADS values to run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per thread setting (the best is reported)")
    parser.add_argument("--write-probe-gib", type=float, default=2.0, help="size of the disk write-speed probe")
    parser.add_argument("--profile", action="store_true", help="add a cProfile'd run and its top functions")
    parser.add_argument("--results", type=Path, default=None, help=f"results JSON (default {RESULTS_PATH})")
    parser.add_argument("--cleanup", action="store_true", help="delete the generated inputs afterwards")
    parser.add_argument("--child", nargs=3, metavar=("FINETUNED", "BASE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()

    if options.child:
        child(*options.child, options.dtype, options.profile_out)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = measure(options)
    results_path = options.results or (RESULTS_PATH if options.keys is None else options.work_dir / "results.json")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(result, indent=1) + "\n")
    logger.info("results → %s", results_path)
    if options.cleanup:
        for variant in ("base", "finetuned"):
            Path(result["generation"][variant]["path"]).unlink(missing_ok=True)
    print(MARKDOWN_HEADER)
    for run in result["runs"]:
        print(markdown_row(result, run))


if __name__ == "__main__":
    main()
