"""ShardWriter: encode rendered samples into a WebDataset tar and a Parquet file, then commit.

A shard counts only once its commit record exists (`.synthgen/commits/NAME.json`, written last)
and the files it lists have the sha256 it records. Files are written under temporary names and
renamed, so a worker killed at any instant leaves a committed shard or nothing that counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from synthgen.labels import Categorical, Constant, Multilabel, Normal, Uniform
from synthgen.outdir import OutDir
from synthgen.plan import SampleSpec, ShardTask
from synthgen.recipe import Recipe

IMAGE_SUFFIX = {"png": "png", "jpg": "jpg", "webp": "webp"}
PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
TAR_MTIME = 0  # fixed, so two runs of one recipe write byte-identical tars


@dataclass
class ShardRecord:
    """The commit record: what the shard holds and how to check it is intact."""

    name: str
    split: str
    shard: int
    count: int
    files: dict[str, str]  # relative path -> sha256
    strength: float | None = None
    skipped: list[dict] = field(default_factory=list)  # {"row": n, "reason": "..."}
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> ShardRecord:
        return cls(**json.loads(text))


def label_features(recipe: Recipe) -> dict[str, datasets.features.features.FeatureType]:
    """The typed `datasets` feature of each label column."""
    features = {}
    for name, spec in recipe.labels.items():
        if isinstance(spec, Categorical):
            features[name] = datasets.ClassLabel(names=list(spec.values))
        elif isinstance(spec, Multilabel):
            features[name] = datasets.List(datasets.Value("string"))
        elif isinstance(spec, (Uniform, Normal)):
            features[name] = datasets.Value("int64" if spec.dtype == "int" else "float64")
        elif isinstance(spec, Constant):
            kind = {bool: "bool", int: "int64", float: "float64"}.get(type(spec.value), "string")
            features[name] = datasets.Value(kind)
    return features


def dataset_features(recipe: Recipe) -> datasets.Features:
    return datasets.Features(
        {
            "key": datasets.Value("string"),
            "image": datasets.Image(),
            "prompt": datasets.Value("string"),
            **label_features(recipe),
            "mode": datasets.Value("string"),
            "seed": datasets.Value("int64"),
            "steps": datasets.Value("int32"),
            "guidance_scale": datasets.Value("float64"),
            "strength": datasets.Value("float64"),
        }
    )


def encode_image(image: Image.Image, recipe: Recipe) -> bytes:
    out = recipe.output
    if out.grayscale:
        image = image.convert("L")  # X-ray datasets: one channel, as the sources were
    buffer = io.BytesIO()
    options: dict = {}
    if out.image_format == "png":
        # zlib level 1 with the run-length strategy: ~4x faster than level 6 and files no larger
        # on photo-like images (BENCHMARKS.md), so encoding keeps up with the GPU.
        options = {"compress_level": out.png_compress_level, "compress_type": 3}
    elif out.image_format in ("jpg", "webp"):
        options = {"quality": out.jpeg_quality}
    image.save(buffer, format=PIL_FORMAT[out.image_format], **options)
    return buffer.getvalue()


def sample_metadata(spec: SampleSpec, recipe: Recipe) -> dict:
    """Everything about a sample except its pixels: the `.json` member and the Parquet row."""
    g = recipe.generation
    return {
        "key": spec.key,
        "split": spec.split,
        "prompt": spec.prompt,
        "labels": spec.labels,
        "mode": g.mode,
        "seed": spec.seed,
        "steps": g.steps,
        "guidance_scale": g.guidance_scale,
        "strength": spec.strength,
    }


class ShardWriter:
    def __init__(self, out: OutDir, recipe: Recipe, encoders: int | None = None):
        self.out = out
        self.recipe = recipe
        self.pool = ThreadPoolExecutor(encoders or min(8, os.cpu_count() or 1), "encode")
        self.features = dataset_features(recipe)
        self.class_index = {
            name: {value: i for i, value in enumerate(spec.values)}
            for name, spec in recipe.labels.items()
            if isinstance(spec, Categorical)
        }

    def write(
        self,
        task: ShardTask,
        samples: Iterable[tuple[SampleSpec, Image.Image]],
        seconds: dict[str, float] | None = None,
        skipped: list[dict] | None = None,
    ) -> ShardRecord:
        formats = self.recipe.output.formats
        suffix = IMAGE_SUFFIX[self.recipe.output.image_format]
        # Encoding runs in the pool while the renderer makes the next batch (zlib and libjpeg
        # release the GIL), so the accelerator does not wait for PNG compression.
        pending = []
        for spec, image in samples:
            if "." in spec.key:
                raise ValueError(f"sample key '{spec.key}' contains a dot, which WebDataset splits")
            pending.append((spec, self.pool.submit(encode_image, image, self.recipe)))
        started = time.perf_counter()
        rows, members = [], []
        for spec, encoded in pending:
            data = encoded.result()
            meta = sample_metadata(spec, self.recipe)
            members.append({"__key__": spec.key, suffix: data, "json": json.dumps(meta).encode(),
                            "txt": spec.prompt.encode()})  # fmt: skip
            rows.append(self._row(meta, data))
        files = {}
        if "webdataset" in formats:
            files[f"webdataset/{task.name}.tar"] = self._tar_bytes(members)
        if "parquet" in formats:
            files[f"parquet/{task.name}.parquet"] = self._parquet_bytes(rows)
        digests = {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}
        for path, data in files.items():
            self.out.write_atomic(path, data)
        strengths = {row["strength"] for row in rows}
        record = ShardRecord(
            name=task.name,
            split=task.split,
            shard=task.shard,
            count=len(rows),
            files=digests,
            strength=strengths.pop() if len(strengths) == 1 else None,
            skipped=skipped or [],
            seconds={**(seconds or {}), "write": time.perf_counter() - started},
        )
        self.out.write_atomic(self.out.commit_path(task.name), json.dumps(asdict(record)).encode())
        return record

    def _row(self, meta: dict, image: bytes) -> dict:
        row = {
            "key": meta["key"],
            "image": {"bytes": image, "path": None},
            "prompt": meta["prompt"],
        }
        for name, value in meta["labels"].items():
            row[name] = self.class_index[name][value] if name in self.class_index else value
        row.update({k: meta[k] for k in ("mode", "seed", "steps", "guidance_scale", "strength")})
        return row

    def _tar_bytes(self, members: list[dict]) -> bytes:
        buffer = io.BytesIO()
        with wds.TarWriter(buffer, mtime=TAR_MTIME, encoder=False) as tar:
            for member in members:
                tar.write(member)
        return buffer.getvalue()

    def _parquet_bytes(self, rows: list[dict]) -> bytes:
        schema = self.features.arrow_schema  # carries the `huggingface` features metadata
        table = pa.Table.from_pylist(rows, schema=schema)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=100)
        return buffer.getvalue()
