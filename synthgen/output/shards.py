"""ShardWriter: stream rendered samples into a WebDataset tar and a Parquet file, then commit.

A shard counts only once its commit record exists (`.synthgen/commits/NAME.json`, written last)
and the files it lists have the sha256 it records. Files are written under temporary names and
renamed, so a worker killed at any instant leaves a committed shard or nothing that counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from synthgen.errors import OutputError
from synthgen.output.outdir import PARQUET, WEBDATASET, OutDir
from synthgen.output.record_packs import PACK_SIZE
from synthgen.output.records import ShardRecord
from synthgen.plan import SampleSpec, ShardTask
from synthgen.recipe.joint import LabelModel
from synthgen.recipe.quality import bind_checks, grouping
from synthgen.recipe.quality_stats import QualityTally, SampleVerdict, column_kinds
from synthgen.recipe.schema import Recipe

log = logging.getLogger(__name__)
IMAGE_SUFFIX = {"png": "png", "jpg": "jpg", "webp": "webp"}
PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
TAR_MTIME = 0  # fixed, so two runs of one recipe write byte-identical tars
ROW_GROUP_SIZE = 100  # preview and audit read a row group at a time, so keep them small
QUEUE_PER_ENCODER = 4  # samples waiting for the writer thread, per encoder thread
_END = object()  # put after a shard's last sample: tells the writer thread to finish
Pending = tuple[SampleSpec, SampleVerdict | None]  # a sample waiting for its encoded image


_FEATURE = {
    "class": None,  # a ClassLabel, which needs the names
    "int64": datasets.Value("int64"),
    "float64": datasets.Value("float64"),
    "bool": datasets.Value("bool"),
    "string": datasets.Value("string"),
    "list<string>": datasets.List(datasets.Value("string")),
    "int32": datasets.Value("int32"),
    "list<float64>": datasets.List(datasets.Value("float64")),
}


def label_features(recipe: Recipe) -> dict[str, datasets.features.features.FeatureType]:
    """The typed `datasets` feature of each label column, from the kind's storage type."""
    return {
        name: _FEATURE[spec.storage] or datasets.ClassLabel(names=list(spec.encoding().names))
        for name, spec in recipe.labels.items()
    }


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
            **quality_features(recipe),
        }
    )


def quality_features(recipe: Recipe) -> dict[str, datasets.features.features.FeatureType]:
    """The quality gate's per-sample columns (none without a `quality` section)."""
    if recipe.quality is None:
        return {}
    kinds = column_kinds(bind_checks(recipe.quality, recipe.labels))
    return {name: _FEATURE[kind] for name, kind in kinds.items()}


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


def sample_metadata(spec: SampleSpec, recipe: Recipe, verdict: SampleVerdict | None = None) -> dict:
    """Everything about a sample except its pixels: the `.json` member and the Parquet row
    (with the quality gate's verdict, when the recipe has one)."""
    g = recipe.generation
    meta = {
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
    if verdict is not None:
        meta["quality"] = verdict.to_json()
    return meta


class HashingFile:
    """A write-only file that hashes what passes through it, so a shard's sha256 never needs a
    second read of a file that may be remote."""

    def __init__(self, handle: IO[bytes]):
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)

    @property
    def closed(self) -> bool:  # pyarrow checks it before writing
        return self.handle.closed

    def close(self) -> None:
        self.handle.close()


