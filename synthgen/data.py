"""Training loaders: read a finished OUT (local or any fsspec URL) as PyTorch-ready samples.

Three ways in, one sample shape out, `{"key": str, "image": FloatTensor CxHxW in [0, 1],
"labels": dict}`: `webdataset_loader` streams the tars, `wids_dataset` gives random access to
them, `parquet_dataset` goes through `datasets`. Labels come as targets (class index, multi-hot,
float) encoded from `manifest.json`, or as the raw values with `targets=False`. Every loader takes
its shard list from the manifest, so all three see the same samples.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import datasets
import numpy as np
import torch
import webdataset as wds
import wids
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from synthgen.errors import OutputError
from synthgen.output.outdir import PARQUET, WEBDATASET, OutDir, temporary_name
from synthgen.output.records import Manifest
from synthgen.recipe.labels import LabelEncoding

IMAGE_SUFFIXES = ("png", "jpg", "webp")


# --- labels -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelEncoder:
    """Turns a labels dict into tensors, with the encodings `manifest.json` records.

    categorical → int64 class index; multilabel → float32 multi-hot over the names; numeric →
    float32 scalar. Constants are left out: there is nothing to learn from them. A class (not a
    closure) so DataLoader workers can pickle it under any start method.
    """

    encodings: dict[str, LabelEncoding]

    def __call__(self, labels: dict) -> dict[str, torch.Tensor]:
        targets = {}
        for name, encoding in self.encodings.items():
            if encoding.width is None:  # a constant: nothing to learn
                continue
            try:
                target = encoding.target(labels[name])
            except ValueError as exc:
                raise ValueError(f"label '{name}': {exc}") from None
            dtype = torch.int64 if encoding.kind == "categorical" else torch.float32
            targets[name] = torch.tensor(target, dtype=dtype)
        return targets

    def sizes(self) -> dict[str, int]:
        """Output units a model head needs per target: classes, names, or 1 for a number."""
        return {
            name: encoding.width
            for name, encoding in self.encodings.items()
            if encoding.width is not None
        }


def label_encoder(manifest: Manifest) -> LabelEncoder:
    return LabelEncoder(manifest.labels)


def full_url(out: OutDir, relative: str) -> str:
    """A path that `datasets` and `wids` can open: plain for local OUT, with protocol otherwise."""
    path = out.path(relative)
    return path if out.is_local else out.fs.unstrip_protocol(path)


# --- images and samples -------------------------------------------------------------------------


def decode_image(data: bytes, image_size: int | None = None) -> torch.Tensor:
    """PNG/JPEG/WebP bytes → float tensor CxHxW in [0, 1]; grayscale stays one channel."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("L") if image.mode in ("L", "I", "I;16") else image.convert("RGB")
        if image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    if pixels.ndim == 2:
        pixels = pixels.unsqueeze(-1)
    return pixels.permute(2, 0, 1).float().div(255.0)


def make_sample(
    key: str, image: bytes, labels: dict, encode: LabelEncoder | None, image_size: int | None
) -> dict:
    return {
        "key": key,
        "image": decode_image(image, image_size),
        "labels": encode(labels) if encode is not None else labels,
    }


def image_member(members: dict, prefix: str = "") -> bytes:
    for suffix in IMAGE_SUFFIXES:
        if prefix + suffix in members:
            data = members[prefix + suffix]
            return data.getvalue() if isinstance(data, io.BytesIO) else data
    raise OutputError(f"sample {members.get('__key__')} has no image member")


# --- webdataset streaming -----------------------------------------------------------------------


def open_shards(out: OutDir, sources: Iterable[dict]) -> Iterator[dict]:
    """Stage: {"url": relative path} → the same with an open stream, read through OUT's fsspec."""
    for source in sources:
        with out.fs.open(out.path(source["url"]), "rb") as stream:
            yield {**source, "stream": stream}


def tar_sample(
    raw: dict, encode: LabelEncoder | None = None, image_size: int | None = None
) -> dict:
    meta = json.loads(raw["json"])
    return make_sample(raw["__key__"], image_member(raw), meta["labels"], encode, image_size)


