"""Train the metrics classifier on Fashion-MNIST's training split (CPU, a few minutes); see docs/mini-family.md.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/family/train_classifier.py --out mini_models

Writes ``<out>/classifier.safetensors`` (fp16) with its test accuracy in the metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import Log, pack_module, read_training, update_manifest


def shifted(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels in x and y (zero fill)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    out = torch.empty_like(images)
    for x in range(2 * max_shift + 1):
        for y in range(2 * max_shift + 1):
            chosen = ((dx == x) & (dy == y)).nonzero().squeeze(1)
            out[chosen] = padded[chosen, :, y : y + h, x : x + w]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for classifier.safetensors")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only (dry runs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = Log(args.log)
    data = pack_module("merging.family_data")
    metrics = pack_module("merging.family_metrics")

    images, labels = data.load_split("train")
    test_images, test_labels = data.load_split("test")
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
        test_images, test_labels = test_images[: args.limit], test_labels[: args.limit]
    train_x, test_x = data.pad_to_size(images), data.pad_to_size(test_images)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = metrics.FashionClassifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = (len(labels) + args.batch - 1) // args.batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )
    start = time.monotonic()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            index = order[step * args.batch : (step + 1) * args.batch]
            x = shifted(train_x[index], generator).to(device)
            loss = F.cross_entropy(model(x), labels[index].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        model.eval()
        predictions = metrics.predict(model, test_x.to(device))
        accuracy = float((predictions.classes.cpu() == test_labels).float().mean())
        log(f"classifier epoch {epoch + 1}/{args.epochs}: loss {total / steps_per_epoch:.4f}, test acc {accuracy:.4f}")
    seconds = time.monotonic() - start
    result = {"test_accuracy": accuracy, "epochs": args.epochs, "seed": args.seed, "train_seconds": round(seconds, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    metrics.save_classifier(model.cpu(), args.out / "classifier.safetensors", {"dm_classifier": json.dumps(result)})
    command = " ".join(["scripts/family/train_classifier.py", *(argv if argv is not None else sys.argv[1:])])
    record = {**result, "file": "classifier.safetensors", "command": command}
    update_manifest(
        args.out, classifier="classifier.safetensors", training={**read_training(args.out), "classifier": record}
    )
    log(f"classifier saved: {result}")
    return result


if __name__ == "__main__":
    main()
