"""DeMe (Decouple-Then-Merge, arXiv 2410.06664) on the mini family: merged range experts vs their routed
ensemble vs base vs one plain fine-tune over all timesteps with the same training budget. One command::

    OMP_NUM_THREADS=1 nice .venv/bin/python bench/bench_family_deme.py      # ≈ 10 min the first time (4 of them
                                                                           # encode the training set, 4 train the
                                                                           # plain LoRA: both cached), 3 after
    .venv/bin/python bench/bench_family_deme.py --quick                     # seconds (the test runs it)

The paper (LSUN Church, FID): merge 7.27 < ensemble 9.57 < base 10.69. Here the family's four range experts
``expert-000-250`` … ``expert-750-1000`` are LoRAs of base trained by the pack's own DM_TrainRangeExpertLoRA
(``scripts/family/train_family.py experts``: 400 steps × 32 each on 4096 latents, rank 4, lr 10⁻³, antithetic
timesteps, ε loss). Their training barely moved their own range's loss (e.g. 0.2291 → 0.2298 for 0–250, see
``mini_models/family.json``), so little difference between the rows is the expected outcome at this scale.
Compared, each drawing ``--per-class`` pictures of every garment ("a <colour> <garment>", CFG 4, euler 20 steps
through ComfyUI's KSampler path):

- **base**;
- **merges** by weighted task arithmetic (DM_TaskVectorFromModels → DM_TaskVectorStack → DM_MergeTaskArithmetic):
  DeMe's weights 0.1 / 0.1 / 0.2 / 0.5 (low-noise → high-noise expert), the same ×2, uniform ¼ and uniform 1;
- **the routed ensemble** (DM_RouteExpert × 4 → DM_RoutedModel: each expert samples its own timestep range);
- **a plain LoRA** trained by the same trainer with the same settings and data over all timesteps (0–1000) for
  the experts' total number of steps (4 × 400), cached in the temporary folder between runs.

Metrics: class accuracy on the prompted garment and cFID against the whole test split (**not Inception FID**).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import family_common as fc

EXPERTS = ("expert-000-250", "expert-250-500", "expert-500-750", "expert-750-1000")  # low → high noise
DEME_WEIGHTS = (0.1, 0.1, 0.2, 0.5)
MERGES = {
    "merge 0.1/0.1/0.2/0.5 (DeMe)": DEME_WEIGHTS,
    "merge 0.2/0.2/0.4/1.0 (DeMe × 2)": tuple(2 * w for w in DEME_WEIGHTS),
    "merge ¼ each": (0.25,) * 4,
    "merge 1 each (sum)": (1.0,) * 4,
}
# The experts' training settings (scripts/family/train_family.py train_experts, CPU preset).
EXPERT_TRAINING = {
    "steps": 400, "batch_size": 32, "learning_rate": 1e-3, "rank": 4, "antithetic": True, "loss_space": "eps/v",
    "training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False, "grad_clip": 1.0,
    "images": 4096,
}  # fmt: skip


def merged(family: fc.Family, weights) -> object:
    base = family.model("base")
    stack = None
    for name, weight in zip(EXPERTS, weights, strict=True):
        vector = fc.node("DM_TaskVectorFromModels").execute(family.model(name), base).result[0]
        stack = fc.node("DM_TaskVectorStack").execute(vector, weight, stack).result[0]
    return fc.node("DM_MergeTaskArithmetic").execute(base, stack, lam=1.0).result[0]


def routed(family: fc.Family) -> object:
    """The four experts by timestep range, highest noise first (each Route Expert says where it stops)."""
    chain = None
    for name in reversed(EXPERTS):
        low = float(name.split("-")[1])
        chain = fc.node("DM_RouteExpert").execute(family.model(name), end=low, unit="timestep", experts=chain).result[0]
    return fc.node("DM_RoutedModel").execute(chain, memory_mode="resident").result[0]


def expert_dataset(family: fc.Family, seed: int, images: int):
    """The experts' training data as train_family.py draws it: latents (VAE space) and per-latent captions."""
    latents = fc.training_latents(family, seed)
    generator = torch.Generator().manual_seed(seed + 20)
    chosen = torch.randperm(latents.latents.shape[0], generator=generator)[:images]
    caption_ids = family.data.draw_caption_ids(latents.labels[chosen], latents.colours[chosen], generator)
    captions = family.data.all_captions()
    encoded = {i: family.encode(captions[i])[0][0] for i in caption_ids.unique().tolist()}
    positive = [[encoded[i], {}] for i in caption_ids.tolist()]
    samples = {"samples": latents.latents[chosen] / fc.latent_scale()}
    return samples, positive


def small_dataset(family: fc.Family, seed: int, images: int):
    """``images`` coloured training pictures encoded by the family's VAE, captioned "a <colour> <garment>"."""
    split = family.data.coloured_split("train", seed=seed, limit=images)
    samples = {"samples": family.vae.encode(split.images.movedim(1, -1))}
    captions = [family.data.caption(k, c) for k, c in zip(split.labels.tolist(), split.colours.tolist(), strict=True)]
    return samples, [[family.encode(text)[0][0], {}] for text in captions]


