"""Benchmark: Wan 2.2's two experts as one routed MODEL against the WanMoeKSampler-style chain (issue 18).

One command::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_wan_routing.py              # tiny Wan experts, 20 steps, CPU
    .venv/bin/python bench/bench_wan_routing.py --dry-run                      # seconds: 4 steps, 1 round
    .venv/bin/python bench/bench_wan_routing.py --gpu --dim 1536 --layers 30   # Wan 1.3B-size experts on a GPU

It boots ComfyUI in process (every folder it writes redirected to a temporary directory; on the CPU unless
``--gpu``), builds two Wan-architecture experts with the pack's demo builder (``nodes/demo_models.build_wan``:
ComfyUI's Wan 2.1 network, which Wan 2.2 A14B's experts use, at ``--dim``/``--layers``), puts each behind
ModelSamplingSD3 (shift 8) and runs Wan 2.2's text-to-video recipe (euler, simple, cfg 3.5, the high-noise expert
for σ above 0.875) in these configurations, interleaved round-robin so machine noise hits all alike:

- ``high_only``: the high-noise expert for every step (the floor: the same work per step, no switch);
- ``routed_resident`` / ``routed_sequential``: one KSampler over Route Expert → Route Expert → Route Experts by σ;
- ``chained``: what WanMoeKSampler and ComfyUI's own template do — KSamplerAdvanced (high-noise expert, steps
  0..k, noise added, leftover noise returned), then KSamplerAdvanced (low-noise expert, k..end, no new noise),
  k = the first step whose σ is at most 0.875.

A configuration's time is its best round (the median is recorded too). It also records how far the routed output
is from the chain's: euler must agree to float rounding (the same maths), dpmpp_2m differs because the chain
restarts its history at the switch. Results go to ``bench/results/wan_routing.json`` (``--out``); a markdown table
is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from bench_common import boot_comfyui, device_and_sync, markdown_against, summarize_against, time_round_robin

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "bench" / "results" / "wan_routing.json"
SEED, CFG, SHIFT, BOUNDARY = 42, 3.5, 8.0, 0.875

logger = logging.getLogger(__name__)


class Setup:
    """The two shifted experts, the conditioning, and the sampler calls being compared."""

    def __init__(self, options: argparse.Namespace):
        import torch
        from comfy_extras import nodes_model_advanced

        from diffusion_merge.nodes import demo_models, routing

        self.routing, self.steps = routing, options.steps
        size = {"dim": options.dim, "ffn_dim": 2 * options.dim, "num_heads": max(1, options.dim // 32)}
        size["num_layers"] = options.layers
        shift = nodes_model_advanced.ModelSamplingSD3()
        self.high = shift.patch(demo_models.build_wan(0, "high_noise", **size), SHIFT)[0]
        self.low = shift.patch(demo_models.build_wan(0, "low_noise", **size), SHIFT)[0]
        frames = (options.frames - 1) // 4 + 1
        self.latent = {"samples": torch.zeros(1, 16, frames, options.side // 8, options.side // 8)}
        g = torch.Generator().manual_seed
        width = demo_models.WAN_TINY["text_dim"]
        self.positive = [[torch.randn(1, 77, width, generator=g(1)), {}]]
        self.negative = [[torch.randn(1, 77, width, generator=g(2)), {}]]
        self.switch = self.switch_step()
        self.parameters = sum(p.numel() for p in self.high.model.diffusion_model.parameters())

    def switch_step(self) -> int:
        import comfy.samplers

        sigmas = comfy.samplers.calculate_sigmas(self.high.get_model_object("model_sampling"), "simple", self.steps)
        return next(step for step, sigma in enumerate(sigmas.tolist()) if sigma <= BOUNDARY)

    def routed(self, memory_mode: str):
        expert = self.routing.RouteExpertNode.execute
        first = expert(self.high, BOUNDARY, "sigma", 0.0, None).result[0]
        both = expert(self.low, 0.0, "sigma", 0.0, first).result[0]
        return self.routing.RoutedModelNode.execute(both, memory_mode).result[0]

    def ksample(self, model, sampler: str = "euler"):
        import nodes

        args = (SEED, self.steps, CFG, sampler, "simple", self.positive, self.negative, self.latent)
        return nodes.common_ksampler(model, *args)[0]["samples"]

    def chained(self, sampler: str = "euler"):
        import nodes

        advanced = nodes.KSamplerAdvanced()
        common = (SEED, self.steps, CFG, sampler, "simple", self.positive, self.negative)
        high = advanced.sample(self.high, "enable", *common, self.latent, 0, self.switch, "enable")[0]
        return advanced.sample(self.low, "disable", *common, high, self.switch, 10000, "disable")[0]["samples"]

    def configurations(self) -> dict:
        resident, sequential = self.routed("resident"), self.routed("sequential")
        return {
            "high_only": lambda: self.ksample(self.high),
            "routed_resident": lambda: self.ksample(resident),
            "routed_sequential": lambda: self.ksample(sequential),
            "chained": lambda: self.chained(),
        }

    def consistency(self) -> dict:
        routed = self.routed("resident")
        euler = (self.ksample(routed) - self.chained()).abs()
        dpm_routed, dpm_chained = self.ksample(routed, "dpmpp_2m"), self.chained("dpmpp_2m")
        return {
            "euler_routed_vs_chained_max_abs": euler.max().item(),
            "euler_output_max_abs": self.ksample(routed).abs().max().item(),
            "dpmpp_2m_routed_vs_chained_max_abs": (dpm_routed - dpm_chained).abs().max().item(),
            "dpmpp_2m_routed_vs_chained_relative_rms": ((dpm_routed - dpm_chained).norm() / dpm_routed.norm()).item(),
        }


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dim", type=int, default=128, help="model width (Wan 1.3B: 1536, 14B: 5120)")
    parser.add_argument("--layers", type=int, default=4, help="number of blocks (Wan 1.3B: 30, 14B: 40)")
    parser.add_argument("--side", type=int, default=128, help="video width = height in pixels")
    parser.add_argument("--frames", type=int, default=9, help="video length in frames (4n + 1)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: --cpu)")
    parser.add_argument("--dry-run", action="store_true", help="4 steps, 64×64, 1 frame, one round: checks it runs")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    options = parser.parse_args(argv)
    if options.dry_run:
        options.steps, options.dim, options.layers, options.side, options.frames, options.repeats = 4, 64, 2, 64, 1, 1
    return options


def main(argv: list[str] | None = None) -> dict:
    options = parse_options(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="dm-bench-wan-"))
    try:
        boot_comfyui(work, cpu=not options.gpu)
        import torch

        device, synchronize = device_and_sync()
        setup = Setup(options)
        times = time_round_robin(setup.configurations(), options.repeats, synchronize)
        results = {
            "benchmark": f"Wan 2.2 routed vs chained samplers, {device.type}",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "model": f"Wan 2.1 network (WAN21_T2V), dim {options.dim}, {options.layers} blocks, "
            f"{setup.parameters:,} parameters per expert, fp32",
            "sampler": f"euler, simple scheduler, cfg {CFG}, shift {SHIFT} (ModelSamplingSD3 on each expert)",
            "boundary_sigma": BOUNDARY,
            "switch_step": setup.switch,
            "steps": options.steps,
            "latent": list(setup.latent["samples"].shape),
            "repeats": options.repeats,
            "configurations": summarize_against(times, options.steps, "chained"),
            "consistency": setup.consistency(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_against(results["configurations"], "chained")
    sys.stdout.write(table + "\n\n" + json.dumps(results["consistency"], indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
