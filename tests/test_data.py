"""Training loaders: webdataset streaming, wids random access and Parquet via `datasets` read the
same samples and labels as `datasets.load_dataset` on OUT; the pretraining example runs."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import uuid
from pathlib import Path

import datasets
import fsspec
import numpy as np
import pytest
import torch
import wids
import yaml
from conftest import ROOT, write_recipe
from PIL import Image
from torch.utils.data import DataLoader

from synthgen.cohort.demo import make_cohort
from synthgen.data import (
    LabelEncoder,
    label_encoder,
    parquet_dataset,
    webdataset_loader,
    wids_dataset,
)
from synthgen.errors import OutputError
from synthgen.output.outdir import OutDir
from synthgen.output.shards import ShardWriter
from synthgen.output.wids_index import write_wids_index
from synthgen.recipe.labels import LabelEncoding
from synthgen.recipe.schema import load_recipe
from synthgen.run.finalize import finalize
from synthgen.run.generate import claim_output
from synthgen.run.planning import build_plan


def pixels(data: bytes) -> torch.Tensor:
    """The decoding every loader must agree with, written out independently."""
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def reference(out: Path, config: str = "default") -> dict[str, dict[str, tuple[bytes, dict]]]:
    """split → key → (image bytes, labels as in the tars), read by plain `load_dataset` on OUT."""
    loaded = datasets.load_dataset(str(out), config)
    manifest = json.loads((out / "manifest.json").read_text())  # read apart from synthgen
    result = {}
    for split, rows in loaded.items():
        rows = rows.cast_column("image", datasets.Image(decode=False))
        result[split] = {}
        for row in rows:
            labels = {name: row[name] for name in manifest["labels"]}
            for name, encoding in manifest["labels"].items():
                if encoding["kind"] == "categorical":
                    labels[name] = encoding["names"][labels[name]]
            result[split][row["key"]] = (row["image"]["bytes"], labels)
    return result


def loaders(out: str, split: str, cache: Path, **options) -> dict[str, list[dict]]:
    """Every sample of `split` through each synthgen loader, in written order."""
    by_index = lambda ds: [ds[i] for i in range(len(ds))]  # noqa: E731
    return {
        "webdataset": list(webdataset_loader(out, split, shuffle=0, **options)),
        "wids": by_index(wids_dataset(out, split, cache_dir=str(cache), **options)),
        "parquet": by_index(parquet_dataset(out, split, **options)),
    }


def assert_same_samples(out: str, expected: dict[str, tuple[bytes, dict]], split: str,
                        cache: Path, strength: float | None = None) -> None:  # fmt: skip
    manifest = OutDir(out).manifest()
    encode = label_encoder(manifest)
    for targets in (True, False):
        paths = loaders(out, split, cache, strength=strength, targets=targets)
        for name, samples in paths.items():
            assert [s["key"] for s in samples] == sorted(expected), name
            for sample in samples:
                data, labels = expected[sample["key"]]
                assert torch.equal(sample["image"], pixels(data)), (name, sample["key"])
                if not targets:
                    assert sample["labels"] == labels, (name, sample["key"])
                    continue
                wanted = encode(labels)
                assert sample["labels"].keys() == wanted.keys()
                for label, value in wanted.items():
                    got = sample["labels"][label]
                    assert got.dtype == value.dtype and torch.equal(got, value), (name, label)


def test_label_encoder_follows_the_manifest():
    labels = {
        "sex": {"kind": "categorical", "names": ["male", "female"]},
        "findings": {"kind": "multilabel", "names": ["a", "b", "c"], "none": "no finding"},
        "age": {"kind": "numeric"},
        "site": {"kind": "constant"},
    }
    encode = LabelEncoder({name: LabelEncoding.from_json(raw) for name, raw in labels.items()})
    targets = encode({"sex": "female", "findings": ["c", "a"], "age": 61, "site": "x"})
    assert set(targets) == {"sex", "findings", "age"}
    assert targets["sex"].dtype == torch.int64 and targets["sex"].item() == 1
    assert targets["findings"].tolist() == [1.0, 0.0, 1.0]
    assert targets["age"].dtype == torch.float32 and targets["age"].item() == 61.0
    assert encode({"sex": "male", "findings": [], "age": 0.5})["findings"].sum() == 0
    assert encode.sizes() == {"sex": 2, "findings": 3, "age": 1}
    with pytest.raises(ValueError, match="label 'sex': 'other' is not one of male, female"):
        encode({"sex": "other", "findings": [], "age": 1})


def test_every_path_reads_the_samples_and_labels_of_load_dataset(fresh_copy, tmp_path):
    out = OutDir(str(fresh_copy))
    for split in ("train", "test"):  # finalize wrote them; writing again gives the same bytes
        before = (fresh_copy / f"webdataset/{split}.wids.json").read_bytes()
    assert write_wids_index(out, out.manifest()) == [
        "webdataset/train.wids.json", "webdataset/test.wids.json",
    ]  # fmt: skip
    assert (fresh_copy / "webdataset/test.wids.json").read_bytes() == before
    expected = reference(fresh_copy)
    assert {split: len(rows) for split, rows in expected.items()} == {"train": 16, "test": 4}
    for split in expected:
        assert_same_samples(str(fresh_copy), expected[split], split, tmp_path / "cache")

        # The index alone is enough for plain wids, with URLs relative to the index.
        index = json.loads((fresh_copy / f"webdataset/{split}.wids.json").read_text())
        assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
        assert all("/" not in shard["url"] for shard in index["shardlist"])
        plain = wids.ShardListDataset(
            str(fresh_copy / f"webdataset/{split}.wids.json"),
            cache_dir=str(tmp_path / f"plain-{split}"),
            transformations=[],
        )
        assert len(plain) == len(expected[split])
        for i in range(len(plain)):
            sample = plain[i]
            data, labels = expected[split][sample["__key__"]]
            assert sample[".png"].getvalue() == data
            assert json.loads(sample[".json"].getvalue())["labels"] == labels


def test_streaming_shuffles_across_workers_and_batches(generated):
    out = str(generated)
    written = [s["key"] for s in webdataset_loader(out, shuffle=0)]
    once = [s["key"] for s in webdataset_loader(out, seed=1)]
    assert once == [s["key"] for s in webdataset_loader(out, seed=1)]
    assert sorted(once) == written and once != written

    loader = DataLoader(webdataset_loader(out, image_size=32, seed=1), batch_size=4, num_workers=2)
    keys = []
    for batch in loader:
        assert batch["image"].shape == (4, 3, 32, 32)
        assert batch["image"].dtype == torch.float32 and 0 <= batch["image"].min()
        assert batch["image"].max() <= 1
        assert batch["labels"]["sex"].dtype == torch.int64
        assert batch["labels"]["findings"].shape == (4, 2)
        assert batch["labels"]["age"].dtype == torch.float32
        keys += batch["key"]
    assert sorted(keys) == written  # each worker read its own shard, none twice


def test_a_remote_out_reads_the_same(generated, tmp_path, monkeypatch):
    # The tests run offline, and `datasets` takes any URL for the network; memory:// is not.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    memory = fsspec.filesystem("memory")
    root = f"/synthgen-{uuid.uuid4().hex[:8]}"
    memory.put(str(generated), root, recursive=True)
    try:
        local = loaders(str(generated), "test", tmp_path / "local")
        remote = loaders(f"memory://{root}", "test", tmp_path / "remote")
        for name in local:
            assert [s["key"] for s in remote[name]] == [s["key"] for s in local[name]]
            for a, b in zip(local[name], remote[name]):
                assert torch.equal(a["image"], b["image"])
                assert all(torch.equal(a["labels"][k], b["labels"][k]) for k in a["labels"])
        assert len(list((tmp_path / "remote").iterdir())) == 1  # the one test shard, fetched
    finally:
        memory.rm(root, recursive=True)


def write_sweep_without_rendering(base: Path) -> Path:
    """A real i2i sweep OUT (plan, ShardWriter, finalize) with noise standing in for rendering."""
    cohort = make_cohort(base / "cohort", rows=8, size=32)
    recipe = yaml.safe_load((ROOT / "recipes" / "demo-i2i.yaml").read_text())
    recipe.update(name="sweep", shard_size=3)
    recipe["source"]["manifest"] = str(cohort)
    recipe["privacy"]["linkage"] = str(base / "linkage.csv")
    recipe["generation"]["strength"] = [0.3, 0.8]
    recipe = load_recipe(write_recipe(base / "sweep.yaml", recipe))
    plan = build_plan(recipe)
    out = OutDir(str(base / "out"))
    claim_output(out, recipe, plan)
    writer = ShardWriter(out, recipe)
    rng = np.random.default_rng(0)
    for task in plan.tasks:
        noise = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
                 for _ in range(task.size)]  # fmt: skip
        writer.write(task, zip(plan.specs(task), noise))
    finalize(out)
    return base / "out"


def test_strength_configs_of_an_i2i_sweep(tmp_path):
    out = write_sweep_without_rendering(tmp_path)
    everything = reference(out)
    for strength in (0.3, 0.8):
        expected = reference(out, f"strength-{strength:g}")
        for split, rows in expected.items():
            assert rows and set(rows) < set(everything[split])
            assert_same_samples(str(out), rows, split, tmp_path / "cache", strength=strength)
    assert_same_samples(str(out), everything["train"], "train", tmp_path / "cache")


def test_missing_manifest_split_or_strength_are_clear_errors(generated, tmp_path):
    with pytest.raises(OutputError, match="no manifest.json"):
        webdataset_loader(str(tmp_path))
    with pytest.raises(OutputError, match="no split 'validation'; this dataset has train, test"):
        parquet_dataset(str(generated), "validation")
    with pytest.raises(OutputError, match="no webdataset files at strength 0.5"):
        wids_dataset(str(generated), strength=0.5)


def test_pretrain_example_trains_with_workers(generated):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "pretrain.py"),
            str(generated),
            "--steps",
            "4",
            "--batch-size",
            "8",
            "--num-workers",
            "2",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    losses = [float(x) for x in re.findall(r"^step \d+ loss (\S+)", result.stdout, re.M)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert "done: 4 steps" in result.stdout
