"""ShardWriter on its own: noise images stand in for rendering, written to real files."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import threading
import tracemalloc
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import small_recipe
from PIL import Image

from synthgen.output.outdir import OutDir
from synthgen.output.shards import ShardWriter, encode_image
from synthgen.plan import SampleSpec, ShardTask
from synthgen.recipe.schema import Recipe, recipe_from_dict
from synthgen.run.planning import build_plan

Samples = list[tuple[SampleSpec, Image.Image]]


def one_shard_recipe(count: int) -> Recipe:
    return recipe_from_dict(small_recipe(num_samples=count, shard_size=count, splits={"train": 1}))


def noise_samples(recipe: Recipe, size: int = 32) -> tuple[ShardTask, Iterator]:
    """The recipe's one shard and its specs, each paired with a noise image made on demand."""
    plan = build_plan(recipe)
    task = plan.tasks[0]
    rng = np.random.default_rng(0)

    def samples():
        for spec in plan.specs(task):
            yield spec, Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))

    return task, samples()


def failing_midway(samples: Iterator, after: int) -> Iterator:
    for i, sample in enumerate(samples):
        if i == after:
            raise RuntimeError("source image failed to load")
        yield sample


def live_threads() -> set[threading.Thread]:
    """Threads other than the encoder pool's, which is shared across shards and stays."""
    return {t for t in threading.enumerate() if not t.name.startswith("encode")}


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def leaves_no_threads_or_files():
    threads, files = live_threads(), open_files()
    yield
    assert live_threads() == threads
    assert open_files() == files


def assert_nothing_written(out: Path) -> None:
    """No commit record, no shard file, no temporary."""
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_files_read_back_with_the_samples_written(tmp_path):
    recipe = one_shard_recipe(250)  # two full row groups and a partial one
    task, samples = noise_samples(recipe)
    samples = list(samples)
    record = ShardWriter(OutDir(str(tmp_path)), recipe).write(task, samples, seconds={"render": 1})
    assert record.count == 250 and set(record.seconds) == {"render", "encode", "write"}
    assert record.seconds["encode"] > 0  # the encoder threads' own time, for the shard's stats
    expected = {spec.key: (spec, encode_image(image, recipe)) for spec, image in samples}

    tar_path = str(tmp_path / "webdataset" / f"{task.name}.tar")
    from_tar = {s["__key__"]: s for s in wds.WebDataset(tar_path, shardshuffle=False)}
    assert list(from_tar) == list(expected)
    for key, (spec, png) in expected.items():
        assert from_tar[key]["png"] == png and from_tar[key]["txt"].decode() == spec.prompt
        assert json.loads(from_tar[key]["json"])["labels"] == spec.labels

    parquet_path = tmp_path / "parquet" / f"{task.name}.parquet"
    metadata = pq.ParquetFile(parquet_path).metadata
    assert [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)] == [
        100,
        100,
        50,
    ]
    rows = datasets.load_dataset("parquet", data_files=str(parquet_path), split="train")
    assert isinstance(rows.features["sex"], datasets.ClassLabel)  # the `huggingface` metadata
    assert rows["key"] == list(expected)
    for row in rows.cast_column("image", datasets.Image(decode=False)):
        spec, png = expected[row["key"]]
        assert row["image"]["bytes"] == png
        assert rows.features["sex"].int2str(row["sex"]) == spec.labels["sex"]
        assert row["findings"] == spec.labels["findings"] and row["age"] == spec.labels["age"]


def test_recorded_sha256_is_that_of_the_files(tmp_path):
    recipe = one_shard_recipe(20)
    record = ShardWriter(OutDir(str(tmp_path)), recipe).write(*noise_samples(recipe))
    assert set(record.files) == {"webdataset/train-000000.tar", "parquet/train-000000.parquet"}
    for path, digest in record.files.items():
        assert hashlib.sha256((tmp_path / path).read_bytes()).hexdigest() == digest
    committed = json.loads((tmp_path / ".synthgen" / "commits" / "train-000000.json").read_text())
    assert committed["files"] == record.files


def test_two_writes_give_identical_bytes(tmp_path):
    recipe = one_shard_recipe(120)
    for run in ("a", "b"):
        ShardWriter(OutDir(str(tmp_path / run)), recipe).write(*noise_samples(recipe))
    for path in ("webdataset/train-000000.tar", "parquet/train-000000.parquet"):
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()


def test_only_the_recipes_formats_are_written(tmp_path):
    raw = small_recipe(num_samples=8, shard_size=8, splits={"train": 1})
    raw["output"]["formats"] = ["parquet"]
    recipe = recipe_from_dict(raw)
    record = ShardWriter(OutDir(str(tmp_path)), recipe).write(*noise_samples(recipe))
    assert list(record.files) == ["parquet/train-000000.parquet"]
    assert not (tmp_path / "webdataset").exists()


