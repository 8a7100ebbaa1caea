"""CLTS / MDLRC ("Towards Faster Training of Diffusion Models", arXiv 2404.07946) on the mini family: training
steps to reach a fixed cFID with and without. One command::

    OMP_NUM_THREADS=1 nice .venv/bin/python bench/bench_family_clts.py  # ≈ 11 min (+ encoding the training set once)
    .venv/bin/python bench/bench_family_clts.py --quick                     # seconds (the test runs it)

The paper trains diffusion models from scratch and reports ≈ 2× fewer steps to the same FID with its timestep
curriculum (CLTS) and momentum decay with learning-rate compensation (MDLRC). What fits this CPU is a short
training run through the pack's own trainer (DM_TrainRangeExpertLoRA) with the pack's own schedules
(DM_TimestepCurriculum and DM_MomentumDecay at their defaults — documented reconstructions, the paper's formulas
are not public): a rank-8 LoRA of base over all timesteps (0–1000) that teaches base's *unconditional* prompt
(``""``) to draw footwear only (sandal, sneaker, ankle boot: 4096 training latents, captioned ``""``), AdamW,
lr 10⁻³, batch 32, ε loss, fp32, 240 steps (2 seeds) — the same for every configuration:

- **uniform** timesteps, constant β₁ (the baseline);
- **CLTS** (curriculum), **MDLRC** (momentum decay), **CLTS + MDLRC**.

Every ``--every`` steps the LoRA is copied (a bench-side hook on the trainer's optimiser step; the run itself is
untouched) and, after training, base + that LoRA draws ``--samples`` unconditional pictures (CFG 1, euler 20 steps,
ComfyUI's KSampler path), scored by cFID against the footwear pictures of the test split. "Steps to reach" a
cFID is read off each run's curve (first crossing, linear between checkpoints) for three fixed targets: half way,
90 % and all the way from base's cFID to the uniform run's final cFID, per seed (paired: the same evaluation
noise at every checkpoint of a seed; the table gives each seed's steps). cFID is the classifier's Fréchet
distance, **not Inception FID**.
Scale: a LoRA fine-tune of a 1.7 M-parameter model, not the paper's training from scratch — read the result as
"at this scale", not as a test of the paper.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import family_common as fc

FOOTWEAR = (5, 7, 9)
CONFIGURATIONS = {  # name → (curriculum, momentum decay)
    "uniform": (False, False),
    "CLTS": (True, False),
    "MDLRC": (False, True),
    "CLTS + MDLRC": (True, True),
}


@contextlib.contextmanager
def checkpoints(every: int, store: dict):
    """While active, the range-expert trainer's adapters are copied into ``store[step]`` every ``every`` steps."""
    runtime = fc.pack("nodes.training_runtime")
    original = runtime.RangeExpertTrainer._optimizer_step

    def step_and_copy(self, step, *args, **kwargs):
        original(self, step, *args, **kwargs)
        if (step + 1) % every == 0:
            store[step + 1] = {k: v.detach().float().cpu().clone() for k, v in self.lora.items()}

    runtime.RangeExpertTrainer._optimizer_step = step_and_copy
    try:
        yield store
    finally:
        runtime.RangeExpertTrainer._optimizer_step = original


def footwear_dataset(family: fc.Family, count: int, quick: bool, seed: int = 0):
    """``count`` footwear latents (VAE space) captioned "" (the unconditional prompt)."""
    if quick:  # freshly encoded: no training-set encoding in the quick run
        split = family.data.coloured_split("train", seed=seed, limit=400).subset(FOOTWEAR)
        samples = family.vae.encode(split.images[:count].movedim(1, -1))
    else:
        latents = fc.training_latents(family, seed).subset(FOOTWEAR)
        chosen = torch.randperm(latents.latents.shape[0], generator=torch.Generator().manual_seed(seed + 30))[:count]
        samples = latents.latents[chosen] / fc.latent_scale()
    empty = family.encode("")[0][0]
    return {"samples": samples}, [[empty, {}] for _ in range(samples.shape[0])]


