"""Benchmark: range-expert LoRA training speed, with and without DeMe's consistency loss (issue 7).

One command per setting::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_training.py                           # tiny SD1.5 UNet, CPU
    .venv/bin/python bench/bench_training.py --device cuda --model sd15 --batch 4 --latent 64 --dtype bf16
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_training.py --ablation                # DeMe's tricks (tiny, CPU)

It boots ComfyUI in process (every folder it writes redirected to a temporary directory), builds an
SD1.5-architecture UNet with the pack's demo builder — ``tiny`` (model_channels 32, one level) or ``sd15``
(the real SD1.5 UNet configuration, 860 M parameters, seeded random weights) — and trains range-expert LoRAs
through the trainer node's own code path on random latents. Configurations (same data, range, seed):

- ``plain``: range LoRA, x0 loss;
- ``consistency``: + the consistency loss (weight 1), i.e. one extra forward of the frozen base per step;
- ``consistency_projection``: + DeMe's channel projections;
- ``checkpointing``: ``plain`` with gradient checkpointing.

Each run trains ``--warmup`` + ``--steps`` optimiser steps; its speed is the timed steps over the sum of their
wall times, read from the trainer's own per-step log (the loss read-back synchronises the device each step).
Runs are interleaved round-robin, ``--repeats`` times; the best run counts (the median is recorded too).

``--ablation`` instead trains DeMe's ablation settings (range only; + projection; + global sampling and the
consistency loss; all three) for a low-noise and a high-noise expert on images a tiny "fine-tune" painted, and
reports the held-out ε-loss inside the expert's range and over the whole schedule. On a toy model this is a
proxy, not the paper's FID.

Results are merged into ``bench/results/training.json`` under ``<device>/<model>`` (or ``ablation``), so CPU and
GPU runs accumulate in one file; a markdown table is printed.
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
from datetime import datetime, timezone
from pathlib import Path

from bench_common import SD15_UNET, boot_comfyui

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "bench" / "results" / "training.json"

CONFIGURATIONS = {
    "plain": {},
    "consistency": {"consistency_weight": 1.0},
    "consistency_projection": {"consistency_weight": 1.0, "channel_projection": True},
    "checkpointing": {"gradient_checkpointing": True},
}
ABLATION = {
    "range only": {},
    "+ projection": {"channel_projection": True},
    "+ p 0.3 + consistency": {"global_probability": 0.3, "consistency_weight": 1.0},
    "+ all three": {"global_probability": 0.3, "consistency_weight": 1.0, "channel_projection": True},
}
ABLATION_RANGES = {"low noise (t 0-250)": (0, 250), "high noise (t 750-1000)": (750, 1000)}

logger = logging.getLogger(__name__)


def build_model(name: str, seed: int = 0, variant: str = "base"):
    from diffusion_merge.nodes import demo_models

    return demo_models.build_sd15(seed, variant, **(SD15_UNET if name == "sd15" else {}))


def train(model, latents, positive, **settings):
    """The trainer node's execute, as ComfyUI runs it (inference mode); returns its outputs."""
    import torch

    from diffusion_merge.nodes import training

    with torch.inference_mode():
        return training.TrainRangeExpertLoRANode.execute(model, latents, positive, **settings).result


# -- speed ----------------------------------------------------------------------------------------------


def speed(options) -> dict:
    import torch

    model = build_model(options.model)
    generator = torch.Generator().manual_seed(0)
    side, context = options.latent, 768 if options.model == "sd15" else 64
    latents = {"samples": torch.randn(max(options.batch, 4), 4, side, side, generator=generator)}
    positive = [[torch.randn(1, 77, context, generator=generator), {}]]
    common = dict(
        steps=options.warmup + options.steps,
        batch_size=options.batch,
        learning_rate=1e-4,
        range_min=500.0,
        range_max=1000.0,
        training_dtype=options.dtype,
        lora_dtype=options.dtype,
        gradient_checkpointing=False,
        rank=16,
    )
    per_step: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
    for round_index in range(options.repeats):
        order = list(CONFIGURATIONS.items())
        for name, extra in order if round_index % 2 == 0 else reversed(order):
            log = train(model, latents, positive, **(common | extra))[2]
            per_step[name].append(options.steps / sum(log["step_seconds"][options.warmup :]))
    best_plain = max(per_step["plain"])
    rows = {
        name: {
            "steps_per_s": max(values),
            "median_steps_per_s": statistics.median(values),
            "time_vs_plain_pct": 100 * (best_plain / max(values) - 1),
            "samples_per_s": max(values) * options.batch,
            "all_steps_per_s": values,
        }
        for name, values in per_step.items()
    }
    return {
        "model": options.model,
        "parameters": sum(p.numel() for p in model.model.diffusion_model.parameters()),
        "device": describe_device(options.device),
        "batch": options.batch,
        "latent": [options.batch, 4, side, side],
        "dtype": options.dtype,
        "timed_steps": options.steps,
        "warmup_steps": options.warmup,
        "repeats": options.repeats,
        "configurations": rows,
    }


