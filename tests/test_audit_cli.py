"""`synthgen audit` end to end: a tiny-model i2i strength sweep, its linkage table, the cohort."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import run_cli, write_recipe
from PIL import Image
from test_i2i import MARKER, i2i_recipe

from synthgen.audit.inputs import synthetic_items
from synthgen.cohort.demo import make_cohort
from synthgen.output.outdir import OutDir
from synthgen.output.records import Manifest, ShardEntry
from synthgen.recipe.schema import load_recipe
from synthgen.run.generate import generate


def test_audit_of_a_strength_sweep_writes_every_report_file(tmp_path):
    cohort = make_cohort(tmp_path / "cohort", rows=8, marker=MARKER)
    linkage = tmp_path / "linkage.csv"
    recipe_dict = i2i_recipe(cohort, linkage, strength=[0.3, 0.9], steps=4)
    recipe = write_recipe(tmp_path / "sweep.yaml", recipe_dict)
    out = tmp_path / "out"
    assert not generate(load_recipe(recipe), str(out)).failed

    report_dir = tmp_path / "report"
    run_cli("audit", str(out), "--source", str(recipe), "--linkage", str(linkage),
            "-o", str(report_dir), "--append-to-card")  # fmt: skip
    for name in ("report.json", "report.csv", "report.md", "tradeoff.png", "pairs.png"):
        assert (report_dir / name).stat().st_size > 0, name
    report = json.loads((report_dir / "report.json").read_text())
    strengths = sorted(g["strength"] for g in report["groups"] if g["strength"] is not None)
    assert strengths == [0.3, 0.9]
    assert report["settings"]["n_sources"] == 8 and report["settings"]["n_synthetic"] == 16
    with open(report_dir / "report.csv") as handle:
        assert len(list(csv.DictReader(handle))) >= 2
    for name in ("report.json", "report.csv", "report.md"):
        assert MARKER not in (report_dir / name).read_text(), f"a source id leaked into {name}"
    card = (out / "README.md").read_text()
    assert "i2i strength=0.3" in card and "image top-1" in card
    assert MARKER not in card


def test_audit_refuses_keys_missing_from_the_linkage(tmp_path):
    cohort = make_cohort(tmp_path / "cohort", rows=4, marker=MARKER)
    linkage = tmp_path / "linkage.csv"
    recipe = write_recipe(tmp_path / "r.yaml", i2i_recipe(cohort, linkage, steps=2))
    assert not generate(load_recipe(recipe), str(tmp_path / "out")).failed
    rows = linkage.read_text().splitlines()
    linkage.write_text("\n".join(rows[:-1]) + "\n")
    result = run_cli("audit", str(tmp_path / "out"), "--source", str(recipe), "--linkage",
                     str(linkage), "-o", str(tmp_path / "rep"), check=False)  # fmt: skip
    assert result.returncode == 2 and "not in the linkage table" in result.stderr
    missing = run_cli("audit", str(tmp_path / "out"), "--source", str(recipe), "--linkage",
                      str(tmp_path / "nope.csv"), "-o", str(tmp_path / "rep"), check=False)  # fmt: skip
    assert missing.returncode == 2 and "--linkage" in missing.stderr


def test_synthetic_items_read_each_shard_byte_once_a_row_group_at_a_time(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (250, 32, 32, 3), dtype=np.uint8)  # noise: images dominate
    rows = []
    for i, image in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        cell = {"bytes": buffer.getvalue(), "path": None}
        rows.append({"key": f"k{i:03d}", "image": cell, "strength": i / 250})
    out = OutDir(str(tmp_path / "out"))
    shard = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), shard, row_group_size=100)  # groups of 100, 100, 50
    out.write_atomic("parquet/train-000000.parquet", shard.getvalue())
    entry = ShardEntry("train-000000", "train", 0, 250, {"parquet/train-000000.parquet": "-"})
    manifest = Manifest("t", "t2i", "-", {}, None, 250, {"train": 250}, {}, {}, [], [entry])
    out.write_atomic("manifest.json", manifest.to_json())

    read = []
    opened = out.fs.open

    class Counted:  # the file pyarrow reads from, counting what it takes
        def __init__(self, *args, **kwargs):
            self.file = opened(*args, **kwargs)

        def read(self, *args):
            data = self.file.read(*args)
            read.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(out.fs, "open", Counted)
    items = synthetic_items(out, None)
    assert [(item.key, item.source_id, item.strength) for item in items] == [
        (row["key"], None, row["strength"]) for row in rows
    ]
    for item, image in zip(items, pixels, strict=True):
        assert np.array_equal(np.asarray(item.image()), image), item.key
    # the footer (pyarrow reads the last 64 KiB) once; every image once, not twice
    assert sum(read) < len(shard.getvalue()) + 64 * 1024
