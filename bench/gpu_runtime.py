"""GPU benchmark of the pack's runtime (issue 17): σ routing, SuperDiff and range-expert training, one JSON.

On a machine with a GPU (ComfyUI from ``$COMFYUI_PATH``; see ``bench/README.md``)::

    python3 bench/gpu_runtime.py --out "$OUT/runtime"                # SD1.5 size, fp16, about 3 minutes on an H200

and on the CPU, with tiny models, to check that it runs (a test does this)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_runtime.py --dry-run --out /tmp/dm-gpu-runtime

It boots ComfyUI in process (its writable folders in a temporary directory), builds two SD1.5-size UNets in code
(``comfy.supported_models.SD15`` with SD1.5's UNet configuration, 859.5 M parameters, seeded weights scaled by
1/√fan_in, stored in fp16) and a task vector τ (seeded, 1 % of the weights' scale), then measures:

- **routing** (KSampler path, euler, 20 steps, cfg 5, 512², boundary at step 10): ``plain`` (model A);
  ``routed_ab_resident`` / ``routed_ab_sequential`` (A then B, separate modules) and ``routed_ab_exact`` (the
  same, reading σ from the device at every call as the router used to); ``split_ab`` (two KSamplerAdvanced);
  ``routed_clone_resident`` (A then A + τ: a resident weight set), ``routed_clone_sequential`` (the same swapped
  through ComfyUI) and ``split_clone``. Each: best / median of warm runs, and the peak VRAM of a cold run (every
  model unloaded first, so loading is in it) — the memory each mode needs.
- **superdiff** (N = 2 and 3 prompts + one shared negative, cfg 7.5, 20 steps, 512²): the floor (the same N + 1
  conditionings in one batched call per step, their mean driving Euler), SuperDiff OR and AND; ms per step and
  the ratio to the floor.
- **training** (bf16, LoRA rank 8, batch 4, 512², AdamW 1e-4): ours (``plain``, ``consistency``,
  ``consistency_projection``, ``checkpointing``) against ComfyUI's ``TrainLoraNode`` (``plain``,
  ``checkpointing``), each as its node runs; seconds per step = (t(n₂ steps) − t(n₁ steps)) / (n₂ − n₁), which
  cancels each trainer's set-up.

Results go to ``<out>/gpu_runtime.json`` after every section (a run cut short keeps what it measured); a table
is printed last. ``--budget-s`` skips what would not fit (recorded as skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from bench_common import SD15_UNET, boot_comfyui

ROOT = Path(__file__).resolve().parents[1]
SEED = 42

SD15_PARAMETERS = 859_520_964


class Sizes:
    """Everything that differs between the GPU run and the CPU dry run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.unet = {} if dry_run else SD15_UNET  # {}: the pack's tiny SD1.5-architecture UNet
        self.context = 64 if dry_run else 768
        self.latent = 8 if dry_run else 64
        self.steps = 3 if dry_run else 20
        self.boundary_step = 1 if dry_run else 10
        self.repeats = 0 if dry_run else 3  # warm runs after the cold one
        self.train_batch = 2 if dry_run else 4
        self.train_steps = (1, 2) if dry_run else (2, 8)
        self.train_repeats = 1 if dry_run else 2
        self.train_warmup = not dry_run


# -- ComfyUI and the models -------------------------------------------------------------------------------


def boot(work: Path, dry_run: bool) -> None:
    boot_comfyui(work, cpu=dry_run)
    import comfy.utils

    if hasattr(comfy.utils, "set_progress_bar_enabled"):
        comfy.utils.set_progress_bar_enabled(False)


class Device:
    """The device ComfyUI samples on, with synchronisation and peak-memory readings (no-ops on the CPU)."""

    def __init__(self):
        import comfy.model_management as mm
        import torch

        self.torch, self.mm = torch, mm
        self.device = mm.get_torch_device()
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def describe(self) -> str:
        if self.cuda:
            return self.torch.cuda.get_device_name(self.device)
        return f"CPU ({os.cpu_count()} cores, torch threads {self.torch.get_num_threads()})"

    def cold(self) -> None:
        """Nothing loaded, caches emptied: the next call loads what it needs."""
        self.mm.unload_all_models()
        self.mm.soft_empty_cache()
        self.sync()


