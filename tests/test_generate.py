"""End to end on the tiny model: files read back by datasets, webdataset and pyarrow; determinism."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import datasets
import pytest
import webdataset as wds
import yaml
from conftest import run_cli, small_recipe, write_recipe
from PIL import Image

from synthgen.output.outdir import OutDir
from synthgen.output.shards import ShardWriter
from synthgen.plan import SampleSpec, ShardTask
from synthgen.recipe.schema import recipe_from_dict
from synthgen.run.generate import generate


def tars(out: Path) -> list[str]:
    return sorted(str(p) for p in (out / "webdataset").glob("*.tar"))


def tar_samples(out: Path) -> dict[str, dict]:
    samples = {}
    for sample in wds.WebDataset(tars(out), shardshuffle=False):
        samples[sample["__key__"]] = sample
    return samples


def image_digests(out: Path) -> dict[str, str]:
    return {key: hashlib.sha256(s["png"]).hexdigest() for key, s in tar_samples(out).items()}


def test_load_dataset_reads_the_parquet_config(generated):
    ds = datasets.load_dataset(str(generated))
    assert set(ds) == {"train", "test"}
    assert (ds["train"].num_rows, ds["test"].num_rows) == (16, 4)
    features = ds["train"].features
    assert isinstance(features["sex"], datasets.ClassLabel)
    assert features["sex"].names == ["male", "female"]
    assert features["age"].dtype == "int64"
    assert features["findings"].feature.dtype == "string"
    row = ds["train"][0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 64)
    assert row["key"] == "unit-00000000" and row["mode"] == "t2i" and row["steps"] == 4
    assert 40 <= row["age"] <= 75


def test_load_dataset_reads_the_tars(generated):
    ds = datasets.load_dataset("webdataset", data_files={"train": tars(generated)}, split="train")
    assert ds.num_rows == 20
    assert {"png", "json", "txt"} <= set(ds.column_names)


def test_tars_and_parquet_hold_the_same_samples(generated):
    from_tars = tar_samples(generated)
    rows = datasets.load_dataset(str(generated))
    sex_names = rows["train"].features["sex"].names
    seen = set()
    for split in rows.values():
        split = split.cast_column("image", datasets.Image(decode=False))
        for row in split:
            sample = from_tars[row["key"]]
            meta = json.loads(sample["json"])
            assert row["image"]["bytes"] == sample["png"]
            assert row["prompt"] == sample["txt"].decode() == meta["prompt"]
            assert sex_names[row["sex"]] == meta["labels"]["sex"]
            assert (
                row["age"] == meta["labels"]["age"]
                and row["findings"] == meta["labels"]["findings"]
            )
            assert row["seed"] == meta["seed"]
            seen.add(row["key"])
    assert seen == set(from_tars) and len(seen) == 20


def test_multilabel_prompts_join_findings(generated):
    prompts = [s["txt"].decode() for s in tar_samples(generated).values()]
    assert any(p.endswith("showing no finding") for p in prompts)
    for sample in tar_samples(generated).values():
        findings = json.loads(sample["json"])["labels"]["findings"]
        expected = ", ".join(findings) if findings else "no finding"
        assert sample["txt"].decode().endswith(f"showing {expected}")


def test_runs_are_identical_and_independent_of_shard_size(tmp_path, generated):
    reference = image_digests(generated)
    again = tmp_path / "again"
    generate(recipe_from_dict(small_recipe()), str(again))
    assert image_digests(again) == reference
    assert [Path(t).read_bytes() for t in tars(again)] == [
        Path(t).read_bytes() for t in tars(generated)
    ]
    reshard = tmp_path / "reshard"
    generate(recipe_from_dict(small_recipe(shard_size=3)), str(reshard))
    assert len(tars(reshard)) > len(tars(generated))
    assert image_digests(reshard) == reference


def test_manifest_and_card(generated):
    manifest = json.loads((generated / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 20
    assert manifest["counts"] == {"train": 16, "test": 4}
    assert manifest["model"]["base"] == "tiny"
    assert manifest["labels"]["sex"] == {"kind": "categorical", "names": ["male", "female"]}
    for shard in manifest["shards"]:
        for path, digest in shard["files"].items():
            assert hashlib.sha256((generated / path).read_bytes()).hexdigest() == digest
    card = (generated / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["tags"] == ["synthetic", "synthgen", "medical"]
    assert header["annotations_creators"] == ["machine-generated"]
    assert [c["config_name"] for c in header["configs"]] == ["default"]
    assert all(f["path"].startswith("parquet/") for f in header["configs"][0]["data_files"])
    assert "| sex | male |" in card and "asked" in card
    assert yaml.safe_load((generated / "recipe.yaml").read_text())["name"] == "unit"
    from huggingface_hub import DatasetCard

    assert DatasetCard(card).data.license == "cc-by-4.0"


def test_second_generate_is_a_no_op(generated):
    before = {p: p.stat().st_mtime_ns for p in generated.rglob("*") if p.is_file()}
    recipe = write_recipe(generated.parent / "unit.yaml", small_recipe())
    result = run_cli("generate", str(recipe), "-o", str(generated))
    assert "already complete" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in generated.rglob("*") if p.is_file()} == before


def test_another_recipe_is_refused_without_overwrite(tmp_path, fresh_copy):
    other = write_recipe(tmp_path / "other.yaml", small_recipe(seed=7, num_samples=4))
    refused = run_cli("generate", str(other), "-o", str(fresh_copy), check=False)
    assert refused.returncode == 2
    assert "different recipe" in refused.stderr and "Traceback" not in refused.stderr
    assert json.loads((fresh_copy / "manifest.json").read_text())["num_samples"] == 20
    run_cli("generate", str(other), "-o", str(fresh_copy), "--overwrite")
    assert json.loads((fresh_copy / "manifest.json").read_text())["num_samples"] == 4
    assert len(tar_samples(fresh_copy)) == 4


def test_foreign_files_are_never_overwritten(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe())
    refused = run_cli("generate", str(recipe), "-o", str(out), "--overwrite", check=False)
    assert refused.returncode == 2 and "did not write" in refused.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_writer_refuses_keys_with_dots(tmp_path):
    recipe = recipe_from_dict(small_recipe())
    spec = SampleSpec(index=0, key="unit.0", split="train", seed=1, labels={}, prompt="p")
    writer = ShardWriter(OutDir(str(tmp_path)), recipe)
    with pytest.raises(ValueError, match="dot"):
        writer.write(ShardTask("train", 0, 0, 1), [(spec, Image.new("RGB", (8, 8)))])


def test_info_reports_counts_and_labels(generated):
    result = run_cli("info", str(generated))
    assert "complete" in result.stdout and "train: 16 samples" in result.stdout
    assert "| laterality |" in result.stdout


def test_resume_redoes_a_shard_cut_short_and_verify_finds_one_altered(tmp_path, generated):
    out = tmp_path / "out"
    shutil.copytree(generated, out)
    recipe = recipe_from_dict(small_recipe())
    original = {path: Path(path).read_bytes() for path in tars(out)}
    first, second = sorted(original)[:2]
    records = json.loads((out / "manifest.json").read_text())["shards"]
    assert all(r["sizes"] == {p: (out / p).stat().st_size for p in r["files"]} for r in records)
    count = {str(out / p): r["count"] for r in records for p in r["files"] if p.endswith(".tar")}

    (out / "manifest.json").unlink()  # an interrupted run: not finalized
    Path(first).write_bytes(original[first][:-512])  # cut short after its commit
    result = generate(recipe, str(out))
    assert result.rendered == count[first] and result.resumed_shards == len(records) - 1
    assert Path(first).read_bytes() == original[first]

    (out / "manifest.json").unlink()
    altered = bytearray(original[second])
    altered[700] ^= 0xFF  # same size: only re-hashing sees it
    Path(second).write_bytes(bytes(altered))
    assert generate(recipe, str(out)).rendered == 0  # the quick check trusts names and sizes
    (out / "manifest.json").unlink()
    assert generate(recipe, str(out), verify=True).rendered == count[second]
    assert Path(second).read_bytes() == original[second]
