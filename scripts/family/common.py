"""Shared plumbing of the family's training scripts: the pack and ComfyUI in process, logging, seeding."""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1]
PACK_ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

import comfy_in_process  # noqa: E402

MANIFEST = "family.json"
FINETUNE_VARIANTS = {
    "a": "classes 0–4 (t-shirt, trousers, pullover, dress, coat)",
    "b": "classes 5–9 (sandal, shirt, sneaker, bag, ankle boot)",
    "tops": "tops (t-shirt, pullover, coat, shirt)",
    "footwear": "footwear (sandal, sneaker, ankle boot)",
    "bags-trousers-dresses": "bags, trousers and dresses",
}


_booted = False


def boot_comfyui(device: str) -> None:
    """ComfyUI in this process (CPU unless ``device`` is cuda), its writable folders in a temporary directory."""
    global _booted
    if not _booted:
        work = Path(tempfile.mkdtemp(prefix="dm-family-"))
        comfy_in_process.boot(comfy_in_process.find_comfyui(PACK_ROOT)[0], work, cpu=device == "cpu")
        _booted = True


def pack_module(name: str):
    """A module of the pack, e.g. ``pack_module("merging.family_data")`` (the pack is imported as
    ``diffusion_merge``; ``nodes.*`` modules need :func:`boot_comfyui` first)."""
    comfy_in_process.import_pack()
    return importlib.import_module(f"{comfy_in_process.PACK_PACKAGE}.{name}")


class Log:
    """Progress lines to stdout and, when given, appended to a log file (flushed each line)."""

    def __init__(self, path: Path | None):
        self.path, self.start = path, time.monotonic()

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:8.1f}s] {message}"
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")


def write_json(path: Path, data, sort_keys: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")
    tmp.replace(path)


def update_manifest(out: Path, **changes) -> dict:
    path = out / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"format": 1, "variants": {}}
    variants = changes.pop("variants", {})
    manifest.update(changes)
    manifest.setdefault("variants", {}).update(variants)
    manifest["variants"] = dict(sorted(manifest["variants"].items(), key=lambda item: _variant_rank(item[0])))
    write_json(path, manifest, sort_keys=False)
    return manifest


def _variant_rank(name: str) -> tuple:
    """base first, then the fine-tunes in FINETUNE_VARIANTS order, then the experts by range."""
    order = ["base", *FINETUNE_VARIANTS]
    return (order.index(name), "") if name in order else (len(order), name)


def read_training(out: Path) -> dict:
    path = out / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")).get("training", {}) if path.is_file() else {}