def seeded_init(module, seed: int, device) -> None:
    """Weights N(0, 1/fan_in), norm scales 1, biases N(0, 0.02²): finite activations in fp16 at any depth.

    Drawn on ``device`` (fast on a GPU) from a seeded generator and copied into the module's storage.
    """
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if param.ndim >= 2:
                fan_in = param[0].numel()
                value = torch.randn(param.shape, generator=generator, device=device) / math.sqrt(fan_in)
            elif name.endswith("bias"):
                value = 0.02 * torch.randn(param.shape, generator=generator, device=device)
            else:
                value = torch.ones(param.shape, device=device)
            param.copy_(value)


def build_unet(sizes: Sizes, seed: int, device):
    """A MODEL: the SD1.5 UNet (or the tiny one in a dry run), weights stored in fp16 (fp32 on the CPU); ``device``
    draws the initial weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    from diffusion_merge.nodes import demo_models

    dtype = torch.float32 if sizes.dry_run else torch.float16
    model_config = comfy.supported_models.SD15({**demo_models.SD15_TINY, **sizes.unet})
    model_config.set_inference_dtype(dtype, None)
    base_model = model_config.get_model({})
    seeded_init(base_model.diffusion_model, seed, device)
    return comfy.model_patcher.ModelPatcher(
        base_model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def seeded_task_vector(model, seed: int, device, scale: float = 0.01):
    """τ: every weight of ``model`` changed by N(0, (scale/√fan_in)²), kept on the CPU in the weights' dtype."""
    import torch

    from diffusion_merge.merging import StoredDeltas, TaskVector

    generator = torch.Generator(device=device).manual_seed(seed)
    deltas = {}
    for name, param in sorted(model.model.diffusion_model.named_parameters()):
        fan_in = param[0].numel() if param.ndim >= 2 else 1
        delta = torch.randn(param.shape, generator=generator, device=device) * (scale / math.sqrt(fan_in))
        deltas[f"diffusion_model.{name}"] = delta.to("cpu", param.dtype)
    return TaskVector(((1.0, StoredDeltas(deltas, "seeded τ")),))


def conditioning(seed: int, width: int):
    import torch

    return [[torch.randn(1, 77, width, generator=torch.Generator().manual_seed(seed)), {}]]


# -- measuring ------------------------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float):
        self.started, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)


def timed(device: Device, call) -> float:
    device.sync()
    started = time.perf_counter()
    call()
    device.sync()
    return time.perf_counter() - started


def measure(device: Device, call, repeats: int) -> dict:
    """A cold run (nothing loaded: its time and peak memory), then ``repeats`` warm runs."""
    device.cold()
    device.reset_peak()
    cold_s = timed(device, call)
    peak = device.peak_gib()
    times = [timed(device, call) for _ in range(repeats)] or [cold_s]
    return {
        "best_s": min(times),
        "median_s": statistics.median(times),
        "all_s": times,
        "cold_s": cold_s,
        "cold_peak_vram_gib": peak,
    }


def run_configurations(device: Device, budget: Budget, configurations: dict, repeats: int, reserve_s: float) -> dict:
    results = {}
    for name, call in configurations.items():
        if budget.left() < reserve_s:
            results[name] = {"skipped": "time budget"}
            continue
        results[name] = measure(device, call, repeats)
        logging.getLogger(__name__).warning("  %s: %.3f s", name, results[name]["best_s"])
    return results


# -- routing ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def forced_choice_mode(mode: str, sampler_name: str = "euler"):
    """Routing reads σ as ``mode`` says for this sampler (``exact``: at every call, as the router used to)."""
    import comfy.samplers

    from diffusion_merge.nodes import routing_runtime

    key = routing_runtime._sampler_key(comfy.samplers.sampler_object(sampler_name))
    learned = routing_runtime._learned_choice_modes
    previous = learned.get(key)
    learned[key] = mode
    try:
        yield
    finally:
        learned.pop(key, None)
        if previous is not None:
            learned[key] = previous


