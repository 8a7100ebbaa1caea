"""Synthetic SDXL-shaped checkpoints for benchmarks: every UNet key, seeded random values, fp16.

Each tensor is drawn from its own generator, seeded from the run's seed and the key's name, so a tensor's
values do not depend on which other keys are written, and a "finetuned" file (base + small seeded noise on
every key) can be produced without ever holding the base file in memory. Values are scaled roughly like
trained weights: matrices and convolutions ~ N(0, 1/fan_in), norm scales ~ 1, biases ~ 0.02.

Files are written key by key with :func:`merging.io.write_safetensors` under the checkpoint prefix
``model.diffusion_model.``; memory stays at about one tensor. ::

    .venv/bin/python bench/make_synthetic.py /tmp/dm-bench/base.safetensors
    .venv/bin/python bench/make_synthetic.py /tmp/dm-bench/finetuned.safetensors --variant finetuned
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdxl_shapes import load_shapes

from merging.io import SafetensorsFile, write_safetensors

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "model.diffusion_model."
VARIANTS = ("base", "finetuned")
FORMAT = "diffusion-merge/bench-synthetic/1"


def select_keys(shapes: Mapping[str, tuple[int, ...]], count: int | None) -> dict[str, tuple[int, ...]]:
    """``count`` keys spread evenly over the model (all of them for ``None``), in state-dict order."""
    keys = list(shapes)
    if count is None or count >= len(keys):
        return dict(shapes)
    if count < 1:
        raise ValueError(f"--keys must be at least 1, not {count}")
    return {keys[i * len(keys) // count]: shapes[keys[i * len(keys) // count]] for i in range(count)}


def base_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The fp32 base value of one key (see the module docstring for the scales)."""
    values = torch.randn(shape, generator=_generator(seed, key, 0), dtype=torch.float32)
    if len(shape) >= 2:
        return values.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
    if key.endswith(".weight"):  # GroupNorm / LayerNorm scales
        return values.mul_(0.1).add_(1.0)
    return values.mul_(0.02)


def finetune_noise(key: str, shape: tuple[int, ...], seed: int, relative: float) -> torch.Tensor:
    """The fp32 change the "finetuned" variant adds to one key: ``relative`` times the base's scale."""
    scale = 1.0 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 0.02
    return torch.randn(shape, generator=_generator(seed, key, 1), dtype=torch.float32).mul_(relative * scale)


def _generator(seed: int, key: str, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed << 33) | (stream << 32) | zlib.crc32(key.encode()))


def synthetic_tensors(
    shapes: Mapping[str, tuple[int, ...]], variant: str, seed: int, relative_delta: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, fp32 tensor) one key at a time."""
    for key, shape in shapes.items():
        values = base_tensor(key, shape, seed)
        if variant == "finetuned":
            values.add_(finetune_noise(key, shape, seed, relative_delta))
        yield CHECKPOINT_PREFIX + key, values


def write_synthetic(
    path: str | Path,
    shapes: Mapping[str, tuple[int, ...]],
    variant: str = "base",
    seed: int = 0,
    relative_delta: float = 0.01,
) -> Path:
    """Write one synthetic fp16 checkpoint; its metadata records how it was made (see :func:`matches`)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not '{variant}'")
    specs = [(CHECKPOINT_PREFIX + key, torch.float16, tuple(shape)) for key, shape in shapes.items()]
    metadata = recipe(shapes, variant, seed, relative_delta)
    tensors = synthetic_tensors(shapes, variant, seed, relative_delta)
    return write_safetensors(path, specs, tensors, metadata)


def recipe(shapes: Mapping[str, tuple[int, ...]], variant: str, seed: int, relative_delta: float) -> dict[str, str]:
    return {
        "dm_bench_format": FORMAT,
        "variant": variant,
        "seed": str(seed),
        "relative_delta": str(relative_delta) if variant == "finetuned" else "",
        "keys": str(len(shapes)),
        "parameters": str(sum(math.prod(s) for s in shapes.values())),
    }


def matches(path: Path, shapes: Mapping[str, tuple[int, ...]], variant: str, seed: int, relative_delta: float) -> bool:
    """Whether ``path`` already holds the file :func:`write_synthetic` would write (by its metadata)."""
    try:
        metadata = SafetensorsFile(path).metadata
    except (OSError, ValueError):
        return False
    return all(metadata.get(k) == v for k, v in recipe(shapes, variant, seed, relative_delta).items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    parser.add_argument("--variant", choices=VARIANTS, default="base")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--relative-delta", type=float, default=0.01, help="finetuned noise / weight scale")
    parser.add_argument("--keys", type=int, default=None, help="only this many keys, spread evenly (quick runs)")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    shapes = select_keys(load_shapes(), options.keys)
    started = time.perf_counter()
    write_synthetic(options.out, shapes, options.variant, options.seed, options.relative_delta)
    seconds = time.perf_counter() - started
    size = options.out.stat().st_size
    logger.info(
        "%s: %d keys, %.2f GB in %.1f s (%.0f MB/s)",
        options.out,
        len(shapes),
        size / 1e9,
        seconds,
        size / seconds / 1e6,
    )


if __name__ == "__main__":
    main()