class ShardFiles:
    """One shard's tar and Parquet file, appended to sample by sample under temporary names."""

    def __init__(self, out: OutDir, name: str, formats: Iterable[str], schema: pa.Schema):
        self.out = out
        self.schema = schema  # carries the `huggingface` features metadata
        self.temporaries: dict[str, tuple[str, HashingFile]] = {}  # final path -> temporary
        self.renamed: list[str] = []
        self.rows: list[dict] = []
        self.tar: wds.TarWriter | None = None
        self.parquet: pq.ParquetWriter | None = None
        try:
            if "webdataset" in formats:
                tar = self._open(f"{WEBDATASET}/{name}.tar")
                self.tar = wds.TarWriter(tar, mtime=TAR_MTIME, encoder=False)
            if "parquet" in formats:
                self.parquet = pq.ParquetWriter(self._open(f"{PARQUET}/{name}.parquet"), schema)
        except BaseException:
            self.discard()
            raise

    def _open(self, relative: str) -> HashingFile:
        temporary, handle = self.out.open_temporary(relative)
        self.temporaries[relative] = (temporary, HashingFile(handle))
        return self.temporaries[relative][1]

    def append(self, member: dict, row: dict) -> None:
        if self.tar is not None:
            self.tar.write(member)
        if self.parquet is not None:
            self.rows.append(row)
            if len(self.rows) == ROW_GROUP_SIZE:
                self._write_row_group()

    def _write_row_group(self) -> None:
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        # Let go of the rows first: pyarrow hands the image column to Python as one bytes object
        # as big as the row group's images, and both at once would double the peak.
        self.rows = []
        self.parquet.write_table(table, row_group_size=ROW_GROUP_SIZE)

    def close(self) -> dict[str, str]:
        """Finish every file; returns the sha256 of each, by the path it will be renamed to."""
        if self.rows:
            self._write_row_group()
        for writer in (self.tar, self.parquet):
            if writer is not None:
                writer.close()
        for _, file in self.temporaries.values():
            file.close()
        return {path: file.sha256.hexdigest() for path, (_, file) in self.temporaries.items()}

    def sizes(self) -> dict[str, int]:
        return {path: file.size for path, (_, file) in self.temporaries.items()}

    def rename(self) -> None:
        """Move the closed temporaries into place."""
        for path, (temporary, _) in self.temporaries.items():
            self.out.rename(temporary, path)
            self.renamed.append(path)

    def discard(self) -> None:
        """Close what is open and delete what was written, so a failed shard leaves nothing.

        Errors here are swallowed: the one that brought us here is what the caller needs, and a
        temporary left behind is deleted by `OutDir.remove_temporaries` later.
        """
        open_files = [self.tar, self.parquet, *(file for _, file in self.temporaries.values())]
        for file in open_files:
            if file is not None:
                with contextlib.suppress(Exception):
                    file.close()
        for path, (temporary, _) in self.temporaries.items():
            with contextlib.suppress(Exception):
                self.out.remove(path if path in self.renamed else temporary)


class ShardStream:
    """Feeds a shard's samples to its files on a background thread, in sample order, as their
    encodes finish: the render thread hands each sample off and goes on, and at most `depth`
    samples (plus one row group) wait in memory."""

    def __init__(
        self,
        files: ShardFiles,
        entry: Callable[[Pending, bytes], tuple[dict, dict]],
        depth: int,
    ):
        self.files = files
        self.entry = entry  # (sample, encoded image) -> (tar member, Parquet row)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.cancelled = threading.Event()
        self.error: BaseException | None = None
        self.digests: dict[str, str] = {}
        self.ended = False
        self.thread = threading.Thread(target=self._run, name="shard-writer")
        self.thread.start()

    def put(self, sample: Pending, encoded: Future[bytes]) -> None:
        if self.error is not None:
            raise self.error  # stop rendering now rather than at the end of the shard
        self.queue.put((sample, encoded))

    def finish(self) -> dict[str, str]:
        """Wait for the writer to finish the files; returns their sha256 by final path."""
        self._end()
        if self.error is not None:
            raise self.error
        return self.digests

    def abandon(self) -> None:
        """Stop the writer and delete the shard's files."""
        self.cancelled.set()
        self._end()
        self.files.discard()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.queue.put(_END)
        self.thread.join()

    def _run(self) -> None:
        samples = iter(self.queue.get, _END)  # stops for good once it has taken _END
        try:
            for sample, encoded in samples:
                if not self.cancelled.is_set():
                    self.files.append(*self.entry(sample, encoded.result()))
            if not self.cancelled.is_set():
                self.digests = self.files.close()
        except BaseException as error:
            self.error = error
            # Keep taking samples until _END, so the render thread never blocks on a full queue.
            for _ in samples:
                pass