def routing(sizes: Sizes, device: Device, budget: Budget, a, b, vector) -> dict:
    import comfy.samplers
    import torch

    import nodes
    from diffusion_merge.nodes import routing as routing_nodes
    from diffusion_merge.nodes import routing_runtime
    from diffusion_merge.nodes import task_vectors as tv_nodes

    positive, negative = conditioning(1, sizes.context), conditioning(2, sizes.context)
    latent = {"samples": torch.zeros(1, 4, sizes.latent, sizes.latent)}
    steps, step = sizes.steps, sizes.boundary_step
    sigmas = comfy.samplers.calculate_sigmas(a.get_model_object("model_sampling"), "normal", steps)
    boundary = float(sigmas[step])
    patched = tv_nodes.TaskVectorApplyNode.execute(a, vector, 1.0).result[0]

    def routed(first, second, memory_mode):
        expert = routing_nodes.RouteExpertNode.execute
        chain = expert(second, 0.0, "sigma", 0.0, expert(first, boundary, "sigma", 0.0, None).result[0]).result[0]
        return routing_nodes.RoutedModelNode.execute(chain, memory_mode).result[0]

    def ksample(model):
        return nodes.common_ksampler(model, SEED, steps, 5.0, "euler", "normal", positive, negative, latent)[0]

    def split(first, second):
        advanced = nodes.KSamplerAdvanced()
        common = (SEED, steps, 5.0, "euler", "normal", positive, negative)
        high = advanced.sample(first, "enable", *common, latent, 0, step, "enable")[0]
        return advanced.sample(second, "disable", *common, high, step, 10000, "disable")[0]

    ab, ab_sequential = routed(a, b, "resident"), routed(a, b, "sequential")
    clone, clone_sequential = routed(a, patched, "resident"), routed(a, patched, "sequential")

    def exact_ab():
        with forced_choice_mode("exact"):
            return ksample(ab)

    configurations = {
        "plain": lambda: ksample(a),
        "routed_ab_resident": lambda: ksample(ab),
        "routed_ab_exact": exact_ab,
        "routed_ab_sequential": lambda: ksample(ab_sequential),
        "split_ab": lambda: split(a, b),
        "routed_clone_resident": lambda: ksample(clone),
        "routed_clone_sequential": lambda: ksample(clone_sequential),
        "split_clone": lambda: split(a, patched),
    }
    results = run_configurations(device, budget, configurations, sizes.repeats, reserve_s=30)
    plain = results["plain"].get("best_s")
    for row in results.values():
        if "best_s" in row and plain:
            row["vs_plain_pct"] = 100 * (row["best_s"] / plain - 1)
    check = ksample(clone)["samples"]
    sets = routing_runtime.router_of(clone).weight_sets
    return {
        "sampler": f"KSampler path: euler, normal, cfg 5, {steps} steps, boundary at step {step}",
        "latent": list(latent["samples"].shape),
        "configurations": results,
        "clone_weight_set": {"weights_computed": sets.computed_weights, "resident_gib": sets.resident_bytes / 2**30},
        "routed_clone_output_finite": bool(torch.isfinite(check).all()),
    }


# -- SuperDiff ----------------------------------------------------------------------------------------------


def superdiff(sizes: Sizes, device: Device, budget: Budget, model) -> dict:
    import comfy.sample
    import comfy.samplers
    import torch

    from diffusion_merge.merging.sampling import superdiff as sd
    from diffusion_merge.nodes import superdiff_runtime as runtime

    class FloorGuider(comfy.samplers.CFGGuider):
        """The same conditionings in one batched call per step, their mean driving an Euler step."""

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (CFGGuider's signature)
            conds = [self.conds[name] for name in sorted(self.conds)]
            outputs = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
            return torch.stack(outputs).mean(0)

    latent = torch.zeros(1, 4, sizes.latent, sizes.latent)
    noise = comfy.sample.prepare_noise(latent, SEED)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", sizes.steps)
    negative = conditioning(100, sizes.context)
    by_count = {}
    for count in (2, 3):
        prompts = [conditioning(10 + i, sizes.context) for i in range(count)]
        floor = FloorGuider(model)
        floor.inner_set_conds({f"c{i}": c for i, c in enumerate([*prompts, negative])})
        euler = comfy.samplers.sampler_object("euler")
        components = tuple(runtime.Component(model, prompt, negative, 7.5) for prompt in prompts)

        def run(guider, sampler):
            return lambda: guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=SEED)

        configurations = {"batched_call": run(floor, euler)}
        for mode in sd.MODES:
            guider = runtime.SuperDiffGuider(components)
            configurations[f"superdiff_{mode.lower()}"] = run(
                guider, runtime.SuperDiffSampler(sd.SuperDiffSettings(mode=mode))
            )
        results = run_configurations(device, budget, configurations, sizes.repeats, reserve_s=20)
        floor_s = results["batched_call"].get("best_s")
        for row in results.values():
            if "best_s" in row:
                row["ms_per_step"] = 1000 * row["best_s"] / sizes.steps
                if floor_s:
                    row["vs_batched_call"] = row["best_s"] / floor_s
        by_count[str(count)] = {"conditionings_per_step": count + 1, "configurations": results}
    return {"steps": sizes.steps, "latent": list(latent.shape), "cfg": 7.5, "by_components": by_count}


