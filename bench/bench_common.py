"""What the sampler benchmarks share: booting ComfyUI in process, round-robin timing and the SD1.5 UNet config.

Imports nothing heavy (ComfyUI is imported by :func:`boot_comfyui` when called), so the benchmarks and
``scripts/gpu_check.py`` can import it at the top.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# SD1.5's UNet as ComfyUI's model detection gives it (comfy/model_detection.py: 859,520,964 parameters), as
# overrides of the pack's tiny SD1.5 demo builder (nodes/demo_models.build_sd15); randomly initialised there.
SD15_UNET = {
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    # UNetModel pops this list from the END for output blocks 0, 1, …: blocks 0-2 (the 1280-channel level) have
    # no attention, so the zeros go last (reversing it builds another network).
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
    "context_dim": 768,
}


def boot_comfyui(work: Path, cpu: bool = True) -> None:
    """ComfyUI on ``sys.path`` (on the CPU unless ``cpu`` is False) with its writable folders under ``work``; the
    pack imported as ``diffusion_merge``."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import comfy_in_process

    comfyui = Path(os.environ.get("COMFYUI_PATH", ROOT.parent / "shared" / "ComfyUI")).resolve()
    comfy_in_process.boot(comfyui, work, cpu=cpu)
    comfy_in_process.import_pack()


def _no_sync() -> None:
    pass


def device_and_sync() -> tuple:
    """ComfyUI's torch device and a function that waits for it (a no-op on the CPU); call after
    :func:`boot_comfyui`."""
    import comfy.model_management as mm
    import torch

    device = mm.get_torch_device()
    return device, (torch.cuda.synchronize if device.type == "cuda" else _no_sync)


def time_round_robin(
    calls: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = _no_sync
) -> dict[str, list[float]]:
    """Wall seconds of each call over ``repeats`` rounds, every configuration once per round (after a warm-up);
    every other round runs in reverse order, so no configuration always follows the same one. ``sync`` waits for
    the device before and after each call (a GPU's queued work would otherwise land in the next call's time)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for round_index in range(repeats):
        order = list(calls.items())
        for name, call in order if round_index % 2 == 0 else reversed(order):
            sync()
            started = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - started)
    return times


def summarize_against(times: dict[str, list[float]], steps: int, baseline: str) -> dict:
    """Per configuration: best and median wall time, steps/s and the difference to ``baseline`` in % as
    ``vs_<baseline>_pct`` (both from the best time: on a shared machine other processes only ever add time, so
    the minimum is the least disturbed)."""
    best_baseline = min(times[baseline])
    return {
        name: {
            "best_s": min(values),
            "median_s": statistics.median(values),
            "steps_per_s": steps / min(values),
            f"vs_{baseline}_pct": 100 * (min(values) / best_baseline - 1),
            "all_s": values,
        }
        for name, values in times.items()
    }


def markdown_against(configurations: dict, baseline: str) -> str:
    """The table of :func:`summarize_against`'s rows."""
    lines = [f"| configuration | steps/s (best) | time vs {baseline} | median s |", "|---|---|---|---|"]
    for name, row in configurations.items():
        change = row[f"vs_{baseline}_pct"]
        lines.append(f"| {name} | {row['steps_per_s']:.1f} | {change:+.1f} % | {row['median_s']:.3f} |")
    return "\n".join(lines)
