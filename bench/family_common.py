"""Shared plumbing of the mini-family benches (``bench/bench_family_*.py``): each paper's claim on our family.

ComfyUI runs in this process on the CPU (its writable folders in a temporary directory), the pack is imported
as ``diffusion_merge``, and every picture is drawn through the pack's real code paths (ComfyUI's KSampler path,
the SuperDiff sampler, the routed model, the merge nodes, the range-expert trainer). The metrics are the mini
family's: an in-house Fashion-MNIST classifier (class accuracy, coverage) and **classifier FID** (cFID) — the
Fréchet distance in that classifier's 128-d penultimate feature space. cFID is **not Inception FID**: its
values are comparable only with each other (docs/mini-family.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_MODELS = ROOT / "mini_models"
CFG = 4.0  # the family's tuned CFG (docs/mini-family.md)
STEPS = 20


def boot() -> None:
    """ComfyUI in this process on the CPU and the pack as ``diffusion_merge`` (nothing when already up, e.g. in
    the tests, whose ComfyUI is booted by conftest)."""
    if "comfy.samplers" in sys.modules and "diffusion_merge" in sys.modules:
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    import comfy_in_process

    comfyui = Path(os.environ.get("COMFYUI_PATH", ROOT.parent / "shared" / "ComfyUI")).resolve()
    comfy_in_process.boot(comfyui, Path(tempfile.mkdtemp(prefix="dm-bench-family-")), cpu=True)
    comfy_in_process.import_pack()


def pack(name: str):
    """A module of the pack (``pack("nodes.mini_models")``); :func:`boot` first."""
    import importlib

    return importlib.import_module(f"diffusion_merge.{name}")


_NODES: dict = {}


def node(node_id: str):
    """The pack's node class registered as ``node_id`` (node ids never change; class names and modules may)."""
    if not _NODES:
        _NODES.update({cls.define_schema().node_id: cls for cls in pack("nodes").ALL_NODES})
    return _NODES[node_id]


def common_arguments(parser: argparse.ArgumentParser, default_out: str, seeds: int = 3) -> None:
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="the family folder (default mini_models/)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / default_out, help="results JSON")
    parser.add_argument("--grid", type=Path, default=None, help="sample grid PNG (default: beside --out)")
    parser.add_argument("--seeds", type=int, default=seeds, help="independent seeds (spread = std over seeds)")
    parser.add_argument("--quick", action="store_true", help="tiny counts: checks the code path in seconds")
    parser.add_argument("--threads", type=int, default=1)


def grid_path(args) -> Path:
    return args.grid or args.out.with_suffix(".png")


class Family:
    """The family's members loaded once, the classifier and the test set's reference features."""

    def __init__(self, folder: Path, reference_limit: int | None = None):
        self.folder = Path(folder)
        self.mini = pack("nodes.mini_models")
        self.data = pack("merging.family_data")
        self.metrics = pack("merging.family_metrics")
        available = self.mini.variants(self.folder)
        if "base" not in available:
            raise SystemExit(f"{self.folder} holds no mini family (no base variant): pass --models")
        self.available = available
        self._models: dict = {}
        _, self.clip, self.vae = self.load("base")
        self.classifier = self.metrics.load_classifier(self.folder / "classifier.safetensors")
        images, labels = self.data.load_split("test")
        images, labels = images[:reference_limit], labels[:reference_limit]
        self.test_labels = labels
        self.test_features = self.metrics.predict(self.classifier, self.data.pad_to_size(images)).features

    def require(self, *names: str) -> None:
        missing = [n for n in names if n not in self.available]
        if missing:
            raise SystemExit(
                f"{self.folder} lacks the variants {', '.join(missing)} (present: {', '.join(self.available)}); "
                "train them (scripts/family/train_family.py) or pass --models"
            )

    def load(self, variant: str):
        if variant not in self._models:
            self._models[variant] = self.mini.load_variant(variant, self.folder)
        return self._models[variant]

    def model(self, variant: str):
        return self.load(variant)[0]

    def encode(self, text: str) -> list:
        return self.mini.encode(self.clip, text)

    def reference(self, classes=None) -> torch.Tensor:
        """Classifier features of the test pictures (of ``classes`` only, if given): cFID's reference set."""
        if classes is None:
            return self.test_features
        return self.test_features[torch.isin(self.test_labels, torch.tensor(list(classes)))]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).movedim(-1, 1).float().cpu().clamp(0, 1)

    def sample(self, model, prompts: list[str], seed: int, cfg: float = CFG, steps: int = STEPS) -> torch.Tensor:
        """Pictures [N, 3, 32, 32] through ComfyUI's KSampler path (euler, normal), grouped by prompt."""
        return self.mini.sample_images(model, self.clip, self.vae, prompts, seed=seed, steps=steps, cfg=cfg)

    def predict(self, images: torch.Tensor):
        return self.metrics.predict(self.classifier, images)

    def cfid(self, images: torch.Tensor, classes=None) -> float:
        return self.metrics.classifier_fid(self.predict(images).features, self.reference(classes))