# -- training ---------------------------------------------------------------------------------------------


OURS = {
    "plain": {},
    "consistency": {"consistency_weight": 1.0},
    "consistency_projection": {"consistency_weight": 1.0, "channel_projection": True},
    "checkpointing": {"gradient_checkpointing": True},
}
CORE = {"plain": False, "checkpointing": True}


def train_ours(model, latents, positive, steps: int, batch: int, **extra):
    import torch

    from diffusion_merge.nodes import training

    settings = dict(
        steps=steps,
        batch_size=batch,
        range_min=500.0,
        range_max=1000.0,
        training_dtype="bf16",
        lora_dtype="bf16",
        rank=8,
        learning_rate=1e-4,
        optimizer="AdamW",
        seed=0,
        gradient_checkpointing=False,
    )
    with torch.inference_mode():  # as ComfyUI runs nodes
        return training.TrainRangeExpertLoRANode.execute(model, latents, positive, **(settings | extra)).result


def train_core(model, latents, positive, steps: int, batch: int, checkpointing: bool):
    """ComfyUI's own TrainLoraNode with the same settings (its V1 ``train`` or its V3 ``execute`` with lists)."""
    import torch
    from comfy_extras import nodes_train

    node = nodes_train.TrainLoraNode
    settings = dict(
        batch_size=batch,
        steps=steps,
        grad_accumulation_steps=1,
        learning_rate=1e-4,
        rank=8,
        optimizer="AdamW",
        loss_function="MSE",
        seed=0,
        training_dtype="bf16",
        lora_dtype="bf16",
        algorithm="LoRA",
        gradient_checkpointing=checkpointing,
        existing_lora="[None]",
    )
    with torch.inference_mode():
        if not hasattr(node, "define_schema"):
            return node().train(model, latents, positive, **settings)
        extra = dict(
            quantized_backward=False, checkpoint_depth=1, offloading=False, bucket_mode=False, bypass_mode=False
        )
        arguments = {"model": model, "latents": latents, "positive": positive} | settings | extra
        accepted = inspect.signature(node.execute).parameters
        return node.execute(**{name: [value] for name, value in arguments.items() if name in accepted})


def seconds_per_step(device: Device, train, steps: tuple[int, int], repeats: int, warmup: bool = True) -> dict:
    """(t(n₂) − t(n₁)) / (n₂ − n₁), best of ``repeats`` pairs; the peak VRAM of the n₂ runs."""
    short, long = steps
    if warmup:
        train(short)  # kernels, allocator, lazily made state
    deltas, peaks = [], []
    for _ in range(repeats):
        first = timed(device, lambda: train(short))
        device.reset_peak()
        second = timed(device, lambda: train(long))
        peaks.append(device.peak_gib())
        deltas.append((second - first) / (long - short))
    best = min(deltas)
    return {
        "s_per_step": best,
        "steps_per_s": 1 / best if best > 0 else None,
        "all_s_per_step": deltas,
        "peak_vram_gib": max(peaks) if peaks[0] is not None else None,
    }


def training(sizes: Sizes, device: Device, budget: Budget, model) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    batch = sizes.train_batch
    latents = {"samples": torch.randn(batch, 4, sizes.latent, sizes.latent, generator=generator)}
    positive = conditioning(3, sizes.context)
    runs = {
        f"core_{name}": (lambda n, c=ckpt: train_core(model, latents, positive, n, batch, c))
        for name, ckpt in CORE.items()
    }
    runs |= {
        f"ours_{name}": (lambda n, e=extra: train_ours(model, latents, positive, n, batch, **e))
        for name, extra in OURS.items()
    }
    results = {}
    for name, train in runs.items():
        if budget.left() < 15:
            results[name] = {"skipped": "time budget"}
            continue
        try:
            results[name] = seconds_per_step(device, train, sizes.train_steps, sizes.train_repeats, sizes.train_warmup)
        except (TypeError, AttributeError, RuntimeError) as error:  # a core TrainLoraNode this script cannot drive
            if not name.startswith("core_"):
                raise
            results[name] = {"skipped": f"ComfyUI's TrainLoraNode could not run here: {type(error).__name__}: {error}"}
        logging.getLogger(__name__).warning("  %s: %s", name, results[name])
    core = results.get("core_plain", {}).get("steps_per_s")
    for row in results.values():
        if core and row.get("steps_per_s"):
            row["vs_core_plain"] = row["steps_per_s"] / core
    return {
        "settings": f"LoRA rank 8, AdamW 1e-4, bf16 compute and LoRA, batch {batch}, latents {sizes.latent}², "
        "ours: range timesteps 500-1000, grad clip 1.0 (its defaults)",
        "steps_timed": list(sizes.train_steps),
        "configurations": results,
    }


