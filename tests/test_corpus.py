"""Corpus scale and Hub-ready files: finalize merges records instead of reading shards, the card's
tables and code blocks hold for the files that exist, `datasets` streams the Parquet config,
mlcroissant reads croissant.json, validate says what shards will weigh."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import datasets
import mlcroissant as mlc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import run_cli, small_recipe, write_recipe
from counting_fs import CountingFS

from synthgen.cli import main
from synthgen.output.label_summary import label_rows, markdown_table
from synthgen.output.outdir import OutDir
from synthgen.recipe.joint import LabelModel
from synthgen.run import finalize as finalize_module
from synthgen.run.finalize import finalize

SAMPLES = 130  # one shard of 130: two Parquet row groups (100 + 30)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    recipe = small_recipe(num_samples=SAMPLES, shard_size=SAMPLES, splits={"train": 1.0})
    recipe["generation"].update(steps=2, height=16, width=16)
    path = write_recipe(base / "corpus.yaml", recipe)
    run_cli("generate", str(path), "-o", str(base / "out"), "--device", "cpu")
    return base / "out"


def rows(out) -> list[dict]:
    table = pq.read_table(next((out / "parquet").glob("*.parquet")))
    return table.drop_columns(["image"]).to_pylist()


def test_asked_vs_drawn_from_merged_records_equals_it_from_the_rows(corpus):
    recipe = OutDir(str(corpus)).recipe()
    model = LabelModel(recipe.labels)
    stats = model.new_stats()
    for row in rows(corpus):  # counted again from the cells themselves, not the records
        labels = {name: row[name] for name in recipe.labels}
        for name, encoding in ((n, s.encoding()) for n, s in recipe.labels.items()):
            labels[name] = encoding.from_stored(labels[name])
        model.add(stats, labels)
    table = markdown_table(label_rows(recipe, stats))
    assert table in (corpus / "README.md").read_text()


def test_finalize_reads_records_and_preview_rows_not_the_shards(corpus, tmp_path):
    out = OutDir(str(corpus))
    out.fs = counting = CountingFS(out.fs)
    finalize(out)
    assert not any(path.endswith(".tar") for path in counting.opened)
    shard = next((corpus / "parquet").glob("*.parquet"))
    images = pq.ParquetFile(shard).metadata.row_group(0).column(1).total_compressed_size
    # 16 preview samples fall in row groups of 100: at most both groups' images, never more.
    assert counting.read < shard.stat().st_size + 200_000
    assert counting.read < sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file()) / 2
    assert images > 0


def test_finalize_shows_a_progress_bar_from_many_shards(corpus, capsys, monkeypatch):
    """From PROGRESS_FROM shards on (lowered here to this OUT's one shard), finalize shows its
    reading of the commit records on stderr; below it, nothing."""
    finalize(OutDir(str(corpus)))
    assert "reading commit records" not in capsys.readouterr().err
    monkeypatch.setattr(finalize_module, "PROGRESS_FROM", 1)
    finalize(OutDir(str(corpus)))
    assert re.search(r"reading commit records: +\d+%\|.*\| \d/1 \[", capsys.readouterr().err)


def test_parquet_is_in_row_groups_of_100_and_datasets_streams_it(corpus):
    meta = pq.ParquetFile(next((corpus / "parquet").glob("*.parquet"))).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [100, 30]
    streamed = datasets.load_dataset(str(corpus), split="train", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    keys = [row["key"] for row in streamed]
    assert keys == [row["key"] for row in rows(corpus)] and len(keys) == SAMPLES


def test_every_python_block_of_the_card_runs_as_written(corpus):
    blocks = re.findall(r"```python\n(.*?)```", (corpus / "README.md").read_text(), re.S)
    assert len(blocks) == 2 and "{000000" not in "".join(blocks)  # a pattern of real shards
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block + "\nprint('ran')"], cwd=corpus,
                              capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert done.returncode == 0 and done.stdout.endswith("ran\n"), done.stderr


def test_croissant_validates_and_yields_every_record(corpus):
    dataset = mlc.Dataset(jsonld=str(corpus / "croissant.json"))
    records = list(dataset.records("train"))
    assert len(records) == OutDir(str(corpus)).manifest().num_samples == SAMPLES
    first = records[0]
    assert first["train/key"] == rows(corpus)[0]["key"].encode()
    assert first["train/image"].size == (16, 16)
    document = json.loads((corpus / "croissant.json").read_text())
    assert document["rai:hasSyntheticData"] is True and "tiny" in document["rai:dataCollection"]
    assert "croissant.json" in run_cli("push", str(corpus), "--repo-id", "o/n", "--dry-run").stdout


def test_validate_says_what_the_shards_will_weigh(tmp_path):
    big = small_recipe(num_samples=200_000, shard_size=50)
    big["generation"].update(height=512, width=512)
    path = write_recipe(tmp_path / "big.yaml", big)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    sizes = re.search(r"about ([\d.]+) KB per image, ([\d.]+) MB per tar shard, [\d.]+ GB in all",
                      result.output)  # fmt: skip
    assert sizes and 100 < float(sizes[1]) < 800, result.output  # 512² RGB PNG
    advice = re.search(r"stream and upload best; shard_size (\d+) would make them", result.output)
    assert advice and 400 < int(advice[1]) * float(sizes[1]) / 1000 < 600  # MB per tar
