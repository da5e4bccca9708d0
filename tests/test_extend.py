"""Growing a corpus: a larger num_samples (or an i2i sweep gaining a strength or a repeat) renders
only the new samples, leaves every committed file as it was, and equals a fresh run of the larger
recipe sample by sample."""

from __future__ import annotations

import csv
import hashlib

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, small_recipe, write_recipe

from synthgen.cohort.demo import make_cohort
from synthgen.errors import OutputError, RecipeError
from synthgen.recipe.schema import load_recipe
from synthgen.run.generate import generate


def shard_digests(out) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in ("webdataset", "parquet")
        for p in sorted((out / folder).glob("*"))
        if p.suffix in (".tar", ".parquet")
    }


def samples(out) -> dict[str, tuple]:
    """key -> (split, image bytes, labels and generation columns), from every Parquet shard."""
    found = {}
    for path in (out / "parquet").glob("*.parquet"):
        for row in pq.read_table(path).to_pylist():
            image = row.pop("image")["bytes"]
            found[row.pop("key")] = (path.name.split("-")[0], image, tuple(sorted(row.items())))
    return found


def run(tmp_path, name: str, recipe: dict, out: str):
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    return generate(load_recipe(path), str(tmp_path / out))


def test_a_t2i_corpus_grows_from_40_to_80_rendering_only_the_new_40(tmp_path):
    small = small_recipe(num_samples=40, shard_size=8)
    first = run(tmp_path, "small", small, "grown")
    before = shard_digests(tmp_path / "grown")
    grown = run(tmp_path, "large", {**small, "num_samples": 80}, "grown")
    assert (first.rendered, grown.rendered, grown.resumed_shards) == (40, 40, len(before) // 2)
    after = shard_digests(tmp_path / "grown")
    assert {path: after[path] for path in before} == before  # committed files untouched
    fresh = run(tmp_path, "large", {**small, "num_samples": 80}, "fresh")
    assert fresh.rendered == 80
    assert samples(tmp_path / "grown") == samples(tmp_path / "fresh")
    card = (tmp_path / "grown" / "README.md").read_text()
    assert "It contains 80 images." in card
    with pytest.raises(RecipeError, match="grow, not shrink"):
        run(tmp_path, "smaller", {**small, "num_samples": 20}, "grown")
    with pytest.raises(OutputError, match="different recipe"):
        run(tmp_path, "other", {**small, "num_samples": 90, "seed": 5}, "grown")


def i2i(tmp_path, **generation) -> dict:
    recipe = yaml.safe_load((ROOT / "recipes" / "demo-i2i.yaml").read_text())
    recipe.update(name="sweep", shard_size=3)
    recipe["source"].update(manifest=str(tmp_path / "cohort" / "manifest.csv"), on_error="fail")
    recipe["privacy"]["linkage"] = str(tmp_path / "linkage.csv")
    recipe["generation"].update(steps=4, batch_size=4, **generation)
    return recipe


@pytest.mark.parametrize(
    ("before", "after", "new"),
    [
        ({"strength": [0.5]}, {"strength": [0.5, 0.8]}, 8),
        ({"strength": 0.5, "repeats": 1}, {"strength": 0.5, "repeats": 2}, 8),
    ],
    ids=["a-strength", "a-repeat"],
)
def test_an_i2i_sweep_grows_by_a_strength_or_a_repeat(tmp_path, before, after, new):
    make_cohort(tmp_path / "cohort", rows=8)
    run(tmp_path, "before", i2i(tmp_path, **before), "grown")
    kept = shard_digests(tmp_path / "grown")
    grown = run(tmp_path, "after", i2i(tmp_path, **after), "grown")
    assert grown.rendered == new
    now = shard_digests(tmp_path / "grown")
    assert {path: now[path] for path in kept} == kept
    fresh = run(tmp_path, "after", i2i(tmp_path, **after), "fresh")
    assert samples(tmp_path / "grown") == samples(tmp_path / "fresh")
    shrunk = i2i(tmp_path, **before)
    with pytest.raises(RecipeError, match="grow, not shrink"):
        run(tmp_path, "shrunk", shrunk, "grown")
    assert fresh.rendered == len(samples(tmp_path / "fresh"))


def test_an_i2i_cohort_grows_by_rows_added_at_the_end_of_its_manifest(tmp_path):
    make_cohort(tmp_path / "cohort", rows=8)
    run(tmp_path, "before", i2i(tmp_path, strength=[0.5, 0.8]), "out")
    kept = shard_digests(tmp_path / "out")
    keys = set(samples(tmp_path / "out"))
    make_cohort(tmp_path / "cohort", rows=12)  # the same 8 rows, then two more patients
    grown = run(tmp_path, "after", i2i(tmp_path, strength=[0.5, 0.8]), "out")
    assert grown.rendered == 4 * 2  # the new rows, at both strengths; nothing else
    now = shard_digests(tmp_path / "out")
    assert {path: now[path] for path in kept} == kept
    new = set(samples(tmp_path / "out")) - keys
    assert sorted(new) == [f"sweep-{i:08d}" for i in range(16, 24)]  # appended, not renumbered
    with open(tmp_path / "linkage.csv") as handle:
        links = {row["key"]: int(row["source_row"]) for row in csv.DictReader(handle)}
    assert {links[key] for key in new} == {9, 10, 11, 12}
    assert len(links) == 24
    make_cohort(tmp_path / "cohort", rows=6)  # rows removed
    with pytest.raises(RecipeError, match="grow, not shrink"):
        run(tmp_path, "after", i2i(tmp_path, strength=[0.5, 0.8]), "out")