class ShardWriter:
    """Writes shards one after another; `close` (or a `with` block) packs the records not yet
    packed and stops its encoder threads."""

    def __init__(
        self,
        out: OutDir,
        recipe: Recipe,
        encoders: int | None = None,
        check_weights: dict[str, str] | None = None,
    ):
        self.out = out
        self.recipe = recipe
        self.encoders = encoders or min(8, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(self.encoders, "encode")
        self.unpacked: list[ShardRecord] = []  # committed, in no pack yet
        self.features = dataset_features(recipe)
        self.labels = LabelModel(recipe.labels)
        self.suffix = IMAGE_SUFFIX[recipe.output.image_format]
        self.encode_seconds = 0.0  # summed over the pool's threads, for the shard's stats
        self._encode_lock = threading.Lock()
        self.check_weights = dict(check_weights or {})  # quality check -> model sha256
        self.quality_cells = None
        if recipe.quality is not None:
            balance = recipe.balance
            self.quality_cells = grouping(recipe.quality, recipe.labels,
                                          balance.by if balance else (),
                                          balance.bins if balance else None)  # fmt: skip

    def close(self) -> None:
        self._pack()
        self.pool.shutdown(wait=True)

    def _pack(self) -> None:
        """Write the committed records not yet packed as one pack. A pack only saves readers
        round trips, so failing to write one never fails a committed shard."""
        if not self.unpacked:
            return
        try:
            self.out.write_pack(self.unpacked)
        except OutputError as error:
            log.warning("records not packed: %s", error.message)
        self.unpacked = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _encode(self, image: Image.Image) -> bytes:
        started = time.perf_counter()
        data = encode_image(image, self.recipe)
        with self._encode_lock:
            self.encode_seconds += time.perf_counter() - started
        return data

    def write(
        self,
        task: ShardTask,
        samples: Iterable[tuple[SampleSpec, Image.Image]]
        | Iterable[tuple[SampleSpec, Image.Image | None, SampleVerdict]],
        seconds: dict[str, float] | None = None,
    ) -> ShardRecord:
        """Write and commit one shard. Under a quality gate each sample comes with its verdict,
        and a dropped one with no image: it is counted, not written."""
        schema = self.features.arrow_schema
        files = ShardFiles(self.out, task.name, self.recipe.output.formats, schema)
        stream = ShardStream(files, self._entry, depth=QUEUE_PER_ENCODER * self.encoders)
        count, self.encode_seconds = 0, 0.0
        stats = self.labels.new_stats()
        cells: dict[str, int] = {}
        quality = QualityTally(weights=self.check_weights) if self.quality_cells else None
        try:
            for spec, image, *gated in samples:
                if "." in spec.key:
                    raise ValueError(
                        f"sample key '{spec.key}' contains a dot, which WebDataset splits"
                    )
                verdict = gated[0] if gated else None
                if quality is not None and self.quality_cells is not None:
                    quality.add(spec.key, self.quality_cells.cell(spec.labels), verdict)
                if image is None:  # dropped by the quality gate
                    continue
                # Encoding runs in the pool while the renderer makes the next batch (zlib and
                # libjpeg release the GIL), so the accelerator does not wait for PNG compression.
                stream.put((spec, verdict), self.pool.submit(self._encode, image))
                self.labels.add(stats, spec.labels)
                if spec.cell is not None:
                    cells[spec.cell] = cells.get(spec.cell, 0) + 1
                count += 1
            started = time.perf_counter()
            digests = stream.finish()
            files.rename()
        except BaseException:
            stream.abandon()
            raise
        record = ShardRecord(
            name=task.name,
            split=task.split,
            shard=task.shard,
            count=count,
            files=digests,
            sizes=files.sizes(),
            strength=task.strength,
            seconds={
                **(seconds or {}),
                "encode": self.encode_seconds,  # pool-thread seconds, beside the rendering
                "write": time.perf_counter() - started,
            },
            labels=stats,
            cells=dict(sorted(cells.items())),
            quality=quality,
        )
        self.out.commit(record)
        self.unpacked.append(record)
        if len(self.unpacked) >= PACK_SIZE:
            self._pack()
        return record

    def _entry(self, sample: Pending, image: bytes) -> tuple[dict, dict]:
        """The tar member and the Parquet row of one encoded sample."""
        spec, verdict = sample
        meta = sample_metadata(spec, self.recipe, verdict)
        member = {"__key__": spec.key, self.suffix: image, "json": json.dumps(meta).encode(),
                  "txt": spec.prompt.encode()}  # fmt: skip
        row = self._row(meta, image)
        if verdict is not None:
            row.update(verdict.columns())
        return member, row

    def _row(self, meta: dict, image: bytes) -> dict:
        row = {
            "key": meta["key"],
            "image": {"bytes": image, "path": None},
            "prompt": meta["prompt"],
        }
        for name, value in meta["labels"].items():
            row[name] = self.recipe.labels[name].to_stored(value)
        row.update({k: meta[k] for k in ("mode", "seed", "steps", "guidance_scale", "strength")})
        return row
