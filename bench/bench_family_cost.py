"""Benchmark: what one training step of each candidate mini-family network costs (issue 16).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_family_cost.py                 # all candidates, CPU
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_family_cost.py --only unet_c64_m11_4x4 vae_c32_32px

One step = forward + backward + AdamW update at batch 64 (UNet; random latents, timesteps and 77×64
context) or batch 32 (VAE; random 32×32 / 64×64 RGB pictures), fp32, one thread. Networks are ComfyUI's own
(``UNetModel`` through ``comfy.supported_models.SD15``, ``AutoencoderKL``), as the family uses them. Each
candidate runs ``--warmup`` + ``--steps`` steps; the best timed step counts (the machine is shared). The load
average before and after is recorded. Results: ``bench/results/family_cost.json`` and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
RESULTS_PATH = ROOT / "bench" / "results" / "family_cost.json"

UNET_BASE = {"num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1]}
UNETS = {
    # name: (config overrides of mini_models.UNET_CONFIG, latent side)
    "unet_c32_m12_4x4": ({"model_channels": 32, "channel_mult": [1, 2]}, 4),
    "unet_c64_m11_4x4": ({"model_channels": 64, "channel_mult": [1, 1]}, 4),  # the CPU family
    "unet_c64_m12_4x4": ({"model_channels": 64, "channel_mult": [1, 2]}, 4),
    "unet_c64_m11_8x8": ({"model_channels": 64, "channel_mult": [1, 1]}, 8),
    "unet_c128_m12_4x4": ({"model_channels": 128, "channel_mult": [1, 2]}, 4),  # the GPU preset
}
VAES = {
    # name: (ddconfig overrides of mini_models.VAE_DDCONFIG, picture side)
    "vae_c32_32px": ({"ch": 32, "ch_mult": [1, 1, 2, 2]}, 32),  # the CPU family
    "vae_c32_1112_32px": ({"ch": 32, "ch_mult": [1, 1, 1, 2]}, 32),
    "vae_c64_32px": ({"ch": 64, "ch_mult": [1, 1, 2, 2]}, 32),
    "vae_c32_64px": ({"ch": 32, "ch_mult": [1, 1, 2, 2], "resolution": 64}, 64),
    "taesd_32px": (None, 32),  # ComfyUI's TAESD architecture (fixed 64 channels)
}
# A pixel-space model would run the UNet on every pixel: 32×32 positions instead of 4×4 (4 channels here as a
# stand-in for 3; the cost is the positions).
UNETS["unet_c64_m11_32x32_pixels"] = ({"model_channels": 64, "channel_mult": [1, 1]}, 32)


def load_average() -> float:
    return os.getloadavg()[0]


def time_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def unet_candidate(mini, torch, overrides: dict, side: int, batch: int):
    patcher = mini.build_unet({**UNET_BASE, **overrides})
    unet = patcher.model.diffusion_model.train()
    for module in unet.modules():
        for base in (torch.nn.Linear, torch.nn.Conv2d):
            if isinstance(module, base):
                base.reset_parameters(module)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = torch.randn(batch, 4, side, side)
    t = torch.rand(batch) * 999
    context = torch.randn(batch, 77, mini.UNET_CONFIG["context_dim"])

    def step():
        loss = unet(x, t, context=context).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in unet.parameters())


def taesd_candidate(torch, side: int, batch: int):
    import comfy.taesd.taesd

    model = comfy.taesd.taesd.TAESD(latent_channels=4).float().train()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.Conv2d.reset_parameters(module)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.rand(batch, 3, side, side)

    def step():
        loss = (model.taesd_decoder(model.taesd_encoder(pixels)) - pixels).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def vae_candidate(mini, torch, overrides: dict, side: int, batch: int):
    vae = mini.without_missing_key_log(mini.build_vae, {}, overrides)
    model = vae.first_stage_model.float().train()
    for module in model.modules():
        for base in (torch.nn.Linear, torch.nn.Conv2d):
            if isinstance(module, base):
                base.reset_parameters(module)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.rand(batch, 3, side, side) * 2 - 1

    def step():
        moments = model.quant_conv(model.encoder(pixels))
        mean, _ = moments.chunk(2, dim=1)
        loss = (model.decode(mean + torch.randn_like(mean)) - pixels).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, help="candidate names (default: all)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--results", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)

    import comfy_in_process

    comfy_in_process.boot(
        Path(os.environ.get("COMFYUI_PATH", ROOT.parent / "shared" / "ComfyUI")), Path(tempfile.mkdtemp())
    )
    import importlib

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    comfy_in_process.import_pack()
    mini = importlib.import_module("diffusion_merge.nodes.mini_models")
    candidates = {**UNETS, **VAES}
    names = args.only or list(candidates)
    rows = {}
    for name in names:
        overrides, side = candidates[name]
        if name in UNETS:
            step, params = unet_candidate(mini, torch, overrides, side, args.unet_batch)
            batch = args.unet_batch
        elif overrides is None:
            step, params = taesd_candidate(torch, side, args.vae_batch)
            batch = args.vae_batch
        else:
            step, params = vae_candidate(mini, torch, overrides, side, args.vae_batch)
            batch = args.vae_batch
        before = load_average()
        times = time_steps(step, args.warmup, args.steps)
        rows[name] = {
            "parameters": params,
            "side": side,
            "batch": batch,
            "best_step_seconds": round(min(times), 4),
            "median_step_seconds": round(sorted(times)[len(times) // 2], 4),
            "load_average_before_after": [round(before, 2), round(load_average(), 2)],
        }
        print(f"| {name} | {params / 1e6:.2f} M | {side} | {batch} | {min(times):.3f} s |", flush=True)
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    results.update(rows)
    results["_machine"] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
