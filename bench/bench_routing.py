"""Benchmark: a σ-routed MODEL against the plain MODEL and the two-KSamplerAdvanced recipe (issue 5), on the CPU.

One command::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_routing.py                 # tiny SD1.5 UNet, 20 steps
    .venv/bin/python bench/bench_routing.py --repeats 5 --latent 8            # a quick run

It boots ComfyUI in process on the CPU (every folder it writes redirected to a temporary directory), builds
tiny SD1.5-architecture UNets with the pack's demo builders and times whole sampler calls (euler, cfg 5, the
KSampler path) for these configurations, interleaved round-robin so machine noise hits all alike; a
configuration's time is its best round (the median is recorded too):

- ``plain``: the model A alone;
- ``routed_same``: A routed to itself at a σ boundary (only the router's wrappers added: pure overhead);
- ``routed_ab_resident`` / ``routed_ab_sequential``: A then B (separate modules, the same architecture, so the
  same work per step as ``plain``), in both memory modes;
- ``split_ab``: the two-KSamplerAdvanced recipe A → B at the same step;
- ``routed_clone`` / ``split_clone``: base then base + τ (one shared module, swapped at the boundary) against the
  recipe with the patched model.

It also records how close the routed model is to the recipe (euler: the same maths) and how far a
multistep solver (dpmpp_2m) moves when the recipe restarts it at the boundary. Results go to
``bench/results/routing.json``; a markdown table is printed. The GPU figures (an SD1.5-size UNet, peak VRAM per
memory mode) come from ``bench/gpu_runtime.py``.
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
import time
from datetime import datetime, timezone
from pathlib import Path

from bench_common import boot_comfyui, markdown_against, summarize_against, time_round_robin

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "bench" / "results" / "routing.json"
SEED = 42

logger = logging.getLogger(__name__)


# -- the measured configurations ------------------------------------------------------------------------


class Setup:
    """Models, conditioning and the sampler calls being compared."""

    def __init__(self, steps: int, latent: int, boundary_step: int):
        import torch

        from diffusion_merge.nodes import demo_models, routing
        from diffusion_merge.nodes import task_vectors as tv_nodes

        self.steps, self.boundary_step = steps, boundary_step
        self.latent = {"samples": torch.zeros(1, 4, latent, latent)}
        g = torch.Generator().manual_seed
        self.positive = [[torch.randn(1, 77, 64, generator=g(1)), {}]]
        self.negative = [[torch.randn(1, 77, 64, generator=g(2)), {}]]
        self.a, self.b = demo_models.build_sd15(0), demo_models.build_sd15(1)
        finetuned = demo_models.build_sd15(0, "finetune-a")
        vector = tv_nodes.TaskVectorFromModelsNode.execute(finetuned, self.a).result[0]
        self.patched = tv_nodes.TaskVectorApplyNode.execute(self.a, vector, 1.0).result[0]
        self.routing = routing
        self.boundary = float(self.sigmas()[boundary_step])

    def sigmas(self):
        import comfy.samplers

        return comfy.samplers.calculate_sigmas(self.a.get_model_object("model_sampling"), "normal", self.steps)

    def routed(self, first, second, memory_mode="resident"):
        expert = self.routing.RouteExpertNode.execute
        chain = expert(second, 0.0, "sigma", 0.0, expert(first, self.boundary, "sigma", 0.0, None).result[0])
        return self.routing.RoutedModelNode.execute(chain.result[0], memory_mode).result[0]

    def ksample(self, model, sampler="euler"):
        import nodes

        args = (SEED, self.steps, 5.0, sampler, "normal", self.positive, self.negative, self.latent)
        return nodes.common_ksampler(model, *args)[0]["samples"]

    def split(self, first, second, sampler="euler"):
        import nodes

        advanced = nodes.KSamplerAdvanced()
        common = (SEED, self.steps, 5.0, sampler, "normal", self.positive, self.negative)
        high = advanced.sample(first, "enable", *common, self.latent, 0, self.boundary_step, "enable")[0]
        low = advanced.sample(second, "disable", *common, high, self.boundary_step, 10000, "disable")[0]
        return low["samples"]

    def configurations(self) -> dict:
        same, ab = self.routed(self.a, self.a), self.routed(self.a, self.b)
        ab_sequential, clone = self.routed(self.a, self.b, "sequential"), self.routed(self.a, self.patched)
        return {
            "plain": lambda: self.ksample(self.a),
            "routed_same": lambda: self.ksample(same),
            "routed_ab_resident": lambda: self.ksample(ab),
            "routed_ab_sequential": lambda: self.ksample(ab_sequential),
            "split_ab": lambda: self.split(self.a, self.b),
            "routed_clone": lambda: self.ksample(clone),
            "split_clone": lambda: self.split(self.a, self.patched),
        }


def router_cost(setup: Setup, runs: int = 200, calls: int = 5000) -> dict:
    """The router's own time, without any network: per run (set-up and checks) and per dispatched call.

    Whole-call medians on a shared CPU move by several percent between rounds, more than the router costs;
    timing its code alone gives the overhead it adds to each step and run, independent of that noise.
    """
    import comfy.model_management as mm
    import torch

    from diffusion_merge.merging.sampling.schedules import Boundary
    from diffusion_merge.nodes import routing_runtime as runtime

    experts = (
        runtime.Expert(setup.a, Boundary(setup.boundary, "sigma")),
        runtime.Expert(setup.a, Boundary(0, "sigma")),
    )
    routed, router = runtime.build_routed_model(experts)
    mm.load_models_gpu([routed])
    sigmas = setup.sigmas()
    started = time.perf_counter()
    for _ in range(runs):
        with router.run(routed, sigmas):
            pass
    per_run = (time.perf_counter() - started) / runs
    x = torch.zeros(2, *setup.latent["samples"].shape[1:])
    timesteps = [sigma.reshape(1).expand(2) for sigma in sigmas[:-1]]

    class NoNetwork:
        class_obj = router.primary_module

        def __call__(self, x, *args, **kwargs):
            return x

    no_network = NoNetwork()
    with router.run(routed, sigmas):
        started = time.perf_counter()
        for call in range(calls):
            router.apply_model_wrapper(no_network, x, timesteps[call % len(timesteps)], None, None, None, {})
        per_call = (time.perf_counter() - started) / calls
    return {"per_run_ms": 1000 * per_run, "per_call_us": 1e6 * per_call}


def consistency(setup: Setup) -> dict:
    """How the routed model compares with the recipe: euler (same maths) and dpmpp_2m (history kept vs lost)."""
    ab = setup.routed(setup.a, setup.b)
    euler_routed, euler_split = setup.ksample(ab), setup.split(setup.a, setup.b)
    dpm_routed, dpm_split = setup.ksample(ab, "dpmpp_2m"), setup.split(setup.a, setup.b, "dpmpp_2m")
    return {
        "euler_routed_vs_split_max_abs": (euler_routed - euler_split).abs().max().item(),
        "dpmpp_2m_routed_vs_split_max_abs": (dpm_routed - dpm_split).abs().max().item(),
        "dpmpp_2m_routed_vs_split_relative_rms": ((dpm_routed - dpm_split).norm() / dpm_routed.norm()).item(),
        "dpmpp_2m_output_max_abs": dpm_routed.abs().max().item(),
    }


# -- report ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--latent", type=int, default=16, help="latent side in latent pixels (16 → a 128 px image)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="dm-bench-routing-"))
    try:
        boot_comfyui(work)
        import torch

        setup = Setup(options.steps, options.latent, boundary_step=options.steps // 2)
        times = time_round_robin(setup.configurations(), options.repeats)
        results = {
            "benchmark": "sigma routing, CPU",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "model": "tiny SD1.5-architecture UNet (pack demo builder, model_channels 32)",
            "sampler": "euler, normal scheduler, cfg 5, KSampler path (common_ksampler)",
            "steps": options.steps,
            "latent": [1, 4, options.latent, options.latent],
            "boundary_step": setup.boundary_step,
            "repeats": options.repeats,
            "configurations": summarize_against(times, options.steps, "plain"),
            "router_cost": router_cost(setup),
            "consistency": consistency(setup),
            "gpu": "see bench/gpu_runtime.py (SD1.5 size, peak VRAM per memory mode)",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cost, plain = results["router_cost"], results["configurations"]["plain"]["best_s"]
    cost["estimated_overhead_pct"] = (
        100 * (cost["per_run_ms"] / 1000 + options.steps * cost["per_call_us"] / 1e6) / plain
    )
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(results, indent=2) + "\n")
    extra = {"router_cost": results["router_cost"], "consistency": results["consistency"]}
    sys.stdout.write(markdown_against(results["configurations"], "plain") + "\n\n" + json.dumps(extra, indent=2) + "\n")


if __name__ == "__main__":
    main()
