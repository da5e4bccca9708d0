"""Train a small image classifier for a few steps on a synthgen dataset.

    python examples/pretrain.py OUT --steps 20 --num-workers 2
    python examples/pretrain.py s3://bucket/out --loader wids      # any fsspec URL works

One head per categorical label (cross-entropy) and per multilabel label (binary cross-entropy);
numeric labels are left out of this classifier. The network is a few plain conv layers, the
shape of a torchvision/timm backbone at toy size: swap in a real one for real data.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.utils.data import DataLoader

from synthgen.data import (
    label_encoder,
    parquet_dataset,
    webdataset_loader,
    wids_dataset,
)
from synthgen.output.outdir import OutDir


class SmallConvNet(nn.Module):
    """Conv backbone → pooled features → one linear head per label."""

    def __init__(self, heads: dict[str, int], width: int = 32):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.LazyConv2d(width, 3, stride=2, padding=1),  # lazy: RGB or grayscale alike
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(4 * width, n) for name, n in heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        return {name: head(features) for name, head in self.heads.items()}


def make_loader(args: argparse.Namespace) -> DataLoader:
    common = {"image_size": args.image_size}
    workers = {"num_workers": args.num_workers, "persistent_workers": args.num_workers > 0}
    if args.loader == "webdataset":
        dataset = webdataset_loader(args.out, args.split, shuffle=256, seed=args.seed, **common)
        return DataLoader(dataset, batch_size=args.batch_size, **workers)
    if args.loader == "wids":
        dataset = wids_dataset(args.out, args.split, **common)
    else:
        dataset = parquet_dataset(args.out, args.split, **common)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, **workers)


def batches(loader: DataLoader):
    """Batches forever: a few training steps may span several passes over a small dataset."""
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="a synthgen output directory or fsspec URL")
    parser.add_argument("--split", default="train")
    parser.add_argument("--loader", choices=["webdataset", "wids", "parquet"], default="webdataset")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=None, help="resize to a square")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    manifest = OutDir(args.out).manifest()
    sizes = label_encoder(manifest).sizes()
    kinds = {name: manifest.labels[name].kind for name in sizes}
    heads = {name: sizes[name] for name in sizes if kinds[name] != "numeric"}
    if not heads:
        parser.error("the dataset has no categorical or multilabel label to classify")
    losses = {"categorical": nn.CrossEntropyLoss(), "multilabel": nn.BCEWithLogitsLoss()}

    model = SmallConvNet(heads)
    loader = make_loader(args)
    optimizer = None
    history = []
    for step, batch in zip(range(1, args.steps + 1), batches(loader)):
        logits = model(batch["image"])
        if optimizer is None:  # after the first forward pass has sized the lazy layer
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        loss = sum(losses[kinds[name]](logits[name], batch["labels"][name]) for name in heads)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        print(f"step {step} loss {loss.item():.4f} batch {len(batch['key'])}", flush=True)
    if not all(math.isfinite(x) for x in history):
        raise SystemExit("loss is not finite")
    print(f"done: {len(history)} steps, loss {history[0]:.4f} -> {history[-1]:.4f}")


if __name__ == "__main__":
    main()
