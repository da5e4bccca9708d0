"""Image-to-image over a fake cohort: the privacy firewall, input kinds, errors, sweeps."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import datasets
import pytest
import webdataset as wds
import yaml
from conftest import ROOT, run_cli, write_recipe

from synthgen.cohort.demo import make_cohort, write_table
from synthgen.recipe.schema import load_recipe
from synthgen.run.generate import generate

MARKER = "ZQXSENTINEL42"


def i2i_recipe(cohort: Path, linkage: Path, **generation) -> dict:
    recipe = yaml.safe_load((ROOT / "recipes" / "demo-i2i.yaml").read_text())
    recipe["name"] = "deid"
    recipe["shard_size"] = 6
    recipe["source"]["manifest"] = str(cohort)
    recipe["source"]["on_error"] = "fail"
    recipe["privacy"]["linkage"] = str(linkage)
    recipe["generation"].update({"steps": 4, "batch_size": 4, "strength": 0.5, **generation})
    return recipe


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """8 rows, one per input kind (8-bit, 16-bit, RGBA PNG, JPEG, CMYK, TIFF, DICOM x2)."""
    return make_cohort(tmp_path_factory.mktemp("cohort"), rows=8, marker=MARKER)


@pytest.fixture(scope="module")
def deidentified(tmp_path_factory, cohort) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("deid")
    linkage = base / "linkage.csv"
    recipe = write_recipe(base / "deid.yaml", i2i_recipe(cohort, linkage))
    run_cli("generate", str(recipe), "-o", str(base / "out"))
    return base / "out", linkage


def read_tars(out: Path) -> dict[str, dict]:
    shards = sorted(str(p) for p in (out / "webdataset").glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}


def test_no_cohort_identifier_reaches_any_byte_of_the_output(deidentified, cohort):
    out, _ = deidentified
    with open(cohort) as handle:
        rows = list(csv.DictReader(handle))
    secrets = {MARKER, str(cohort.parent)}
    for row in rows:
        secrets |= {
            row["image_file"],
            Path(row["image_file"]).name,
            row["study_id"],
            row["patient_id"],
        }
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret!r} leaked into {path.relative_to(out)}"
        assert MARKER not in str(path.relative_to(out))


def test_linkage_maps_every_key_to_its_source(deidentified, cohort):
    out, linkage = deidentified
    assert not linkage.is_relative_to(out)
    with open(linkage) as handle:
        links = list(csv.DictReader(handle))
    with open(cohort) as handle:
        ids = {row["study_id"] for row in csv.DictReader(handle)}
    keys = set(read_tars(out))
    assert {link["key"] for link in links} == keys and len(keys) == 8
    assert {link["source_id"] for link in links} == ids
    rows_in_key_order = [int(link["source_row"]) for link in sorted(links, key=lambda r: r["key"])]
    assert rows_in_key_order != sorted(rows_in_key_order), "keys must not follow the cohort order"


def test_every_input_kind_renders_with_its_labels(deidentified, cohort):
    out, linkage = deidentified
    with open(cohort) as handle:
        rows = list(csv.DictReader(handle))
    with open(linkage) as handle:
        source_of = {link["key"]: int(link["source_row"]) for link in csv.DictReader(handle)}
    samples = read_tars(out)
    assert (
        len(samples) == len(rows) == 8
    )  # png8, png16, jpeg, rgba, dicom MONOCHROME1/2, tiff, cmyk
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        row = rows[source_of[key] - 1]
        assert meta["labels"] == {"laterality": row["Eye"], "age": int(row["AgeYears"]),
                                  "sex": row["Sex"], "sbp": int(row["SBP"])}  # fmt: skip
        assert meta["strength"] == 0.5 and meta["mode"] == "i2i"
    card = (out / "README.md").read_text()
    assert "## Privacy" in card and "reduced, not removed" in card


def test_i2i_is_deterministic_per_key(tmp_path, deidentified, cohort):
    out, _ = deidentified
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", i2i_recipe(cohort, tmp_path / "l.csv")))
    generate(recipe, str(tmp_path / "again"))
    digest = lambda samples: {k: hashlib.sha256(s["png"]).hexdigest() for k, s in samples.items()}  # noqa: E731
    assert digest(read_tars(tmp_path / "again")) == digest(read_tars(out))


def test_strength_sweep_with_repeats_and_per_strength_configs(tmp_path, cohort):
    recipe_dict = i2i_recipe(cohort, tmp_path / "l.csv", strength=[0.3, 0.8], repeats=2)
    recipe_dict["output"]["grayscale"] = True
    out = tmp_path / "sweep"
    generate(load_recipe(write_recipe(tmp_path / "r.yaml", recipe_dict)), str(out))
    samples = read_tars(out)
    assert len(samples) == 8 * 2 * 2
    strengths = [json.loads(s["json"])["strength"] for s in samples.values()]
    assert sorted(set(strengths)) == [0.3, 0.8] and strengths.count(0.3) == 16
    low = datasets.load_dataset(str(out), "strength-0.3")
    assert sum(split.num_rows for split in low.values()) == 16
    assert all(v == pytest.approx(0.3) for split in low.values() for v in split["strength"])
    assert low["train"][0]["image"].mode == "L"
    every = datasets.load_dataset(str(out))
    assert sum(split.num_rows for split in every.values()) == 32


def cohort_copy(tmp_path: Path, cohort: Path, name: str) -> tuple[Path, list[dict]]:
    """A copy of the cohort's folder (its images stay inside it) and the rows of its table."""
    folder = shutil.copytree(cohort.parent, tmp_path / name)
    with open(cohort) as handle:
        return Path(folder), list(csv.DictReader(handle))


