"""Synthetic SDXL-shaped checkpoints for benchmarks: every UNet key, seeded random values, fp16.

Each tensor is drawn from its own generator, seeded from the run's seed and the key's name, so a tensor's
values do not depend on which other keys are written, and a "finetuned" file (base + small seeded noise on
every key) can be produced without ever holding the base file in memory. Values are scaled roughly like
trained weights: matrices and convolutions ~ N(0, 1/fan_in), norm scales ~ 1, biases ~ 0.02.

Several different fine-tunes of one base: keep ``--seed`` (the base) and vary ``--noise-seed`` (the noise;
it defaults to ``--seed``). ``--shapes`` takes another key/shape table of the same format (e.g.
``flux_unet_shapes.json``) and ``--dtype`` another storage dtype (bf16, fp8_e4m3fn …).

Files are written key by key with :func:`merging.io.write_safetensors` under the checkpoint prefix
``model.diffusion_model.``; memory stays at about one tensor. ::

    .venv/bin/python bench/make_synthetic.py /tmp/dm-bench/base.safetensors
    .venv/bin/python bench/make_synthetic.py /tmp/dm-bench/finetuned.safetensors --variant finetuned
    .venv/bin/python bench/make_synthetic.py /tmp/dm-bench/ft2.safetensors --variant finetuned --noise-seed 2
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

from sdxl_shapes import SHAPES_PATH, load_shapes

from merging.io import DTYPE_NAMES, SafetensorsFile, parse_dtype, write_safetensors

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
    shapes: Mapping[str, tuple[int, ...]], variant: str, seed: int, relative_delta: float, noise_seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, fp32 tensor) one key at a time."""
    for key, shape in shapes.items():
        values = base_tensor(key, shape, seed)
        if variant == "finetuned":
            values.add_(finetune_noise(key, shape, noise_seed, relative_delta))
        yield CHECKPOINT_PREFIX + key, values


def write_synthetic(
    path: str | Path,
    shapes: Mapping[str, tuple[int, ...]],
    variant: str = "base",
    seed: int = 0,
    relative_delta: float = 0.01,
    *,
    noise_seed: int | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write one synthetic checkpoint; its metadata records how it was made (see :func:`matches`).

    ``noise_seed`` (default ``seed``) seeds the finetuned variant's noise, so fine-tunes of one base differ.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not '{variant}'")
    noise_seed = seed if noise_seed is None else noise_seed
    specs = [(CHECKPOINT_PREFIX + key, dtype, tuple(shape)) for key, shape in shapes.items()]
    metadata = recipe(shapes, variant, seed, relative_delta, noise_seed=noise_seed, dtype=dtype)
    tensors = synthetic_tensors(shapes, variant, seed, relative_delta, noise_seed)
    return write_safetensors(path, specs, tensors, metadata)


def recipe(
    shapes: Mapping[str, tuple[int, ...]],
    variant: str,
    seed: int,
    relative_delta: float,
    *,
    noise_seed: int | None = None,
    dtype: torch.dtype = torch.float16,
) -> dict[str, str]:
    finetuned = variant == "finetuned"
    return {
        "dm_bench_format": FORMAT,
        "variant": variant,
        "seed": str(seed),
        "relative_delta": str(relative_delta) if finetuned else "",
        "noise_seed": str(seed if noise_seed is None else noise_seed) if finetuned else "",
        "dtype": DTYPE_NAMES[dtype],
        "keys": str(len(shapes)),
        "parameters": str(sum(math.prod(s) for s in shapes.values())),
    }


def matches(
    path: Path,
    shapes: Mapping[str, tuple[int, ...]],
    variant: str,
    seed: int,
    relative_delta: float,
    *,
    noise_seed: int | None = None,
    dtype: torch.dtype = torch.float16,
) -> bool:
    """Whether ``path`` already holds the file :func:`write_synthetic` would write (by its metadata)."""
    try:
        metadata = _with_legacy_fields(SafetensorsFile(path).metadata)
    except (OSError, ValueError):
        return False
    expected = recipe(shapes, variant, seed, relative_delta, noise_seed=noise_seed, dtype=dtype)
    return all(metadata.get(k) == v for k, v in expected.items())


def _with_legacy_fields(metadata: Mapping[str, str]) -> dict[str, str]:
    """Files written before ``noise_seed`` and ``dtype`` were recorded: fp16, noise seeded by ``seed``."""
    finetuned = metadata.get("variant") == "finetuned"
    legacy = {"noise_seed": metadata.get("seed", "") if finetuned else "", "dtype": "F16"}
    return {**legacy, **metadata}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    parser.add_argument("--variant", choices=VARIANTS, default="base")
    parser.add_argument("--seed", type=int, default=0, help="seeds the base values")
    parser.add_argument("--noise-seed", type=int, default=None, help="seeds the finetuned noise (default: --seed)")
    parser.add_argument("--relative-delta", type=float, default=0.01, help="finetuned noise / weight scale")
    parser.add_argument("--dtype", default="fp16", help="storage dtype: fp16, bf16, fp32, fp8_e4m3fn …")
    parser.add_argument("--shapes", type=Path, default=SHAPES_PATH, help="key/shape table (default: SDXL UNet)")
    parser.add_argument("--keys", type=int, default=None, help="only this many keys, spread evenly (quick runs)")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    shapes = select_keys(load_shapes(options.shapes), options.keys)
    started = time.perf_counter()
    write_synthetic(
        options.out,
        shapes,
        options.variant,
        options.seed,
        options.relative_delta,
        noise_seed=options.noise_seed,
        dtype=parse_dtype(options.dtype),
    )
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
