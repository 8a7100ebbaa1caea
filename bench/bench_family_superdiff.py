"""SuperDiff's claims (arXiv 2412.17762) on the mini family: OR (Table 1) and AND (Table 2). One command each::

    OMP_NUM_THREADS=1 nice .venv/bin/python bench/bench_family_superdiff.py or           # ≈ 10 min (load 6)
    OMP_NUM_THREADS=1 nice .venv/bin/python bench/bench_family_superdiff.py and --seeds 5  # ≈ 7 min
    .venv/bin/python bench/bench_family_superdiff.py or --quick                          # seconds (a test runs it)

**OR** (the paper's Table 1: two models trained on disjoint halves of CIFAR-10, composed by OR): our A
(base fine-tuned on garments 0–4) and B (on 5–9), prompted with a colour only (``"red"``, … — the garment is
left open), CFG 4. Compared: A, B and base (all ten garments) through ComfyUI's KSampler (euler, 20 steps);
a per-sample coin flip between A and B (KSampler); SuperDiff OR of A and B (T = 1); the fixed average κ = ½
(SuperDiff's sampler at T = 0, the paper's "averaging" baseline); and base alone through the same SDE sampler
(one component), which separates the sampler's effect from the composition's. Metrics: coverage of the ten
garments (share with ≥ 2 % of the pictures), entropy of the garment histogram, share of pictures in A's half,
and cFID against the whole test split.

**AND** (Table 2: "concept A AND concept B"): "<colour>" AND "<garment>" on base, for six (colour, garment)
pairs. Compared: the joint prompt "a <colour> <garment>" (KSampler), each prompt alone (KSampler), SuperDiff
AND and the fixed average κ = ½ (SuperDiff's sampler). Scores per picture: the garment score is the
classifier's probability of the garment; the colour score is the chroma-weighted share of the garment's
pixels whose hue lies within 30° of the colour's; the paper's metric is the per-picture minimum of the two,
averaged; "both" is the share of pictures whose predicted garment and read colour are both right.

Every SuperDiff configuration runs the SuperDiff KSampler node (DM_SuperDiffKSampler) with SuperDiff
Component nodes, ``--sde-steps`` steps (default 50: it is an SDE estimator); results (mean ± std over
``--seeds``) go to ``bench/results/family_superdiff_{or,and}.json`` with a sample grid beside them.
cFID is the classifier's Fréchet distance, **not Inception FID**.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import family_common as fc

AND_PAIRS = (  # (colour, garment): every colour once, garments from both halves
    ("red", "sneaker"),
    ("blue", "bag"),
    ("green", "dress"),
    ("yellow", "ankle boot"),
    ("magenta", "t-shirt"),
    ("cyan", "trousers"),
)
HUE_TOLERANCE = 30.0  # degrees: half the spacing of the six named hues


# -- OR ------------------------------------------------------------------------------------------------


def or_configurations(family: fc.Family, cfg: float, sde_steps: int) -> dict:
    """name → function(prompt, count, seed) → pictures [count, 3, 32, 32]."""
    a, b, base = family.model("a"), family.model("b"), family.model("base")

    def ksampler(model):
        return lambda prompt, count, seed: family.sample(model, [prompt] * count, seed, cfg=cfg)

    def coin_flip(prompt, count, seed):
        chooses_a = torch.rand(count, generator=torch.Generator().manual_seed(seed + 7919)) < 0.5
        out = torch.empty(count, 3, 32, 32)
        for model, mask in ((a, chooses_a), (b, ~chooses_a)):
            if mask.any():
                out[mask] = family.sample(model, [prompt] * int(mask.sum()), seed + (0 if model is a else 1), cfg=cfg)
        return out

    def superdiff(models, temperature):
        def run(prompt, count, seed):
            chain = fc.components(family, [(m, prompt) for m in models], cfg=cfg)
            return family.decode(fc.superdiff_latents(chain, count, seed, sde_steps, "OR", temperature))

        return run

    return {
        "A": ksampler(a),
        "B": ksampler(b),
        "base": ksampler(base),
        "coin flip A/B": coin_flip,
        "SuperDiff OR (A, B)": superdiff((a, b), 1.0),
        "average κ = ½ (A, B)": superdiff((a, b), 0.0),
        "base, SDE sampler": superdiff((base,), 1.0),
    }


def or_metrics(family: fc.Family, images: torch.Tensor) -> dict:
    predictions = family.predict(images)
    histogram = family.metrics.class_histogram(predictions)
    return {
        "coverage": family.metrics.coverage(predictions),
        "class_entropy": family.metrics.class_entropy(predictions),
        "share_in_A_half": float(histogram[:5].sum()),
        "cfid": family.cfid(images),
        "histogram": histogram.tolist(),
    }


def run_or(args, family: fc.Family) -> dict:
    family.require("a", "b")
    colours = family.data.COLOUR_NAMES[: 2 if args.quick else None]
    per_colour = 2 if args.quick else args.per_colour
    configurations = or_configurations(family, args.cfg, args.sde_steps)
    rows: dict[str, list[dict]] = {name: [] for name in configurations}
    grid_rows = []
    for seed in range(args.seeds):
        for name, draw in configurations.items():
            started = time.monotonic()
            images = torch.cat([draw(c, per_colour, 1000 * seed + 10 * i) for i, c in enumerate(colours)])
            row = or_metrics(family, images)
            row["seconds"] = round(time.monotonic() - started, 1)
            rows[name].append(row)
            fc.log(f"OR seed {seed} {name}: coverage {row['coverage']:.2f}, cFID {row['cfid']:.1f}")
            if seed == 0:
                grid_rows.append(images[torch.arange(len(colours)) * per_colour][: len(colours)])
    floor = fc.real_floor(family, per_colour * len(colours), args.seeds)
    fc.save_grid(fc.grid_path(args), torch.cat(grid_rows), columns=len(colours), row_labels=list(configurations))
    return {
        "mode": "OR",
        "prompts": f"one colour word per group (the garment left open), CFG {args.cfg:g}",
        "pictures_per_configuration_and_seed": per_colour * len(colours),
        "ksampler": f"euler, normal, {fc.STEPS} steps",
        "superdiff": f"DM_SuperDiffKSampler, {args.sde_steps} steps, OR (T = 1; T = 0 is the fixed κ = ½ average)",
        "configurations": {name: {**fc.summarise(r), "per_seed": r} for name, r in rows.items()},
        "real_pictures_floor": floor,
    }


# -- AND -----------------------------------------------------------------------------------------------


def colour_score(family: fc.Family, images: torch.Tensor, colour: int, threshold: float = 0.15) -> torch.Tensor:
    """Per picture, the chroma-weighted share of garment pixels whose hue is within HUE_TOLERANCE of ``colour``."""
    images = images.float().clamp(0, 1)
    high, low = images.amax(dim=1), images.amin(dim=1)
    r, g, b = images.unbind(dim=1)
    hue = torch.rad2deg(torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b)) % 360.0
    weight = (high - low) * (high > threshold)
    target = family.data.COLOUR_HUES[colour]
    close = (((hue - target + 180.0) % 360.0 - 180.0).abs() <= HUE_TOLERANCE).float()
    return (weight * close).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-6)


def and_metrics(family: fc.Family, images: torch.Tensor, garment: int, colour: int) -> dict:
    predictions = family.predict(images)
    class_score = predictions.probabilities[:, garment]
    colour_scores = colour_score(family, images, colour)
    right_class = predictions.classes == garment
    right_colour = family.data.colour_of(images).colour == colour
    return {
        "min_score": float(torch.minimum(class_score, colour_scores).mean()),
        "class_score": float(class_score.mean()),
        "colour_score": float(colour_scores.mean()),
        "both": float((right_class & right_colour).float().mean()),
        "class_right": float(right_class.float().mean()),
        "colour_right": float(right_colour.float().mean()),
    }


def and_configurations(family: fc.Family, cfg: float, sde_steps: int) -> dict:
    """name → function(colour word, garment word, count, seed) → pictures."""
    base = family.model("base")

    def ksampler(text):
        return lambda c, g, count, seed: family.sample(base, [text(c, g)] * count, seed, cfg=cfg)

    def superdiff(mode, temperature):
        def run(c, g, count, seed):
            chain = fc.components(family, [(base, c), (base, g)], cfg=cfg)
            return family.decode(fc.superdiff_latents(chain, count, seed, sde_steps, mode, temperature))

        return run

    def joint_sde(c, g, count, seed):
        chain = fc.components(family, [(base, f"a {c} {g}")], cfg=cfg)
        return family.decode(fc.superdiff_latents(chain, count, seed, sde_steps, "OR", 1.0))

    return {
        "joint prompt": ksampler(lambda c, g: f"a {c} {g}"),
        "joint prompt, SDE sampler": joint_sde,
        "colour prompt alone": ksampler(lambda c, g: c),
        "garment prompt alone": ksampler(lambda c, g: g),
        "average κ = ½": superdiff("OR", 0.0),
        "SuperDiff AND": superdiff("AND", 1.0),
    }


def run_and(args, family: fc.Family) -> dict:
    data = family.data
    per_pair = 2 if args.quick else args.per_pair
    pairs = AND_PAIRS[:2] if args.quick else AND_PAIRS
    configurations = and_configurations(family, args.cfg, args.sde_steps)
    rows: dict[str, list[dict]] = {name: [] for name in configurations}
    grid_rows = []
    for seed in range(args.seeds):
        for name, draw in configurations.items():
            started = time.monotonic()
            per_pair_rows, shown = [], []
            for i, (colour, garment) in enumerate(pairs):
                images = draw(colour, garment, per_pair, 1000 * seed + 10 * i)
                per_pair_rows.append(
                    and_metrics(family, images, data.CLASS_NAMES.index(garment), data.COLOUR_NAMES.index(colour))
                )
                shown.append(images[:2])
            row = {k: sum(r[k] for r in per_pair_rows) / len(per_pair_rows) for k in per_pair_rows[0]}
            row["per_pair"] = per_pair_rows
            row["seconds"] = round(time.monotonic() - started, 1)
            rows[name].append(row)
            fc.log(f"AND seed {seed} {name}: min score {row['min_score']:.3f}, both {row['both']:.3f}")
            if seed == 0:
                grid_rows.append(torch.cat(shown))
    fc.save_grid(fc.grid_path(args), torch.cat(grid_rows), columns=2 * len(pairs), row_labels=list(configurations))
    return {
        "mode": "AND",
        "pairs": [list(p) for p in pairs],
        "pictures_per_pair_and_seed": per_pair,
        "cfg": args.cfg,
        "ksampler": f"euler, normal, {fc.STEPS} steps",
        "superdiff": f"DM_SuperDiffKSampler, {args.sde_steps} steps (AND exact κ system; T = 0 OR = fixed κ = ½)",
        "colour_score": f"chroma-weighted share of garment pixels within {HUE_TOLERANCE:g}° of the colour's hue",
        "configurations": {name: {**fc.summarise(r), "per_seed": r} for name, r in rows.items()},
    }


# -- report --------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    if results["mode"] == "OR":
        lines = [
            "| configuration | coverage of 10 garments | garment entropy (nats) | share in A's half | cFID ↓ |",
            "|---|---|---|---|---|",
        ]
        for name, row in results["configurations"].items():
            lines.append(
                f"| {name} | {fc.fmt(row['coverage'])} | {fc.fmt(row['class_entropy'])} | "
                f"{fc.fmt(row['share_in_A_half'])} | {fc.fmt(row['cfid'], 1)} |"
            )
        lines.append(f"| real pictures (floor at this N) | — | — | — | {fc.fmt(results['real_pictures_floor'], 1)} |")
    else:
        lines = [
            "| configuration | min(garment, colour) score ↑ | both right ↑ | garment right | colour right |",
            "|---|---|---|---|---|",
        ]
        for name, row in results["configurations"].items():
            lines.append(
                f"| {name} | {fc.fmt(row['min_score'], 3)} | {fc.fmt(row['both'], 1, True)} | "
                f"{fc.fmt(row['class_right'], 1, True)} | {fc.fmt(row['colour_right'], 1, True)} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("or", "and"))
    fc.common_arguments(parser, "family_superdiff.json")
    parser.add_argument("--cfg", type=float, default=fc.CFG)
    parser.add_argument("--sde-steps", type=int, default=40, help="SuperDiff sampler steps")
    parser.add_argument("--per-colour", type=int, default=20, help="OR: pictures per colour prompt and seed")
    parser.add_argument("--per-pair", type=int, default=24, help="AND: pictures per (colour, garment) and seed")
    args = parser.parse_args(argv)
    if args.out == fc.RESULTS_DIR / "family_superdiff.json":
        args.out = fc.RESULTS_DIR / f"family_superdiff_{args.mode}.json"
    if args.quick:
        args.seeds, args.sde_steps = min(args.seeds, 1), 4
    run = run_or if args.mode == "or" else run_and
    return fc.run_and_report(args, f"SuperDiff {args.mode.upper()} on the mini family", run, markdown)


if __name__ == "__main__":
    main()