def dotted(samples: Iterator, after: int) -> Iterator:
    for i, (spec, image) in enumerate(samples):
        if i == after:
            spec = SampleSpec(0, "unit.0", "train", 1, {}, "p")
        yield spec, image


@pytest.mark.parametrize(
    ("spoil", "error", "match"),
    [(failing_midway, RuntimeError, "failed to load"), (dotted, ValueError, "contains a dot")],
)
def test_a_failing_sample_leaves_nothing(tmp_path, spoil, error, match):
    recipe = one_shard_recipe(60)
    writer = ShardWriter(OutDir(str(tmp_path / "warm")), recipe, encoders=2)
    writer.write(*noise_samples(recipe))  # the encoder pool's threads start here and stay
    writer.out = OutDir(str(tmp_path / "out"))
    task, samples = noise_samples(recipe)
    with leaves_no_threads_or_files(), pytest.raises(error, match=match):
        writer.write(task, spoil(samples, after=40))
    assert_nothing_written(tmp_path / "out")


def test_an_image_that_cannot_be_encoded_fails_the_shard(tmp_path):
    recipe = one_shard_recipe(20)
    task, samples = noise_samples(recipe)
    cmyk = [(spec, image.convert("CMYK") if i == 5 else image) for i, (spec, image) in enumerate(samples)]  # fmt: skip
    with leaves_no_threads_or_files(), pytest.raises(OSError, match="CMYK"):
        ShardWriter(OutDir(str(tmp_path)), recipe).write(task, cmyk)
    assert_nothing_written(tmp_path)


@contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail with EFBIG, as on a full disk (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_write_error_in_the_writer_thread_reaches_the_caller(tmp_path):
    recipe = one_shard_recipe(40)  # a tar of ~500 KB
    writer = ShardWriter(OutDir(str(tmp_path)), recipe)
    task, samples = noise_samples(recipe)
    with leaves_no_threads_or_files(), pytest.raises(OSError, match="too large"):
        with file_size_limit(64 * 1024):
            writer.write(task, samples)
    assert_nothing_written(tmp_path)


def test_a_failed_rename_leaves_nothing(tmp_path):
    recipe = one_shard_recipe(20)
    (tmp_path / "parquet" / "train-000000.parquet").mkdir(parents=True)
    with leaves_no_threads_or_files(), pytest.raises(OSError):
        ShardWriter(OutDir(str(tmp_path)), recipe).write(*noise_samples(recipe))
    assert_nothing_written(tmp_path)  # the tar renamed before the Parquet file failed went too


def test_a_temporary_that_cannot_be_opened_fails_the_shard(tmp_path):
    recipe = one_shard_recipe(20)
    (tmp_path / "parquet").write_text("a file where the folder should be")
    with leaves_no_threads_or_files(), pytest.raises(OSError):
        ShardWriter(OutDir(str(tmp_path)), recipe).write(*noise_samples(recipe))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["parquet", "webdataset"]


def test_a_remote_outdir_gets_the_same_files(tmp_path):
    recipe = one_shard_recipe(20)
    ShardWriter(OutDir(str(tmp_path)), recipe).write(*noise_samples(recipe))
    remote = OutDir(f"memory://shards-{uuid.uuid4().hex}")
    try:
        record = ShardWriter(remote, recipe).write(*noise_samples(recipe))
        assert remote.all_files() == [
            ".synthgen/commits/train-000000.json",
            "parquet/train-000000.parquet",
            "webdataset/train-000000.tar",
        ]
        for path, digest in record.files.items():
            assert remote.read_bytes(path) == (tmp_path / path).read_bytes()
            assert hashlib.sha256(remote.read_bytes(path)).hexdigest() == digest
    finally:
        remote.fs.rm(remote.root, recursive=True)


def test_memory_stays_bounded_whatever_the_shard_size(tmp_path):
    recipe = one_shard_recipe(300)
    writer = ShardWriter(OutDir(str(tmp_path)), recipe, encoders=2)
    task, samples = noise_samples(recipe, size=256)
    tracemalloc.start()
    try:
        writer.write(task, samples)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    images = sum(len(s["png"]) for s in wds.WebDataset(str(tmp_path / "webdataset" / "train-000000.tar"), shardshuffle=False))  # fmt: skip
    assert images > 50e6  # 300 noise PNGs of 256x256: each as big as its pixels
    # One row group (100 images) waits for the Parquet writer; the whole shard never does.
    assert peak < 0.5 * images
