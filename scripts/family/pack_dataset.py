"""Write the first N training and M test images of Fashion-MNIST as IDX files into a folder (for a machine
without the dataset, e.g. the GPU machine, where the files must travel with the tree: 64 MiB in all).

    .venv/bin/python scripts/family/pack_dataset.py --train 15000 --test 2000 --out .dataset
    # there: DM_FASHION_MNIST=.dataset python3 scripts/family/train_family.py all --preset gpu --device cuda ...
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

from common import pack_module


def write_idx(path: Path, magic: int, array) -> None:
    header = struct.pack(">" + "I" * (1 + array.ndim), magic, *array.shape)
    with gzip.open(path, "wb", compresslevel=9) as handle:
        handle.write(header + array.contiguous().numpy().tobytes())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=15000, help="training images to keep (the first N)")
    parser.add_argument("--test", type=int, default=2000, help="test images to keep (the first M)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    data = pack_module("merging.family_data")
    args.out.mkdir(parents=True, exist_ok=True)
    for split, prefix, count in (("train", "train", args.train), ("test", "t10k", args.test)):
        images, labels = data.load_split(split)
        write_idx(args.out / f"{prefix}-images-idx3-ubyte.gz", 2051, images[:count])
        write_idx(args.out / f"{prefix}-labels-idx1-ubyte.gz", 2049, labels[:count].to(dtype=images.dtype))
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.train} training and {args.test} test images to {args.out} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
