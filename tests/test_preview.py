"""Previews: contact sheets from committed shards and from a recipe, captions, label plots."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import yaml
from conftest import ROOT, small_recipe, write_recipe
from PIL import Image

from synthgen.cohort.demo import make_cohort
from synthgen.errors import OutputError
from synthgen.output.manifest import label_encodings, merged_label_stats
from synthgen.output.outdir import OutDir
from synthgen.output.read import ShardReader
from synthgen.plan import Plan
from synthgen.preview.plots import label_plots, plot_label
from synthgen.preview.sheet import (
    PAD,
    caption,
    committed_in_plan_order,
    contact_sheet,
    preview_from_out,
    sample_committed,
)
from synthgen.recipe.joint import LabelModel
from synthgen.recipe.schema import load_recipe, recipe_from_dict
from synthgen.run.finalize import write_previews
from synthgen.run.preview import make_preview, render_first


def committed(out: OutDir, n: int, seed: int = 0):
    recipe = out.recipe()
    reader = ShardReader(out, label_encodings(recipe))
    return sample_committed(reader, recipe, committed_in_plan_order(out), n=n, seed=seed)


MARKER = "ZQXSENTINEL42"


def caption_boxes(sheet: Image.Image, count: int, columns: int, thumb: int):
    """(thumbnail box, caption box) of each tile, from the sheet's size alone."""
    rows = math.ceil(count / columns)
    tile_height = (sheet.height - PAD) // rows - PAD
    for i in range(count):
        row, column = divmod(i, columns)
        x, y = PAD + column * (thumb + PAD), PAD + row * (tile_height + PAD)
        yield (x, y, x + thumb, y + thumb), (x, y + thumb + 1, x + thumb, y + tile_height)


def has_ink(sheet: Image.Image, box) -> bool:
    return int(np.asarray(sheet.crop(box).convert("L")).min()) < 128


def test_sheet_from_out_has_a_captioned_tile_per_sample(generated):
    out = OutDir(str(generated))
    items = committed(out, n=6)
    assert len(items) == 6
    for _, lines in items:  # t2i: the declared labels, in order, and nothing else
        assert [line.split("=")[0] for line in lines] == ["laterality", "sex", "age", "sbp",
                                                          "findings"]  # fmt: skip
    sheet = contact_sheet(items, columns=4, thumb=64)
    assert sheet.width == PAD + 4 * (64 + PAD)
    assert (sheet.height - PAD) % 2 == 0 and sheet.height > 2 * (64 + PAD) + PAD
    for thumb_box, caption_box in caption_boxes(sheet, 6, 4, 64):
        pixels = np.asarray(sheet.crop(thumb_box)).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50  # the image, not background
        assert has_ink(sheet, caption_box)  # the caption's text
    # Without captions, the same space under each thumbnail is left blank.
    blank = contact_sheet([(image, [" "] * 5) for image, _ in items], columns=4, thumb=64)
    assert blank.size == sheet.size
    for _, caption_box in caption_boxes(blank, 6, 4, 64):
        assert not has_ink(blank, caption_box)


def test_out_sampling_is_seeded_and_reads_parquet_and_tars_alike(generated):
    out = OutDir(str(generated))
    recipe = out.recipe()
    first = preview_from_out(out, n=5, seed=3)
    assert first.tobytes() == preview_from_out(out, n=5, seed=3).tobytes()
    assert first.tobytes() != preview_from_out(out, n=5, seed=4).tobytes()
    assert len(committed(out, n=100)) == 20  # never more than there are
    wanted = [7, 0, 3]
    shard = out.committed_records()["train-000000"]
    tar_only = type(shard)(**{**shard.__dict__, "files": {
        p: d for p, d in shard.files.items() if p.endswith(".tar")}})  # fmt: skip
    reader = ShardReader(out, label_encodings(recipe))
    from_parquet, from_tar = reader.read(shard, wanted), reader.read(tar_only, wanted)
    indices = Plan(recipe).indices(out.run_record().tasks[0])
    assert [s.key for s in from_tar] == [f"unit-{indices[p]:08d}" for p in wanted]
    assert from_parquet == from_tar
    for sample in from_tar:
        assert caption(recipe, sample.key, sample.labels)[0].startswith("laterality=")


def test_recipe_preview_renders_what_generate_rendered(generated):
    """The same plan, pipeline and Renderer: the first samples' pixels match the dataset's."""
    out = OutDir(str(generated))
    rendered = render_first(out.recipe(), n=3, device="cpu")
    first = committed(out, n=20)[:3]  # index order: the first three
    assert len(rendered) == 3
    for (image, lines), (stored, stored_lines) in zip(rendered, first):
        assert np.array_equal(np.asarray(image), np.asarray(stored.convert("RGB")))
        assert lines == stored_lines


def test_make_preview_takes_a_recipe_file_or_an_output_directory(tmp_path, generated):
    recipe = small_recipe()
    recipe["generation"].update(steps=2)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    sheet = make_preview(str(path), n=2, columns=4, device="cpu")
    assert sheet.width == PAD + 2 * (160 + PAD)  # columns shrink to the number of images
    for _, caption_box in caption_boxes(sheet, 2, 2, 160):
        assert has_ink(sheet, caption_box)
    assert not (tmp_path / "out").exists()  # a preview writes nothing
    assert make_preview(str(generated), n=3).width == PAD + 3 * (160 + PAD)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "recipe.yaml").write_text((generated / "recipe.yaml").read_text())
    with pytest.raises(OutputError, match="no committed samples"):
        preview_from_out(OutDir(str(empty)))