def train(family: fc.Family, dataset, config: tuple[bool, bool], args, seed: int) -> tuple[dict, dict]:
    """One training run; returns ({step: LoRA}, the trainer's log summary)."""
    curriculum = fc.node("DM_TimestepCurriculum").execute().result[0] if config[0] else None
    momentum = fc.node("DM_MomentumDecay").execute().result[0] if config[1] else None
    samples, positive = dataset
    store: dict = {}
    started = time.monotonic()
    with checkpoints(args.every, store):
        output = fc.node("DM_TrainRangeExpertLoRA").execute(
            family.model("base"), samples, positive, range_unit="timestep", range_min=0.0, range_max=1000.0,
            loss_space="eps/v", steps=args.steps, batch_size=args.batch, learning_rate=args.lr, rank=8, seed=seed,
            training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False, grad_clip=1.0,
            curriculum=curriculum, momentum_decay=momentum,
        )  # fmt: skip
    loss_log = output.result[2]
    losses = loss_log["loss"]
    tail = max(1, len(losses) // 10)
    summary = {
        "train_seconds": round(time.monotonic() - started, 1),
        "loss_first_last_10pct": [sum(losses[:tail]) / tail, sum(losses[-tail:]) / tail],
    }
    return store, summary


def cfid_of(family: fc.Family, lora: dict | None, count: int, seed: int) -> float:
    import comfy.sd

    model = family.model("base")
    if lora is not None:
        model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    images = family.sample(model, [""] * count, seed, cfg=1.0)
    return family.cfid(images, FOOTWEAR), images


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the curve reaches ``target`` (linear between checkpoints); None if it never does."""
    for (s0, v0), (s1, v1) in itertools.pairwise(curve):
        if v1 <= target:
            return float(s1) if v0 == v1 else s0 + (s1 - s0) * (v0 - target) / (v0 - v1)
    return None


GAINS = {"50 %": 0.5, "90 %": 0.9, "100 %": 1.0}  # shares of the uniform run's gain over base


def seed_targets(start_values: list[float], uniform_runs: list[dict]) -> list[dict]:
    """Per seed, the cFID targets base + share × (uniform's final − base): paired, because each seed's pictures
    are drawn from the same noise at every checkpoint, and cFID's level moves far more between seeds (N = 64)
    than between configurations."""
    targets = []
    for run in uniform_runs:
        base, final = start_values[run["seed"]], run["curve"][-1][1]
        targets.append({label: base + share * (final - base) for label, share in GAINS.items()})
    return targets


def run(args, family: fc.Family) -> dict:
    dataset = footwear_dataset(family, args.images, args.quick)
    start_values = []
    for seed in range(args.seeds):
        value, _ = cfid_of(family, None, args.samples, 1000 + seed)
        start_values.append(value)
    chosen = {name: CONFIGURATIONS[name] for name in args.configurations}
    runs: dict[str, list[dict]] = {name: [] for name in chosen}
    last_images = {}
    for seed in range(args.seeds):
        for name, config in chosen.items():
            store, summary = train(family, dataset, config, args, seed)
            curve = [(0, start_values[seed])]
            for step in sorted(store):
                value, images = cfid_of(family, store[step], args.samples, 1000 + seed)
                curve.append((step, value))
            if seed == 0:
                last_images[name] = images
            runs[name].append({"seed": seed, "curve": curve, **summary})
            fc.log(f"CLTS seed {seed} {name}: " + ", ".join(f"{s}: {v:.0f}" for s, v in curve))
    targets = seed_targets(start_values, runs.get("uniform") or next(iter(runs.values())))
    summary = {}
    for name, seed_runs in runs.items():
        summary[name] = {
            "final_cfid": fc.mean_std([r["curve"][-1][1] for r in seed_runs]),
            "mean_cfid_over_checkpoints": fc.mean_std(
                [sum(v for _, v in r["curve"][1:]) / max(1, len(r["curve"]) - 1) for r in seed_runs]
            ),
        }
        for label in GAINS:
            reached = [steps_to_reach(r["curve"], targets[r["seed"]][label]) for r in seed_runs]
            summary[name][f"steps to {label}"] = reached
    pictures = torch.cat([images[: min(10, len(images))] for images in last_images.values()])
    fc.save_grid(fc.grid_path(args), pictures, columns=min(10, args.samples), row_labels=list(last_images))
    return {
        "task": "LoRA of base over timesteps 0-1000 teaching the empty prompt to draw footwear (classes 5, 7, 9)",
        "training": {
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "rank": 8,
            "optimizer": "AdamW",
            "loss_space": "eps/v",
            "images": int(dataset[0]["samples"].shape[0]),
            "checkpoint_every": args.every,
            "curriculum": "DM_TimestepCurriculum defaults",
            "momentum_decay": "DM_MomentumDecay defaults (rex)",
        },
        "evaluation": f"{args.samples} unconditional pictures per checkpoint, CFG 1, KSampler euler {fc.STEPS} steps, "
        "cFID vs the test split's footwear",
        "base_cfid": fc.mean_std(start_values),
        "targets": targets,
        "runs": runs,
        "summary": summary,
        "real_pictures_floor": fc.real_floor(family, args.samples, args.seeds, FOOTWEAR),
    }


def markdown(results: dict) -> str:
    def steps(values):
        shown = ["never" if v is None else f"{v:.0f}" for v in values]
        return " / ".join(shown)

    labels = list(GAINS)
    head = " | ".join(f"steps to {k} of uniform's gain ↓" for k in labels)
    lines = [
        f"| configuration | {head} | final cFID ↓ | mean cFID over checkpoints ↓ |",
        "|---|" + "---|" * (len(labels) + 2),
    ]
    for name, row in results["summary"].items():
        cells = " | ".join(steps(row[f"steps to {k}"]) for k in labels)
        lines.append(
            f"| {name} | {cells} | {fc.fmt(row['final_cfid'], 0)} | {fc.fmt(row['mean_cfid_over_checkpoints'], 0)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fc.common_arguments(parser, "family_clts.json", seeds=2)
    parser.add_argument("--steps", type=int, default=240, help="training steps per run")
    parser.add_argument("--every", type=int, default=20, help="checkpoint (cFID) every N steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--images", type=int, default=4096, help="training latents")
    parser.add_argument("--samples", type=int, default=64, help="pictures per checkpoint")
    parser.add_argument(
        "--configurations", nargs="+", choices=list(CONFIGURATIONS), default=list(CONFIGURATIONS), help="which runs"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.every, args.batch, args.images, args.samples = 1, 4, 2, 4, 32, 6
    return fc.run_and_report(args, "CLTS / MDLRC on the mini family: steps to a fixed cFID", run, markdown)


if __name__ == "__main__":
    main()