def corrupt_cohort(tmp_path: Path, cohort: Path) -> Path:
    """The cohort plus a 9th row whose PNG is cut in half."""
    broken, rows = cohort_copy(tmp_path, cohort, "broken")
    good = (broken / rows[0]["image_file"]).read_bytes()
    (broken / f"{MARKER}_cut.png").write_bytes(good[: len(good) // 2])
    rows.append({**rows[0], "image_file": f"{MARKER}_cut.png", "study_id": f"{MARKER}-x"})
    manifest = broken / "manifest.csv"
    write_table(manifest, rows)
    return manifest


def test_corrupt_image_fails_before_any_commit(tmp_path, cohort):
    recipe = write_recipe(
        tmp_path / "r.yaml", i2i_recipe(corrupt_cohort(tmp_path, cohort), tmp_path / "l.csv")
    )
    result = run_cli("generate", str(recipe), "-o", str(tmp_path / "out"), check=False)
    assert result.returncode == 2
    assert "row 9" in result.stderr and "truncated" in result.stderr
    assert MARKER not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_corrupt_image_is_skipped_and_recorded(tmp_path, cohort):
    recipe_dict = i2i_recipe(corrupt_cohort(tmp_path, cohort), tmp_path / "l.csv")
    recipe_dict["source"]["on_error"] = "skip"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict)
    result = run_cli("generate", str(recipe), "-o", str(tmp_path / "out"))
    assert "skipped 1 unusable cohort rows" in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] == 8
    assert [row["row"] for row in manifest["skipped"]] == [9]
    assert "truncated" in manifest["skipped"][0]["reason"]


def test_a_resume_decodes_only_the_sources_it_renders(tmp_path, cohort, monkeypatch):
    # The cohort was checked when the run started (row 9 skipped then): checking every image
    # again on each resume, or on re-running a complete OUT, is a full pass over the cohort.
    import synthgen.cohort.rows

    recipe_dict = i2i_recipe(corrupt_cohort(tmp_path, cohort), tmp_path / "l.csv")
    recipe_dict["source"]["on_error"] = "skip"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", recipe_dict))
    out = tmp_path / "out"
    generate(recipe, str(out))
    tars = {p: p.read_bytes() for p in (out / "webdataset").glob("*.tar")}
    reads = []
    original = synthgen.cohort.rows.read_image
    monkeypatch.setattr(
        synthgen.cohort.rows, "read_image", lambda p: reads.append(p) or original(p)
    )

    assert generate(recipe, str(out)).already_complete and reads == []
    (out / "manifest.json").unlink()
    commit = sorted((out / ".synthgen" / "commits").glob("*.json"))[0]
    count = json.loads(commit.read_text())["count"]
    commit.unlink()
    result = generate(recipe, str(out))
    assert result.rendered == count and result.skipped_rows == 1
    assert len(reads) == count  # the worker's reads of the shard it renders, nothing else
    assert {p: p.read_bytes() for p in tars} == tars


