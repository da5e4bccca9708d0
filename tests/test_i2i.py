"""Image-to-image over a fake cohort: the privacy firewall, input kinds, errors, sweeps."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from conftest import ROOT, i2i_recipe, run_cli, write_recipe

from synthgen.cohort.demo import make_cohort, write_table
from synthgen.cohort.rows import Cohort, load_cohort
from synthgen.errors import CohortError
from synthgen.recipe.schema import load_recipe
from synthgen.run.generate import generate

MARKER = "ZQXSENTINEL42"


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


def test_a_split_a_small_cohort_leaves_without_a_patient_is_said_not_silent(tmp_path, cohort):
    """8 images of 4 patients dealt 90/5/5: val and test get no patient. validate and generate
    say so (a trial on a few rows is meant to run), and OUT holds the train split alone."""
    recipe = {**i2i_recipe(cohort, tmp_path / "l.csv"), "splits": {"train": 0.9, "val": 0.05,
                                                                  "test": 0.05}}  # fmt: skip
    path = write_recipe(tmp_path / "r.yaml", recipe)
    for command in ("validate", "generate"):
        args = (command, str(path)) + (
            ("-o", str(tmp_path / "out")) if command == "generate" else ()
        )
        result = run_cli(*args)
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert [w.split("split ")[1].split(" ")[0] for w in warnings] == ["'val'", "'test'"]
        assert "the cohort's 4 patients" in warnings[0] and "Traceback" not in result.stderr
    assert {p.name.split("-")[0] for p in (tmp_path / "out" / "parquet").iterdir()} == {"train"}


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


# --- cohort edge cases: what a real manifest holds ---------------------------------------------


def load(manifest: Path, tmp_path: Path, on_error: str = "skip", **source) -> Cohort:
    """The cohort as the i2i recipe reads it (paths resolved from the recipe's folder)."""
    recipe_dict = i2i_recipe(manifest, tmp_path / "l.csv")
    recipe_dict["source"].update(on_error=on_error, **source)
    recipe = load_recipe(write_recipe(tmp_path / f"r-{on_error}.yaml", recipe_dict))
    return load_cohort(recipe.source, recipe.labels, progress=False)


BAD_CELLS = [  # (column, cell, what the reason says)
    ("Sex", f"{MARKER} Smith", "label 'sex' (column 'Sex'): not one of the declared categories"),
    ("AgeYears", "4_5", "label 'age' (column 'AgeYears'): not a plain number"),
    ("AgeYears", "45.7", "label 'age' (column 'AgeYears'): not a whole number"),
    ("AgeYears", f"{MARKER}", "label 'age' (column 'AgeYears'): not a plain number"),
    ("SBP", "inf", "label 'sbp' (column 'SBP'): not a plain number"),
    ("AgeYears", "17", "label 'age' (column 'AgeYears'): outside [18, 100]"),
    ("Eye", "", "label 'laterality' (column 'Eye'): empty cell"),
    ("study_id", " ", "empty id (column 'study_id')"),
    ("patient_id", "", "empty patient id (column 'patient_id')"),
    ("image_file", "", "empty image path (column 'image_file')"),
]


def test_a_bad_cell_is_named_by_row_column_and_kind_never_by_its_content(tmp_path, cohort):
    folder, rows = cohort_copy(tmp_path, cohort, "cells")
    rows[0]["AgeYears"] = "45.0"  # a whole number written as a float: taken as 45
    rows += [{**rows[0], "study_id": f"extra-{n}"} for n in range(len(BAD_CELLS) - 7)]
    for row, (column, cell, _) in zip(rows[1:], BAD_CELLS):
        row[column] = cell
    manifest = write_table(folder / "cells.csv", rows)
    cohort_read = load(manifest, tmp_path)
    assert cohort_read.by_row[1].labels["age"] == 45
    reasons = [(s.row, s.reason) for s in cohort_read.skipped]
    assert [row for row, _ in reasons] == list(range(2, len(BAD_CELLS) + 2))
    for (_, reason), (_, _, why) in zip(reasons, BAD_CELLS):
        assert reason.startswith(why), reason
        assert MARKER not in reason and "Smith" not in reason
    with pytest.raises(CohortError) as caught:
        load(manifest, tmp_path, on_error="fail")
    assert caught.value.where == "source.manifest row 2" and MARKER not in str(caught.value)
    result = run_cli("validate", str(tmp_path / "r-skip.yaml"), check=False)
    assert result.returncode == 0 and "skip: row 2: label 'sex'" in result.stderr
    assert MARKER not in result.stdout + result.stderr


def test_duplicate_ids_are_refused_per_on_error(tmp_path, cohort):
    folder, rows = cohort_copy(tmp_path, cohort, "dupes")
    rows[5]["study_id"] = rows[1]["study_id"]
    manifest = write_table(folder / "dupes.csv", rows)
    skipped = load(manifest, tmp_path).skipped
    assert [(s.row, s.reason) for s in skipped] == [
        (6, "duplicate id: source.id_column 'study_id' repeats row 2")
    ]
    with pytest.raises(CohortError, match="duplicate id") as caught:
        load(manifest, tmp_path, on_error="fail")
    assert caught.value.where == "source.manifest row 6"


def test_parquet_nulls_are_missing_cells_not_the_text_nan(tmp_path, cohort):
    folder, rows = cohort_copy(tmp_path, cohort, "nulls")
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    columns["study_id"][1] = None
    columns["patient_id"][2] = None
    table = pa.table({**columns, "AgeYears": pa.array([float(a) for a in columns["AgeYears"]])})
    table = table.set_column(table.schema.get_field_index("AgeYears"), "AgeYears",
                             pa.array([None, *table["AgeYears"].to_pylist()[1:]]))  # fmt: skip
    manifest = folder / "manifest.parquet"
    pq.write_table(table, manifest)
    cohort_read = load(manifest, tmp_path)
    assert [(s.row, s.reason) for s in cohort_read.skipped] == [
        (1, "label 'age' (column 'AgeYears'): empty cell"),
        (2, "empty id (column 'study_id')"),
        (3, "empty patient id (column 'patient_id')"),
    ]
    assert not {"nan", "None", ""} & {r.source_id for r in cohort_read.rows}
    assert not {"nan", "None", ""} & {r.patient_id for r in cohort_read.rows}
    assert cohort_read.by_row[4].labels["age"] == int(rows[3]["AgeYears"])  # 61.0 read as 61
    with pytest.raises(CohortError, match="empty cell") as caught:
        load(manifest, tmp_path, on_error="fail")
    assert caught.value.where == "source.manifest row 1"


def test_images_outside_the_cohort_folder_are_refused_unless_allowed(tmp_path, cohort):
    folder, rows = cohort_copy(tmp_path, cohort, "inside")
    elsewhere = Path(shutil.copytree(cohort.parent / "images", tmp_path / "elsewhere"))
    names = [Path(row["image_file"]).name for row in rows]
    (folder / "images" / "link-out.png").symlink_to(elsewhere / names[3])
    (folder / "images" / "link-in.png").symlink_to(folder / "images" / names[4])
    rows[1]["image_file"] = str(elsewhere / names[1])  # absolute, outside
    rows[2]["image_file"] = f"../elsewhere/{names[2]}"  # climbs out
    rows[3]["image_file"] = "images/link-out.png"  # a symlink out
    rows[4]["image_file"] = "images/link-in.png"  # a symlink that stays inside
    rows[5]["image_file"] = f"images/../images/{names[5]}"  # `..` that stays inside
    rows[6]["image_file"] = str(folder / "images" / names[6])  # absolute, inside
    manifest = write_table(folder / "paths.csv", rows)
    skipped = load(manifest, tmp_path).skipped
    assert [s.row for s in skipped] == [2, 3, 4]
    assert all("outside the cohort folder" in s.reason for s in skipped)
    with pytest.raises(CohortError, match="source.images_root"):
        load(manifest, tmp_path, on_error="fail")
    # With source.images_root (relative to the recipe, here tmp_path), relative image paths
    # start there: this table's start one folder above the table.
    relative = [{**row, "image_file": row["image_file"] if Path(row["image_file"]).is_absolute()
                 else f"inside/{row['image_file']}"} for row in rows]  # fmt: skip
    allowed = load(write_table(folder / "allowed.csv", relative), tmp_path, images_root=".")
    assert not allowed.skipped and len(allowed.rows) == 8
    recipe = load_recipe(tmp_path / "r-skip.yaml")
    assert str(tmp_path) not in recipe.shareable().to_yaml()


def test_a_fifo_in_the_cohort_does_not_hang_validate(tmp_path, cohort):
    folder, rows = cohort_copy(tmp_path, cohort, "fifo")
    os.mkfifo(folder / "images" / f"{MARKER}_pipe.png")
    rows[3]["image_file"] = f"images/{MARKER}_pipe.png"
    manifest = write_table(folder / "fifo.csv", rows)
    recipe = write_recipe(tmp_path / "r.yaml", i2i_recipe(manifest, tmp_path / "l.csv"))
    result = run_cli("validate", str(recipe), check=False, timeout=60)
    assert result.returncode == 2 and "source.manifest row 4: not a regular file" in result.stderr
    assert MARKER not in result.stderr


def test_audit_leaves_out_the_rows_the_run_skipped(tmp_path, cohort):
    recipe_dict = i2i_recipe(corrupt_cohort(tmp_path, cohort), tmp_path / "l.csv")
    recipe_dict["source"]["on_error"] = "skip"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict)
    out = tmp_path / "out"
    assert generate(load_recipe(recipe), str(out)).skipped_rows == 1
    result = run_cli("audit", str(out), "--source", str(recipe), "--linkage",
                     str(tmp_path / "l.csv"), "-o", str(tmp_path / "report"), check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["settings"]["n_sources"] == 8


def test_a_bad_labels_from_cell_is_named_never_quoted(tmp_path, cohort):
    folder, rows = cohort_copy(tmp_path, cohort, "table")
    rows[4]["Sex"] = f"{MARKER} Smith"
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    recipe["labels"]["age"] = {"dist": "uniform", "min": 18, "max": 100, "dtype": "int"}
    recipe["labels"]["sbp"] = {"dist": "uniform", "min": 70, "max": 250, "dtype": "int"}
    columns = {"laterality": "Eye", "sex": "Sex", "age": "AgeYears", "sbp": "SBP"}
    recipe["labels_from"] = {"table": str(write_table(folder / "t.csv", rows)), "columns": columns}
    result = run_cli("validate", str(write_recipe(tmp_path / "t.yaml", recipe)), check=False)
    assert result.returncode == 2
    assert "labels_from.table row 5: label 'sex' (column 'Sex'): not one of" in result.stderr
    assert MARKER not in result.stderr and "Smith" not in result.stderr