def test_i2i_captions_hold_the_key_and_declared_labels_only(tmp_path):
    cohort = make_cohort(tmp_path / "cohort", rows=4, marker=MARKER)
    recipe = yaml.safe_load((ROOT / "recipes" / "demo-i2i.yaml").read_text())
    recipe["source"]["manifest"] = str(cohort)
    recipe["privacy"]["linkage"] = str(tmp_path / "linkage.csv")
    recipe["generation"].update(steps=2, strength=0.5, batch_size=4)
    loaded = load_recipe(write_recipe(tmp_path / "i2i.yaml", recipe))
    items = render_first(loaded, n=2, device="cpu")
    assert len(items) == 2
    declared = ["key", "laterality", "age", "sex", "sbp"]
    for image, lines in items:
        assert image.size == (64, 64)
        assert sorted(line.split("=")[0] for line in lines) == sorted(declared)
        assert lines[0].startswith("key=demo-i2i-")
        assert not any(MARKER in line for line in lines)
    assert not (tmp_path / "linkage.csv").exists()
    # Whatever else a sample carries (source ids, paths, cohort columns), only labels get through.
    leaky = {"laterality": "left", "study_id": f"{MARKER}-1", "image_file": f"{MARKER}.png",
             "prompt": "retina", "age": 50}  # fmt: skip
    assert caption(loaded, "demo-i2i-00000007", leaky) == [
        "key=demo-i2i-00000007",
        "laterality=left",
        "age=50",
    ]


def test_t2i_captions_are_label_lines_only():
    recipe = recipe_from_dict(small_recipe())
    labels = {"laterality": "left", "sex": "male", "age": 50, "sbp": 121.123456, "findings": []}
    assert caption(recipe, "unit-00000001", {**labels, "prompt": "x", "seed": 5}) == [
        "laterality=left",
        "sex=male",
        "age=50",
        "sbp=121.1",
        "findings=no finding",
    ]


def every_kind_recipe():
    recipe = small_recipe()
    recipe["prompt"] = "retina {laterality}"
    recipe["labels"] = {
        "laterality": {"dist": "categorical", "values": {"right": 0.7, "left": 0.3}},
        "age": {"dist": "normal", "mean": 52, "std": 11, "min": 40, "max": 75, "dtype": "int"},
        "iop": {"dist": "normal", "mean": 15.5, "std": 3},
        "bmi": {"dist": "uniform", "min": 18.5, "max": 40},
        "grade": {"dist": "uniform", "min": 0, "max": 4, "dtype": "int"},
        "site": {"dist": "constant", "value": "hpp"},
        "findings": {
            "dist": "multilabel",
            "values": {"drusen": 0.3, "hemorrhage": 0.2},
            "max_labels": 1,
        },  # fmt: skip
    }
    return recipe_from_dict(recipe)


def test_label_plots_write_one_png_per_label_of_every_kind(tmp_path):
    recipe = every_kind_recipe()
    rng = np.random.default_rng(0)
    model = LabelModel(recipe.labels)
    stats = model.new_stats()
    for _ in range(300):
        model.add(stats, model.draw(rng))
    names = label_plots(recipe, stats, OutDir(str(tmp_path / "plots")))
    assert names == [f"labels-{name}.png" for name in recipe.labels]
    for name in names:
        data = (tmp_path / "plots" / name).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            assert image.format == "PNG"
        assert Image.open(io.BytesIO(data)).size == (560, 340)
    # Rerunning writes the same bytes (finalize is idempotent); a label with no samples is drawn.
    spec = recipe.labels["age"]
    assert plot_label("age", spec, stats["age"]) == (tmp_path / "plots/labels-age.png").read_bytes()
    for name in ("laterality", "age", "findings"):
        empty = plot_label(name, recipe.labels[name], recipe.labels[name].new_stats())
        assert Image.open(io.BytesIO(empty)).format == "PNG"


def test_write_previews_puts_sheet_and_plots_under_previews(fresh_copy):
    out = OutDir(str(fresh_copy))
    recipe = out.recipe()
    reader = ShardReader(out, label_encodings(recipe))
    shards = committed_in_plan_order(out)
    stats = merged_label_stats(recipe, shards, reader)
    paths = write_previews(out, recipe, reader, shards, stats)
    assert paths[0] == "previews/preview.png"
    assert paths[1:] == [f"previews/labels-{name}.png" for name in recipe.labels]
    for path in paths:
        assert Image.open(fresh_copy / path).format == "PNG"
    sheet = Image.open(fresh_copy / "previews/preview.png")
    assert sheet.width == PAD + 4 * (160 + PAD)
    card = (fresh_copy / "README.md").read_text()
    assert "![Samples with their labels](previews/preview.png)\n" in card
    assert card.count("![labels-") == len(recipe.labels)