# -- report -------------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = ["| section | configuration | figure | vs reference | peak VRAM GiB |", "|---|---|---|---|---|"]
    for name, row in results.get("routing", {}).get("configurations", {}).items():
        if "best_s" in row:
            lines.append(
                f"| routing | {name} | {row['best_s']:.3f} s | {row.get('vs_plain_pct', math.nan):+.1f} % | "
                f"{_gib(row['cold_peak_vram_gib'])} |"
            )
    for count, block in results.get("superdiff", {}).get("by_components", {}).items():
        for name, row in block["configurations"].items():
            if "best_s" in row:
                lines.append(
                    f"| superdiff N={count} | {name} | {row.get('ms_per_step', math.nan):.2f} ms/step | "
                    f"{row.get('vs_batched_call', math.nan):.3f}× | {_gib(row['cold_peak_vram_gib'])} |"
                )
    for name, row in results.get("training", {}).get("configurations", {}).items():
        if row.get("steps_per_s"):
            versus = f"{row['vs_core_plain']:.3f}× core" if "vs_core_plain" in row else ""
            lines.append(
                f"| training | {name} | {row['steps_per_s']:.2f} steps/s | {versus} | {_gib(row['peak_vram_gib'])} |"
            )
    return "\n".join(lines)


def _gib(value) -> str:
    return "" if value is None else f"{value:.2f}"


def versions() -> dict:
    import torch

    found = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import comfyui_version

        found["comfyui"] = comfyui_version.__version__
    except ImportError:
        found["comfyui"] = None
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_runtime.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models and sizes: checks that it runs")
    parser.add_argument("--sections", default="routing,superdiff,training")
    parser.add_argument("--budget-s", type=float, default=230.0, help="skip what would not fit in this many seconds")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sizes, budget = Sizes(options.dry_run), Budget(options.budget_s)
    options.out.mkdir(parents=True, exist_ok=True)
    path = options.out / "gpu_runtime.json"
    work = Path(tempfile.mkdtemp(prefix="dm-gpu-runtime-"))
    try:
        boot(work, options.dry_run)
        device = Device()
        results = {
            "benchmark": "runtime: routing, SuperDiff, training (issue 17)",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dry_run": options.dry_run,
            "device": device.describe(),
            "versions": versions(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        }
        a, b = build_unet(sizes, 1, device.device), build_unet(sizes, 2, device.device)
        parameters = sum(p.numel() for p in a.model.diffusion_model.parameters())
        results["model"] = {
            "unet": "tiny SD1.5-architecture (dry run)" if options.dry_run else "SD1.5 (comfy.supported_models.SD15)",
            "parameters": parameters,
            "is_sd15_size": parameters == SD15_PARAMETERS,
            "weights_dtype": str(next(a.model.diffusion_model.parameters()).dtype),
        }
        results["setup_s"] = options.budget_s - budget.left()
        sections = {
            "routing": lambda: routing(sizes, device, budget, a, b, seeded_task_vector(a, 3, device.device)),
            "superdiff": lambda: superdiff(sizes, device, budget, a),
            "training": lambda: training(sizes, device, budget, a),
        }
        failed = []
        for name in options.sections.split(","):
            device.cold()
            try:
                results[name] = sections[name]()
            except Exception:  # keep the other sections' figures; the exit status says something failed
                results[name] = {"error": traceback.format_exc()}
                failed.append(name)
                logging.getLogger(__name__).error("%s failed:\n%s", name, results[name]["error"])
            results["total_s"] = options.budget_s - budget.left()
            path.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.write(table(results) + "\n")
    if failed:
        raise SystemExit(f"sections failed: {', '.join(failed)} (see {path})")
    return results


if __name__ == "__main__":
    main()
