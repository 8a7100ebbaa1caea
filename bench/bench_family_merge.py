"""Merging methods on the mini family's class-group fine-tunes: does one merged model do every group's job?

One command::

    OMP_NUM_THREADS=1 nice .venv/bin/python bench/bench_family_merge.py            # ≈ 7 min on the shared CPU
    .venv/bin/python bench/bench_family_merge.py --quick                            # seconds (the test runs it)

The three fine-tunes of base on disjoint garment groups — ``tops`` (t-shirt, pullover, coat, shirt),
``footwear`` (sandal, sneaker, ankle boot) and ``bags-trousers-dresses`` — give three task vectors
(DM_TaskVectorFromModels), stacked with weight 1 (DM_TaskVectorStack) and merged onto base by each method's node
with its defaults: task arithmetic (DM_MergeTaskArithmetic, λ = 1 and the plain average λ = ⅓), TIES
(DM_MergeTIES, k = 0.2, whole-model and per-tensor top-k), DARE (DM_MergeDARE, p = 0.9, rescaled),
Localize-and-Stitch (DM_MergeLocalizeAndStitch, k = 0.05) and DRM (DM_MergeDRM, drop 0.8, vertical).

Every model draws ``--per-class`` pictures of each of the ten garments ("a <colour> <garment>", CFG 4, euler 20
steps through ComfyUI's KSampler path). Per garment group: the classifier's accuracy on the prompted garment and
cFID against the test pictures of that group; and over all ten. A merge does its job when each group's numbers
match the fine-tune made for that group. cFID is the classifier's Fréchet distance, **not Inception FID**; at
these sample sizes it carries a large small-sample bias, shown by the real-pictures row (same N).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import family_common as fc

GROUPS = ("tops", "footwear", "bags-trousers-dresses")


def merged_models(family: fc.Family) -> dict:
    """name → MODEL: the merges of the three group fine-tunes onto base, through the pack's nodes."""
    base = family.model("base")
    stack = None
    for name in GROUPS:
        vector = fc.node("DM_TaskVectorFromModels").execute(family.model(name), base).result[0]
        stack = fc.node("DM_TaskVectorStack").execute(vector, 1.0, stack).result[0]
    recipes = {
        "TA (λ = 1)": (fc.node("DM_MergeTaskArithmetic"), {"lam": 1.0}),
        "TA (λ = ⅓, average)": (fc.node("DM_MergeTaskArithmetic"), {"lam": 1.0 / 3.0}),
        "TIES (k = 0.2, global)": (fc.node("DM_MergeTIES"), {"k": 0.2, "topk_scope": "global"}),
        "TIES (k = 0.2, per tensor)": (fc.node("DM_MergeTIES"), {"k": 0.2, "topk_scope": "per_tensor"}),
        "DARE (p = 0.9)": (fc.node("DM_MergeDARE"), {"p": 0.9, "rescale": True, "seed": 0}),
        "LaS (k = 0.05)": (fc.node("DM_MergeLocalizeAndStitch"), {"k": 0.05}),
        "DRM (drop 0.8)": (fc.node("DM_MergeDRM"), {"drop_rate": 0.8, "direction": "vertical"}),
    }
    return {name: node.execute(base, stack, **params).result[0] for name, (node, params) in recipes.items()}


def run(args, family: fc.Family) -> dict:
    family.require(*GROUPS)
    groups = {name: family.data.CLASS_GROUPS[name] for name in GROUPS}
    models = {"base": family.model("base"), **{f"fine-tune {g}": family.model(g) for g in GROUPS}}
    models.update(merged_models(family))
    per_class = 2 if args.quick else args.per_class
    classes = (0, 5, 1) if args.quick else range(10)  # quick: one garment of each group
    rows: dict[str, list[dict]] = {name: [] for name in models}
    grid = []
    for seed in range(args.seeds):
        prompts, targets = fc.class_prompts(classes, per_class, seed)
        for name, model in models.items():
            started = time.monotonic()
            images = family.sample(model, prompts, 100 * seed)
            row = fc.class_metrics(family, images, targets, groups)
            row["seconds"] = round(time.monotonic() - started, 1)
            rows[name].append(row)
            fc.log(
                f"merge seed {seed} {name}: accuracy {row['accuracy']:.3f} cFID {row['cfid']:.1f} "
                + " ".join(f"{g}: {row[f'accuracy {g}']:.2f}/{row[f'cfid {g}']:.0f}" for g in GROUPS)
            )
            if seed == 0:
                grid.append(images[torch.arange(len(classes)) * per_class])
    fc.save_grid(fc.grid_path(args), torch.cat(grid), columns=len(classes), row_labels=list(models))
    counts = {g: per_class * sum(k in c for k in classes) for g, c in groups.items()}
    floors = {
        "all": fc.real_floor(family, per_class * len(classes), args.seeds),
        **{g: fc.real_floor(family, counts[g], args.seeds, c) for g, c in groups.items()},
    }
    return {
        "pictures_per_garment_and_seed": per_class,
        "sampling": f"KSampler euler, normal, {fc.STEPS} steps, CFG {fc.CFG:g}, 'a <colour> <garment>'",
        "groups": {g: list(c) for g, c in groups.items()},
        "models": {name: {**fc.summarise(r), "per_seed": r} for name, r in rows.items()},
        "real_pictures_floor": floors,
    }


def markdown(results: dict) -> str:
    head = " | ".join(f"{g}: acc ↑ / cFID ↓" for g in GROUPS)
    lines = [f"| model | {head} | all: acc ↑ / cFID ↓ |", "|---|" + "---|" * (len(GROUPS) + 1)]
    for name, row in results["models"].items():
        cells = [f"{fc.fmt(row[f'accuracy {g}'], 0, True)} / {fc.fmt(row[f'cfid {g}'], 0)}" for g in GROUPS]
        cells.append(f"{fc.fmt(row['accuracy'], 0, True)} / {fc.fmt(row['cfid'], 0)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    floors = results["real_pictures_floor"]
    cells = [f"— / {fc.fmt(floors[g], 0)}" for g in GROUPS] + [f"— / {fc.fmt(floors['all'], 0)}"]
    lines.append("| real pictures (floor at this N) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fc.common_arguments(parser, "family_merge.json")
    parser.add_argument("--per-class", type=int, default=24, help="pictures per garment and seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = 1
    return fc.run_and_report(args, "Merging the class-group fine-tunes of the mini family", run, markdown)


if __name__ == "__main__":
    main()