def describe_device(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


# -- ablation -------------------------------------------------------------------------------------------


def painted_latents(count: int, seed: int):
    """Images a tiny 'fine-tune' paints (20 euler steps, cfg 1): the data the experts learn from."""
    import comfy.sample
    import torch

    painter = build_model("tiny", 0, "finetune-d")
    generator = torch.Generator().manual_seed(seed)
    cond = [[torch.randn(1, 77, 64, generator=generator), {}]]
    latent = torch.zeros(count, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(
        painter, noise, 20, 1.0, "euler", "normal", cond, cond, latent, seed=seed, disable_pbar=True
    )
    return samples, cond


def held_out_eps_loss(model, latents, cond, low: float, high: float, seed: int = 7) -> float:
    """ε-MSE of ``model`` on held-out latents at 8 fixed normalised times in [low, high], fixed noise."""
    import comfy.model_management as mm
    import torch

    mm.load_models_gpu([model])
    base = model.model
    sampling = model.get_model_object("model_sampling")
    x0 = base.process_latent_in(latents)
    times = torch.linspace(low, high, 10)[1:-1]
    generator = torch.Generator().manual_seed(seed)
    losses = []
    options = model.model_options.get("transformer_options", {})
    with torch.no_grad():
        for time in times.tolist():
            sigma = torch.full((x0.shape[0],), max(sampling.percent_to_sigma(1 - time), float(sampling.sigma_min)))
            noise = torch.randn(x0.shape, generator=generator)
            noisy = sampling.noise_scaling(sigma, noise, x0)
            context = cond[0][0].expand(x0.shape[0], -1, -1)
            denoised = base.apply_model(noisy, sigma, c_crossattn=context, transformer_options=options)
            losses.append((((denoised - x0) / sigma.view(-1, 1, 1, 1)) ** 2).mean().item())
    return sum(losses) / len(losses)


def ablation(options) -> dict:
    train_latents, cond = painted_latents(8, seed=1)
    held_out, _ = painted_latents(8, seed=2)
    base = build_model("tiny")
    results = {}
    for range_name, (low_t, high_t) in ABLATION_RANGES.items():
        low, high = low_t / 999, min(high_t / 999, 1.0)
        rows = {"base model": _ablation_row(base, held_out, cond, low, high)}
        for name, extra in ABLATION.items():
            settings = dict(
                steps=options.ablation_steps,
                batch_size=4,
                learning_rate=3e-3,
                range_min=float(low_t),
                range_max=float(high_t),
                antithetic=True,
                loss_space="eps/v",
                training_dtype="fp32",
                lora_dtype="fp32",
                gradient_checkpointing=False,
                seed=0,
            )
            trained = train(base, {"samples": train_latents}, cond, **(settings | extra))[0]
            rows[name] = _ablation_row(trained, held_out, cond, low, high)
        results[range_name] = rows
    return {
        "model": "tiny SD1.5-architecture UNet; data: 8 images painted by its 'finetune-d' variant (held out: 8 more)",
        "steps": options.ablation_steps,
        "settings": "batch 4, AdamW lr 3e-3, rank 8, ε loss, antithetic, seed 0",
        "metric": "held-out ε-MSE at 8 fixed times inside the range, and over the whole schedule",
        "results": results,
    }


def _ablation_row(model, latents, cond, low: float, high: float) -> dict:
    return {
        "in_range_eps_mse": held_out_eps_loss(model, latents, cond, low, high),
        "whole_schedule_eps_mse": held_out_eps_loss(model, latents, cond, 0.0, 1.0),
    }


# -- report ---------------------------------------------------------------------------------------------


def markdown(key: str, run: dict) -> str:
    if key == "ablation":
        lines = ["| range | setting | held-out ε-MSE in range | over the whole schedule |", "|---|---|---|---|"]
        for range_name, rows in run["results"].items():
            for name, row in rows.items():
                lines.append(
                    f"| {range_name} | {name} | {row['in_range_eps_mse']:.4f} | {row['whole_schedule_eps_mse']:.4f} |"
                )
        return "\n".join(lines)
    lines = [f"{key}: {run['device']}, batch {run['batch']}, latent {run['latent'][-1]}², {run['dtype']}", ""]
    lines += ["| configuration | steps/s (best) | time vs plain | median steps/s |", "|---|---|---|---|"]
    for name, row in run["configurations"].items():
        lines.append(
            f"| {name} | {row['steps_per_s']:.2f} | {row['time_vs_plain_pct']:+.1f} % | "
            f"{row['median_steps_per_s']:.2f} |"
        )
    return "\n".join(lines)


def save(key: str, run: dict, path: Path) -> None:
    import torch

    results = json.loads(path.read_text()) if path.is_file() else {"benchmark": "range-expert LoRA training"}
    run = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "torch": torch.__version__,
        **run,
    }
    results.setdefault("runs", {})[key] = run
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=16, help="latent side (64 = a 512 px image)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ablation", action="store_true", help="DeMe's ablation instead of the speed runs")
    parser.add_argument("--ablation-steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")

    work = Path(tempfile.mkdtemp(prefix="dm-bench-training-"))
    try:
        boot_comfyui(work, cpu=options.device == "cpu")
        import comfy.utils

        comfy.utils.PROGRESS_BAR_ENABLED = False
        key = "ablation" if options.ablation else f"{options.device}/{options.model}"
        run = ablation(options) if options.ablation else speed(options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save(key, run, options.out)
    sys.stdout.write(markdown(key, run) + "\n")


if __name__ == "__main__":
    main()