def webdataset_loader(
    out: str,
    split: str = "train",
    *,
    strength: float | None = None,
    shuffle: int = 1000,
    image_size: int | None = None,
    targets: bool = True,
    seed: int = 0,
) -> wds.DataPipeline:
    """Stream one split's tars: an IterableDataset for a DataLoader with any number of workers.

    Shards are shuffled with `seed` (all workers agree, then each takes its own), then samples
    through a buffer of `shuffle` (0 keeps the written order). The order is a function of `seed`
    and of how many times this object was iterated: with DataLoader workers, pass
    `persistent_workers=True` (or a new `seed` per epoch) for a new order each epoch.
    """
    outdir = OutDir(out)
    manifest = outdir.manifest()
    paths = [f.path for f in manifest.shard_files(split, WEBDATASET, strength)]
    encode = label_encoder(manifest) if targets else None
    stages: list = [wds.SimpleShardList(paths)]
    if shuffle:
        stages.append(wds.detshuffle(len(paths), len(paths), seed=seed))
    stages += [
        wds.split_by_node,
        wds.split_by_worker,
        partial(open_shards, outdir),
        tar_file_expander,
        group_by_keys,
    ]
    if shuffle:
        stages.append(wds.detshuffle(shuffle, min(shuffle, 100), seed=seed))
    stages.append(wds.map(partial(tar_sample, encode=encode, image_size=image_size)))
    return wds.DataPipeline(*stages)


# --- wids random access -------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedShard:
    """wids `localname`: the local file to read a shard from.

    wids opens every shard from a local cache file. A local OUT's tar is linked there (read in
    place, and OUT may be read-only); a remote one is downloaded once through fsspec. Cache
    names carry the shard's sha256, so a regenerated OUT never reads a stale copy.
    """

    out: OutDir
    digests: dict[str, str]  # relative tar path -> sha256
    cache_dir: str

    def __call__(self, relative: str) -> str:
        local = os.path.join(
            self.cache_dir, f"{self.digests[relative][:16]}-{posixpath.basename(relative)}"
        )
        if not os.path.exists(local):
            os.makedirs(self.cache_dir, exist_ok=True)
            temporary = temporary_name(local)
            if self.out.is_local:
                os.symlink(os.path.abspath(self.out.path(relative)), temporary)
            else:
                self.out.fs.get_file(self.out.path(relative), temporary)
            os.replace(temporary, local)  # atomic: DataLoader workers may race here
        return local


def wids_sample(
    raw: dict, encode: LabelEncoder | None = None, image_size: int | None = None
) -> dict:
    meta = json.load(raw[".json"])
    return make_sample(raw["__key__"], image_member(raw, "."), meta["labels"], encode, image_size)


def wids_dataset(
    out: str,
    split: str = "train",
    *,
    strength: float | None = None,
    image_size: int | None = None,
    targets: bool = True,
    cache_dir: str | None = None,
) -> wids.ShardListDataset:
    """Random access to one split's tars: a map-style `wids.ShardListDataset`.

    Use it with an ordinary `DataLoader(shuffle=True)`, or with `wids.ShardListSampler` to read
    shard by shard. Remote shards are downloaded to `cache_dir` on first use.
    """
    outdir = OutDir(out)
    manifest = outdir.manifest()
    files = manifest.shard_files(split, WEBDATASET, strength)
    cache = cache_dir or os.path.join(tempfile.gettempdir(), "synthgen-wids")
    encode = label_encoder(manifest) if targets else None
    return wids.ShardListDataset(
        [{"url": f.path, "nsamples": f.count} for f in files],
        localname=CachedShard(outdir, {f.path: f.sha256 for f in files}, cache),
        transformations=[partial(wids_sample, encode=encode, image_size=image_size)],
    )


# --- Parquet through datasets -------------------------------------------------------------------


@dataclass(frozen=True)
class ParquetRows:
    """`datasets` transform: a batch of Parquet rows → samples of the common shape."""

    encodings: dict[str, LabelEncoding]
    encode: LabelEncoder | None
    image_size: int | None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        samples = [
            make_sample(
                key, batch["image"][i]["bytes"], self.labels(batch, i), self.encode, self.image_size
            )
            for i, key in enumerate(batch["key"])
        ]
        return {name: [s[name] for s in samples] for name in ("key", "image", "labels")}

    def labels(self, batch: dict[str, list], i: int) -> dict:
        # ClassLabel columns hold indices; the raw labels (as in the tars) are the names.
        return {name: enc.from_stored(batch[name][i]) for name, enc in self.encodings.items()}


def parquet_dataset(
    out: str,
    split: str = "train",
    *,
    strength: float | None = None,
    image_size: int | None = None,
    targets: bool = True,
) -> datasets.Dataset:
    """One split's Parquet files through `datasets`, as a map-style dataset of common samples.

    `strength` picks one strength of an i2i sweep, like the card's `strength-X` configs.
    """
    outdir = OutDir(out)
    manifest = outdir.manifest()
    urls = [full_url(outdir, f.path) for f in manifest.shard_files(split, PARQUET, strength)]
    table = datasets.load_dataset("parquet", data_files={split: urls}, split=split)
    table = table.cast_column("image", datasets.Image(decode=False))
    encode = label_encoder(manifest) if targets else None
    return table.with_transform(ParquetRows(manifest.labels, encode, image_size))
