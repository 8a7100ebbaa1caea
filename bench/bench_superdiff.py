"""Benchmark: SuperDiff's per-step cost against one batched network call with the same conditionings (issue 6).

One command (CPU, the tiny SD1.5-architecture UNet; results → ``bench/results/superdiff.json``)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_superdiff.py
    .venv/bin/python bench/bench_superdiff.py --repeats 3 --steps 10          # a quick run

On a GPU machine (an SD1.5-size randomly initialised UNet, fp16, 64×64 latents = 512 px)::

    .venv/bin/python bench/bench_superdiff.py --gpu --size sd15 --latent 64 --out bench/results/superdiff_gpu.json

It boots ComfyUI in process (every folder it writes redirected to a temporary directory), builds one UNet with
the pack's demo builder and N prompts on it sharing one negative (cfg 7.5), so every step evaluates the same
N + 1 conditionings. For N = 2 and N = 3 it times whole sampler calls, interleaved round-robin so machine noise
hits all alike (a configuration's time is its best round; the median is recorded too):

- ``batched_call``: a bench-only guider that evaluates the N + 1 conditionings in ONE ``calc_cond_batch`` call
  per step and takes an Euler step (the floor: the network work SuperDiff cannot avoid);
- ``superdiff_or`` / ``superdiff_and``: the SuperDiff Guider + Sampler (the same single batched call, plus κ, the
  SDE step and every component's Itô update);
- ``superdiff_one_by_one``: SuperDiff with one ``calc_cond_batch`` call per conditioning, as the authors' script
  evaluates its prompts;
- ``one_by_one_call``: the floor guider, one call per conditioning.

Whole-call times on a shared machine wander by several percent, more than SuperDiff adds, so it also measures
SuperDiff's own cost per step directly: the same runs (200 steps) with the network call replaced by a stand-in,
SuperDiff minus the floor guider (``own_cost_ms_per_step``); ``estimated_vs_batched_call`` adds that to the measured
floor. And it times the SuperDiff maths alone (``merging.sampling.superdiff.superdiff_step``) on an SD-size latent
(1, 4, 64, 64). The goal of issue 6 is ``superdiff_* / batched_call ≤ 1.05`` per step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench_common import SD15_UNET, boot_comfyui, device_and_sync, time_round_robin

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "bench" / "results" / "superdiff.json"
SEED = 42

logger = logging.getLogger(__name__)


# -- the measured configurations --------------------------------------------------------------------------


def floor_guider_class(batched: bool):
    """A bench-only GUIDER: the same conditionings per step, no SuperDiff maths (their mean drives an Euler step)."""
    import comfy.samplers
    import torch

    class FloorGuider(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (CFGGuider's signature)
            conds = [self.conds[name] for name in sorted(self.conds)]
            if batched:
                outputs = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
            else:
                outputs = [
                    comfy.samplers.calc_cond_batch(self.inner_model, [c], x, timestep, model_options)[0] for c in conds
                ]
            return torch.stack(outputs).mean(0)

    return FloorGuider


def one_by_one_superdiff_class():
    """The SuperDiff Guider evaluating each conditioning in its own call (the authors' script's pattern)."""
    import comfy.samplers
    import torch

    from diffusion_merge.nodes import superdiff_runtime as runtime

    class OneByOne(runtime.SuperDiffGuider):
        def predict_components(self, x, timestep, model_options, seed=None):
            def one(name):
                return comfy.samplers.calc_cond_batch(self.inner_model, [self.conds[name]], x, timestep, model_options)

            outputs = {name: one(name)[0] for name in self.groups[0].cond_names}
            positives, guided = [], []
            for index in range(len(self.components)):
                positives.append(outputs[self.names[index][0]])
                guided.append(self._guided(index, outputs, self.inner_model, x, timestep, model_options, self.conds))
            return torch.stack(positives), torch.stack(guided)

    return OneByOne


class Setup:
    """One model, N prompts sharing a negative, and the sampler calls being compared."""

    def __init__(self, count: int, steps: int, latent: int, size: str):
        import comfy.model_management as mm
        import comfy.samplers
        import torch

        from diffusion_merge.merging.sampling import superdiff as sd
        from diffusion_merge.nodes import demo_models
        from diffusion_merge.nodes import superdiff_runtime as runtime

        self.runtime, self.sd, self.steps = runtime, sd, steps
        device = mm.get_torch_device()
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        config = SD15_UNET if size == "sd15" else {}
        width = 768 if size == "sd15" else 64
        self.model = demo_models.build_sd15(0, dtype=dtype, **config)
        g = torch.Generator().manual_seed
        self.prompts = [[[torch.randn(1, 77, width, generator=g(i + 1)), {}]] for i in range(count)]
        self.negative = [[torch.randn(1, 77, width, generator=g(100)), {}]]
        self.latent = torch.zeros(1, 4, latent, latent)
        self.sigmas = comfy.samplers.calculate_sigmas(self.model.get_model_object("model_sampling"), "normal", steps)
        self.components = tuple(runtime.Component(self.model, p, self.negative, 7.5) for p in self.prompts)
        self.count = count
        self.parameters = sum(p.numel() for p in self.model.model.diffusion_model.parameters())

    def _run(self, guider, sampler):
        import comfy.sample

        noise = comfy.sample.prepare_noise(self.latent, SEED)
        return guider.sample(noise, self.latent, sampler, self.sigmas, disable_pbar=True, seed=SEED)

    def _floor(self, batched: bool):
        import comfy.samplers

        guider = floor_guider_class(batched)(self.model)
        guider.inner_set_conds({f"c{i}": p for i, p in enumerate([*self.prompts, self.negative])})
        return lambda: self._run(guider, comfy.samplers.sampler_object("euler"))

    def _superdiff(self, mode: str, guider_class=None):
        guider = (guider_class or self.runtime.SuperDiffGuider)(self.components)
        sampler = self.runtime.SuperDiffSampler(self.sd.SuperDiffSettings(mode=mode))
        return lambda: self._run(guider, sampler)

    def configurations(self) -> dict:
        return {
            "batched_call": self._floor(batched=True),
            "superdiff_or": self._superdiff("OR"),
            "superdiff_and": self._superdiff("AND"),
            "superdiff_one_by_one": self._superdiff("OR", one_by_one_superdiff_class()),
            "one_by_one_call": self._floor(batched=False),
        }


def own_cost(count: int, latent: int, size: str, sync, steps: int = 200, rounds: int = 7) -> dict:
    """SuperDiff's own time per step beyond the batched call, in ms: whole runs with ``calc_cond_batch`` replaced by
    a stand-in (no network), SuperDiff minus the floor guider. Whole-call timings on a shared machine wander by
    more than this cost; without the network it is measured to a few µs."""
    import comfy.samplers

    original = comfy.samplers.calc_cond_batch
    # a different output per conditioning, so AND's system stays regular as with a real network
    comfy.samplers.calc_cond_batch = lambda model, conds, x, *args, **kwargs: [
        0.9 * x.roll(i, -1) for i in range(len(conds))
    ]
    runtime_logger = logging.getLogger("diffusion_merge.nodes.superdiff_runtime")
    level, runtime_logger.level = runtime_logger.level, logging.ERROR  # the stand-in's κ systems may be singular
    try:
        setup = Setup(count, steps, latent, size)
        times = time_round_robin(setup.configurations(), rounds, sync)
    finally:
        comfy.samplers.calc_cond_batch = original
        runtime_logger.setLevel(level)
    floor = min(times["batched_call"])
    return {name: 1000 * (min(values) - floor) / steps for name, values in times.items() if name != "batched_call"}


def maths_cost(count: int, latent: int, device, calls: int = 200) -> dict:
    """The SuperDiff maths alone per step (scores, noise, κ, SDE step, Itô updates) on a (1, 4, latent, latent)
    latent, for OR and AND, in ms."""
    import torch

    from diffusion_merge.merging.sampling import superdiff as sd

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent, latent, generator=g).to(device)
    denoised = torch.randn(count, 1, 4, latent, latent, generator=g).to(device)
    generator = sd.noise_generator(0)
    out = {}
    for mode in sd.MODES:
        settings = sd.SuperDiffSettings(mode=mode)
        log_density = torch.zeros(1, count, dtype=sd.scalar_dtype(device), device=device)
        c = sd.step_coefficients("ve", 2.0, 1.9)
        started = time.perf_counter()
        for _ in range(calls):
            scores = sd.score_from_denoised(x, denoised, 2.0, "ve")
            noise = sd.draw_noise(generator, x)
            result = sd.superdiff_step(x, scores, scores, noise, log_density, c, settings, (0.0,) * count)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[mode] = 1000 * (time.perf_counter() - started) / calls
        del result
    return out


# -- report ---------------------------------------------------------------------------------------------------


def summarize(times: dict[str, list[float]], steps: int) -> dict:
    floor = min(times["batched_call"])
    return {
        name: {
            "best_s": min(values),
            "median_s": statistics.median(values),
            "per_step_ms": 1000 * min(values) / steps,
            "vs_batched_call": min(values) / floor,
            "all_s": values,
        }
        for name, values in times.items()
    }


def markdown(results: dict) -> str:
    lines = [
        "| N | conditionings / step | configuration | ms / step (best) | × batched call | median s |",
        "|---|---|---|---|---|---|",
    ]
    for count, block in results["by_components"].items():
        for name, row in block["configurations"].items():
            lines.append(
                f"| {count} | {block['conditionings_per_step']} | {name} | {row['per_step_ms']:.2f} | "
                f"{row['vs_batched_call']:.3f} | {row['median_s']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--latent", type=int, default=16, help="latent side (16 → 128 px; 64 → 512 px)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--components", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny", help="tiny demo UNet or SD1.5-size")
    parser.add_argument("--gpu", action="store_true", help="let ComfyUI pick the GPU (default: --cpu)")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="dm-bench-superdiff-"))
    try:
        boot_comfyui(work, cpu=not options.gpu)
        import torch

        device, sync = device_and_sync()
        by_components = {}
        for count in options.components:
            setup = Setup(count, options.steps, options.latent, options.size)
            times = time_round_robin(setup.configurations(), options.repeats, sync)
            configurations = summarize(times, options.steps)
            extra = own_cost(count, options.latent, options.size, sync)
            floor_ms = configurations["batched_call"]["per_step_ms"]
            by_components[str(count)] = {
                "conditionings_per_step": count + 1,
                "configurations": configurations,
                "own_cost_ms_per_step": extra,
                "estimated_vs_batched_call": {name: 1 + ms / floor_ms for name, ms in extra.items()},
                "maths_only_ms_per_step_latent_64": maths_cost(count, 64, device),
            }
        results = {
            "benchmark": f"SuperDiff per step, {device.type}",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "model": f"{options.size} SD1.5-architecture UNet, random weights ({setup.parameters:,} parameters)",
            "sampling": "normal scheduler, N prompts on one model + 1 shared negative, cfg 7.5",
            "steps": options.steps,
            "latent": [1, 4, options.latent, options.latent],
            "repeats": options.repeats,
            "by_components": by_components,
            "gpu": None
            if options.gpu
            else "pending: not run (no GPU in this task); run with --gpu --size sd15 --latent 64 on a GPU machine",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(results, indent=2) + "\n")
    extra = {
        count: {key: block[key] for key in ("own_cost_ms_per_step", "estimated_vs_batched_call")}
        for count, block in by_components.items()
    }
    sys.stdout.write(f"{markdown(results)}\n\n{json.dumps(extra, indent=2)}\n")


if __name__ == "__main__":
    main()