_FAMILIES: dict = {}


def family(folder: Path, reference_limit: int | None = None) -> Family:
    """One :class:`Family` per folder and reference size in this process (the tests run every bench in one)."""
    key = (Path(folder).resolve(), reference_limit)
    if key not in _FAMILIES:
        _FAMILIES[key] = Family(folder, reference_limit)
    return _FAMILIES[key]


def class_prompts(classes, per_class: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """``per_class`` prompts "a <colour> <garment>" per garment, one colour per garment that turns with the seed
    (the classifier and cFID read intensities; one prompt per garment keeps KSampler calls few)."""
    data = pack("merging.family_data")
    prompts, targets = [], []
    for k in classes:
        prompts += [data.caption(k, (k + seed) % len(data.COLOUR_NAMES))] * per_class
        targets += [k] * per_class
    return prompts, torch.tensor(targets)


def class_metrics(fam: Family, images: torch.Tensor, targets: torch.Tensor, groups: dict) -> dict:
    """Class accuracy and cFID over all pictures and per group of garments ({name: classes})."""
    predictions = fam.predict(images)
    right = predictions.classes == targets
    out = {"accuracy": float(right.float().mean()), "cfid": fam.cfid(images)}
    for name, classes in groups.items():
        mask = torch.isin(targets, torch.tensor(list(classes)))
        out[f"accuracy {name}"] = float(right[mask].float().mean())
        out[f"cfid {name}"] = fam.cfid(images[mask], classes)
    return out


def real_floor(family: Family, count: int, seeds: int, classes=None) -> dict:
    """cFID of ``count`` real coloured training pictures against the test split: the floor at this sample size."""
    split = family.data.coloured_split("train", seed=0, limit=12000)
    if classes is not None:
        split = split.subset(tuple(classes))
    values = []
    for seed in range(seeds):
        index = torch.randperm(split.labels.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
        values.append(family.cfid(split.images[index], classes))
    return mean_std(values)


def training_latents(fam: Family, seed: int = 0):
    """The family's training set as ``scripts/family/train_family.py`` encodes it (model-space latents with labels
    and colours; cached in the temporary folder by that script, encoded here when the cache is missing)."""
    sys.path.insert(0, str(ROOT / "scripts" / "family"))
    import train_family

    args = argparse.Namespace(out=fam.folder, seed=seed, device="cpu", limit_eval=10000)
    return train_family.encode_training_set(args, train_family.PRESETS["cpu"], log)


def latent_scale() -> float:
    """SD1.5's latent scale (model-space latent = VAE latent × this)."""
    import comfy.latent_formats

    return float(comfy.latent_formats.SD15().scale_factor)


def superdiff_latents(components, count: int, seed: int, steps: int, mode: str, temperature: float = 1.0, **extra):
    """``count`` latents from the SuperDiff KSampler node (DM_SuperDiffKSampler) over ``components``."""
    latent = {"samples": torch.zeros(count, 4, 4, 4)}
    output = node("DM_SuperDiffKSampler").execute(
        components, latent, seed=seed, steps=steps, scheduler="normal", denoise=1.0, mode=mode,
        temperature=temperature, **extra,
    )  # fmt: skip
    return output.result[0]["samples"]


def components(family: Family, pairs, cfg: float, negative: str = ""):
    """A SuperDiff component chain (DM_SuperDiffComponent) of (model, prompt) pairs, each with CFG ``cfg``."""
    chain = None
    negative_cond = family.encode(negative) if cfg != 1.0 else None
    for model, prompt in pairs:
        chain = (
            node("DM_SuperDiffComponent")
            .execute(model, family.encode(prompt), components=chain, negative=negative_cond, cfg=cfg)
            .result[0]
        )
    return chain


def mean_std(values) -> dict:
    values = [float(v) for v in values]
    finite = [v for v in values if math.isfinite(v)]
    return {
        "mean": statistics.fmean(finite) if finite else float("nan"),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "values": values,
    }


def summarise(per_seed: list[dict]) -> dict:
    """Per-seed dicts of floats → {metric: {mean, std, values}} over the seeds."""
    keys = [k for k, v in per_seed[0].items() if isinstance(v, (int, float))]
    return {k: mean_std([row[k] for row in per_seed]) for k in keys}


def fmt(stat: dict, digits: int = 2, percent: bool = False) -> str:
    scale, unit = (100.0, " %") if percent else (1.0, "")
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}{unit}"


def save_grid(path: Path, images: torch.Tensor, columns: int, scale: int = 3, row_labels=None) -> None:
    from PIL import Image

    mini = pack("nodes.mini_models")
    grid = mini.image_grid(images.clamp(0, 1), columns, scale=scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())
    if row_labels:
        picture = _with_labels(picture, row_labels, images.shape[-2] * scale + scale)
    picture.save(path)


def _with_labels(picture, labels: list[str], row_height: int):
    from PIL import Image, ImageDraw

    labels = [_ascii(text) for text in labels]  # PIL's built-in font has no Greek letters or fractions
    width = 8 + 6 * max(len(text) for text in labels)
    out = Image.new("RGB", (picture.width + width, picture.height), "white")
    out.paste(picture, (width, 0))
    draw = ImageDraw.Draw(out)
    for row, text in enumerate(labels):
        draw.text((4, row * row_height + row_height // 2 - 5), text, fill="black")
    return out


def _ascii(text: str) -> str:
    for old, new in (
        ("κ", "kappa"),
        ("½", "1/2"),
        ("⅓", "1/3"),
        ("¼", "1/4"),
        ("λ", "lambda"),
        ("×", "x"),
        ("–", "-"),
        ("→", "->"),
        ("±", "+-"),
    ):
        text = text.replace(old, new)
    return text.encode("ascii", "replace").decode()


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() or None


def header(args, title: str, started: float) -> dict:
    return {
        "benchmark": title,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "models": str(args.models),
        "quick": bool(args.quick),
        "seeds": args.seeds,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.monotonic() - started, 1),
        "metric_note": "cFID = Frechet distance in the in-house Fashion-MNIST classifier's 128-d feature space, "
        "NOT Inception FID; comparable only within this family",
    }


def run_and_report(args, title: str, run, markdown) -> dict:
    """The part every family bench shares: boot ComfyUI, load the family, ``run(args, family)`` under inference
    mode (as ComfyUI's executor runs every node), then write the results JSON with its markdown table and print it."""
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    boot()
    fam = family(args.models, reference_limit=1000 if args.quick else None)
    with torch.inference_mode():
        body = run(args, fam)
    results = {**header(args, title, started), **body}
    results["table"] = markdown(results)
    write_json(args.out, results)
    print(results["table"], flush=True)
    return results


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def log(message: str, started: float = time.monotonic()) -> None:
    print(f"[{time.monotonic() - started:7.1f}s] {message}", flush=True)