def test_invalid_label_value_names_the_row(tmp_path, cohort):
    folder, rows = cohort_copy(tmp_path, cohort, "bad")
    rows[2]["Sex"] = "unknown"
    bad = folder / "bad.csv"
    write_table(bad, rows)
    recipe = write_recipe(tmp_path / "r.yaml", i2i_recipe(bad, tmp_path / "l.csv"))
    result = run_cli("validate", str(recipe), check=False)
    assert result.returncode == 2
    assert "row 3" in result.stderr and "label 'sex'" in result.stderr


def test_missing_column_and_linkage_inside_out_are_refused(tmp_path, cohort):
    recipe_dict = i2i_recipe(cohort, tmp_path / "l.csv")
    recipe_dict["source"]["labels"]["age"] = "Age_at_visit"
    result = run_cli("validate", str(write_recipe(tmp_path / "a.yaml", recipe_dict)), check=False)
    assert result.returncode == 2 and "source.labels.age" in result.stderr
    inside = i2i_recipe(cohort, tmp_path / "out" / "linkage.csv")
    result = run_cli(
        "generate",
        str(write_recipe(tmp_path / "b.yaml", inside)),
        "-o",
        str(tmp_path / "out"),
        check=False,
    )
    assert result.returncode == 2 and "privacy.linkage" in result.stderr


def test_i2i_recipe_rules(tmp_path, cohort):
    no_linkage = i2i_recipe(cohort, tmp_path / "l.csv")
    del no_linkage["privacy"]
    result = run_cli("validate", str(write_recipe(tmp_path / "a.yaml", no_linkage)), check=False)
    assert result.returncode == 2 and "privacy.linkage" in result.stderr
    with_count = {**i2i_recipe(cohort, tmp_path / "l.csv"), "num_samples": 5}
    result = run_cli("validate", str(write_recipe(tmp_path / "b.yaml", with_count)), check=False)
    assert result.returncode == 2 and "num_samples" in result.stderr
    bad_strength = i2i_recipe(cohort, tmp_path / "l.csv", strength=1.5)
    result = run_cli("validate", str(write_recipe(tmp_path / "c.yaml", bad_strength)), check=False)
    assert result.returncode == 2 and "generation.strength" in result.stderr


def test_num_samples_limits_a_trial_run_to_the_first_rows(tmp_path, cohort):
    recipe = write_recipe(tmp_path / "r.yaml", i2i_recipe(cohort, tmp_path / "l.csv"))
    result = run_cli("sample", str(recipe), "-n", "100")
    assert len(result.stdout.splitlines()) == 8
    assert load_recipe(recipe, num_samples=3).source.max_rows == 3


def test_t2i_labels_resampled_from_a_cohort_table_keep_the_joint(tmp_path, cohort):
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    recipe["labels"]["age"] = {"dist": "uniform", "min": 18, "max": 100, "dtype": "int"}
    recipe["labels"]["sbp"] = {"dist": "uniform", "min": 70, "max": 250, "dtype": "int"}
    columns = {"laterality": "Eye", "sex": "Sex", "age": "AgeYears", "sbp": "SBP"}
    recipe["labels_from"] = {"table": str(cohort), "columns": columns}
    path = write_recipe(tmp_path / "resampled.yaml", recipe)
    with open(cohort) as handle:
        rows = {
            (r["Eye"], r["Sex"], int(r["AgeYears"]), int(r["SBP"])) for r in csv.DictReader(handle)
        }
    drawn = [
        json.loads(line) for line in run_cli("sample", str(path), "-n", "60").stdout.splitlines()
    ]
    combos = {
        (d["labels"]["laterality"], d["labels"]["sex"], d["labels"]["age"], d["labels"]["sbp"])
        for d in drawn
    }
    assert combos <= rows, "every sample's labels are one real row, never a mix of rows"
    assert len(combos) > 4
    again = [
        json.loads(line) for line in run_cli("sample", str(path), "-n", "60").stdout.splitlines()
    ]
    assert again == drawn
    shareable = load_recipe(path).shareable().to_yaml()
    assert str(cohort) not in shareable and MARKER not in shareable