def plain_lora(family: fc.Family, steps: int, quick: bool) -> tuple[object, dict]:
    """base + one LoRA trained over all timesteps with the experts' settings (cached by models, steps, settings)."""
    mini = family.mini
    settings = dict(EXPERT_TRAINING, steps=steps)
    if quick:
        settings.update(batch_size=4, images=64)
    digest = hashlib.sha256((family.folder / "unet" / "base.safetensors").read_bytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    cache = Path(tempfile.gettempdir()) / "dm-family-cache" / f"plain-lora-{digest.hexdigest()[:16]}.safetensors"
    record = {"settings": settings, "range": [0, 1000], "cache": str(cache)}
    base = family.model("base")
    if quick:  # a few freshly encoded pictures: no training-set encoding (minutes) in the quick run
        cache = Path(tempfile.mkdtemp(prefix="dm-bench-deme-")) / "plain-lora.safetensors"
    if cache.is_file():
        lora = mini.read_safetensors(cache)
        record["trained_now"] = False
    else:
        dataset = small_dataset if quick else expert_dataset
        samples, positive = dataset(family, 0, settings["images"])
        started = time.monotonic()
        output = fc.node("DM_TrainRangeExpertLoRA").execute(
            base, samples, positive, range_unit="timestep", range_min=0.0, range_max=1000.0,
            antithetic=settings["antithetic"], loss_space=settings["loss_space"], steps=steps,
            batch_size=settings["batch_size"], learning_rate=settings["learning_rate"], rank=settings["rank"], seed=0,
            training_dtype=settings["training_dtype"], lora_dtype=settings["lora_dtype"],
            gradient_checkpointing=settings["gradient_checkpointing"], grad_clip=settings["grad_clip"],
        )  # fmt: skip
        lora, loss_log = output.result[1], output.result[2]
        record.update(
            trained_now=True,
            train_seconds=round(time.monotonic() - started, 1),
            eval_loss_before_after=loss_log.get("eval_range_loss"),
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in lora.items()}
        fc.pack("merging.io").write_safetensors(
            cache, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], iter(tensors.items()), {}
        )
    import comfy.sd

    model, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)
    return model, record


def run(args, family: fc.Family) -> dict:
    family.require(*EXPERTS)
    models = {"base": family.model("base")}
    merges = dict(list(MERGES.items())[:1]) if args.quick else MERGES
    models.update({name: merged(family, weights) for name, weights in merges.items()})
    models["routed ensemble"] = routed(family)
    plain_steps = 2 if args.quick else args.plain_steps
    plain_model, plain_record = plain_lora(family, plain_steps, args.quick)
    models[f"plain LoRA, all timesteps ({plain_steps} steps)"] = plain_model
    per_class = 2 if args.quick else args.per_class
    classes = (0, 7) if args.quick else range(10)
    rows: dict[str, list[dict]] = {name: [] for name in models}
    grid = []
    for seed in range(args.seeds):
        prompts, targets = fc.class_prompts(classes, per_class, seed)
        for name, model in models.items():
            started = time.monotonic()
            images = family.sample(model, prompts, 100 * seed)
            row = fc.class_metrics(family, images, targets, {})
            row["seconds"] = round(time.monotonic() - started, 1)
            rows[name].append(row)
            fc.log(f"DeMe seed {seed} {name}: accuracy {row['accuracy']:.3f} cFID {row['cfid']:.1f}")
            if seed == 0:
                grid.append(images[torch.arange(len(classes)) * per_class])
    fc.save_grid(fc.grid_path(args), torch.cat(grid), columns=len(classes), row_labels=list(models))
    expert_records = {
        name: fc.pack("nodes.mini_models").read_manifest(family.folder).get("training", {}).get(name, {})
        for name in EXPERTS
    }
    return {
        "pictures_per_garment_and_seed": per_class,
        "sampling": f"KSampler euler, normal, {fc.STEPS} steps, CFG {fc.CFG:g}, 'a <colour> <garment>'",
        "experts": {
            name: {k: r.get(k) for k in ("steps", "batch", "timesteps", "eval_range_loss_before_after")}
            for name, r in expert_records.items()
        },
        "plain_lora": plain_record,
        "models": {name: {**fc.summarise(r), "per_seed": r} for name, r in rows.items()},
        "real_pictures_floor": fc.real_floor(family, per_class * len(classes), args.seeds),
    }


def markdown(results: dict) -> str:
    lines = ["| model | class accuracy ↑ | cFID ↓ |", "|---|---|---|"]
    for name, row in results["models"].items():
        lines.append(f"| {name} | {fc.fmt(row['accuracy'], 1, True)} | {fc.fmt(row['cfid'], 1)} |")
    lines.append(f"| real pictures (floor at this N) | — | {fc.fmt(results['real_pictures_floor'], 1)} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fc.common_arguments(parser, "family_deme.json")
    parser.add_argument("--per-class", type=int, default=12, help="pictures per garment and seed")
    parser.add_argument("--plain-steps", type=int, default=4 * EXPERT_TRAINING["steps"], help="plain LoRA's steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = 1
    return fc.run_and_report(args, "DeMe range experts on the mini family: merge vs ensemble vs base", run, markdown)


if __name__ == "__main__":
    main()
