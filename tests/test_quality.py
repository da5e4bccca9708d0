"""The quality gate on the tiny model, with check networks built here whose "prediction" is a known
function of the image: the mean of its top-left 16×16 corner decides the eye (right above
CORNER, left below), so which attempts pass can be worked out independently by rendering them.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import small_recipe, write_recipe
from PIL import Image

from synthgen.cli import main
from synthgen.recipe.quality import LabelRule, QualityConfig, bind_checks
from synthgen.recipe.schema import load_recipe, recipe_from_dict
from synthgen.render.pipeline import load_pipeline
from synthgen.render.renderer import Renderer
from synthgen.render.tuning import tune_pipeline
from synthgen.run.generate import generate
from synthgen.run.planning import build_plan

CORNER = 0.46  # about the median corner mean of the tiny model's 64² images: ~half pass


class CornerEye(torch.nn.Module):
    """Logits (right, left): right when the corner is brighter than CORNER."""

    def __init__(self):
        super().__init__()
        self.corner = CORNER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, :, :16, :16].mean(dim=(1, 2, 3))
        return torch.stack([m - self.corner, self.corner - m], 1) * 100


class ThreeOutputs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (B, 3): one too many for a two-class label


def corner_mean(image: Image.Image) -> float:
    return float((np.asarray(image, dtype=np.float64)[:16, :16] / 255).mean())


def corner_says(image: Image.Image) -> str:
    return "right" if corner_mean(image) > CORNER else "left"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checks")
    torch.jit.save(torch.jit.script(CornerEye()), str(folder / "corner.pt"))
    three = torch.export.export(ThreeOutputs(), (torch.rand(2, 3, 64, 64),),
                                dynamic_shapes={"x": {0: torch.export.Dim("batch")}})  # fmt: skip
    torch.export.save(three, str(folder / "three.pt2"))  # an exported program
    torch.save({"weights": torch.ones(2)}, folder / "pickle.pt")  # a torch.save pickle
    return folder


def gated(models: Path, *, on_fail: str = "keep", attempts: int = 3, **changes) -> dict:
    """12 samples (3 shards of 4 and the test split), 64², 2 steps, batches of 2."""
    recipe = small_recipe(num_samples=12, shard_size=4, **changes)
    recipe["generation"].update(steps=2, batch_size=2)
    recipe["quality"] = {
        "max_attempts": attempts,
        "on_fail": on_fail,
        "checks": {"corner": {"model": str(models / "corner.pt"), "preprocess": {"size": 64},
                              "labels": {"laterality": {}}}},
    }  # fmt: skip
    return recipe


def run(tmp_path: Path, recipe: dict, name: str = "out") -> Path:
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    out = tmp_path / name
    result = generate(load_recipe(path), str(out))
    assert not result.failed, result.failed
    return out


def rows(out: Path) -> list[dict]:
    files = sorted((out / "parquet").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return sorted(table.to_pylist(), key=lambda row: row["key"])


def tar_members(out: Path) -> dict[str, bytes]:
    found = {}
    for path in sorted((out / "webdataset").glob("*.tar")):
        with tarfile.open(path) as tar:
            found.update({m.name: tar.extractfile(m).read() for m in tar})
    return found


def dataset_bytes(out: Path) -> dict[str, str]:
    """sha256 of every shard file, the card and the manifest without its measured seconds."""
    found = {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in ("webdataset", "parquet")
        for p in sorted((out / folder).glob("*"))
    }
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["quality"].pop("seconds")
    found["manifest.json"] = json.dumps(manifest, sort_keys=True)
    return found


# --- the rules, without a model -------------------------------------------------------------------


def test_rules_judge_as_the_recipe_says():
    labels = recipe_from_dict(small_recipe()).labels
    quality = QualityConfig(checks={"c": {"model": "m.pt", "labels": {
        "sex": LabelRule(threshold=0.9), "age": LabelRule(tolerance=5),
        "findings": LabelRule(threshold={"drusen": 0.7})}}})  # fmt: skip
    (check,) = bind_checks(quality, labels)
    assert check.width == 2 + 1 + 2 and check.exact  # sex 2 classes, age 1, findings 2
    sex, age, findings = check.rules
    outputs = np.array([[3.0, 0.0, 50.0, 2.0, -2.0], [0.2, 0.0, 58.0, 0.0, 2.0]])
    assert [v.passed for v in sex.judge(outputs, ["male", "male"])] == [True, False]  # p .95, .55
    assert sex.judge(outputs, ["female", "female"])[0].predicted == "male"
    assert [v.passed for v in age.judge(outputs, [54, 52])] == [True, False]  # |Δ| 4, 6
    found = findings.judge(outputs, [["drusen"], ["hemorrhage"]])
    assert [v.predicted for v in found] == [["drusen"], ["hemorrhage"]]
    assert [v.passed for v in found] == [True, True]
    assert not findings.judge(outputs, [[], ["drusen", "hemorrhage"]])[1].passed


@pytest.mark.parametrize(
    ("rule", "field", "message"),
    [
        ({"age": {}}, "quality.checks.c.labels.age.tolerance", "needs a tolerance"),
        ({"sex": {"tolerance": 3}}, "quality.checks.c.labels.sex.tolerance", "numeric labels"),
        ({"sex": {"columns": {"male": 0}}}, "quality.checks.c.labels.sex.columns", "'female'"),
        ({"eye": {}}, "quality.checks.c.labels.eye", "not a label"),
        ({"sex": {"columns": {"male": 0, "female": 1}}, "age": {"tolerance": 1}},
         "quality.checks.c.labels", "every label its columns, or none"),
        ({"findings": {"threshold": {"cataract": 0.5}}},
         "quality.checks.c.labels.findings.threshold.cataract", "not a checked finding"),
    ],
)  # fmt: skip
def test_rules_that_do_not_fit_their_label_name_the_field(rule, field, message):
    recipe = small_recipe()
    recipe["quality"] = {"checks": {"c": {"model": "m.pt", "labels": rule}}}
    with pytest.raises(Exception) as caught:
        recipe_from_dict(recipe, file="r.yaml")
    assert caught.value.where == field and message in caught.value.message


def test_models_that_cannot_serve_exit_2_naming_the_field(tmp_path, models):
    cases = {
        "missing": (str(models / "nowhere.pt"), "no such file"),
        "pickle": (str(models / "pickle.pt"), "a torch.save zip archive of pickles"),
        "three": (str(models / "three.pt2"), "the model has 3 outputs, but its labels take 2"),
    }
    for name, (model, message) in cases.items():
        recipe = gated(models)
        recipe["quality"]["checks"]["corner"]["model"] = model
        path = write_recipe(tmp_path / f"{name}.yaml", recipe)
        for command in ("validate", "generate"):
            args = [command, str(path)] + (
                ["-o", str(tmp_path / name)] if command == "generate" else []
            )
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 2, result.output
            line = result.output.strip().splitlines()[-1]
            assert line.startswith(f"error: {path}: quality.checks.corner.model: "), line
            assert message in line
    assert not (tmp_path / "pickle" / "manifest.json").exists()


# --- in the loop ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kept(tmp_path_factory, models) -> Path:
    return run(tmp_path_factory.mktemp("keep"), gated(models, on_fail="keep"))


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    recipe = recipe_from_dict(small_recipe())
    pipe, _ = load_pipeline(recipe.model, mode="t2i", device="cpu")
    tune_pipeline(pipe, "cpu", compile_unet=False)
    generation = recipe.generation.model_copy(update={"steps": 2, "batch_size": 2})
    return Renderer(pipe, generation)


def test_attempts_are_what_the_known_function_implies(kept, models, renderer):
    """Each sample's attempts rendered here, outside the gate: every attempt before the kept
    one fails the corner rule, the kept one passes (or all three failed and it is kept as failing),
    and the kept image is the last attempt's, pixel for pixel."""
    recipe = load_recipe(write_recipe(kept.parent / "again.yaml", gated(models, on_fail="keep")))
    plan = build_plan(recipe)
    stored = rows(kept)
    assert len(stored) == 12
    for row in stored:
        index = int(row["key"].rsplit("-", 1)[1])
        spec = plan.spec(index)
        tries = [plan.attempt(spec, k) for k in range(row["quality_attempts"])]
        images = [image for _, image in renderer.render(tries)]
        passes = [corner_says(image) == spec.labels["laterality"] for image in images]
        assert not any(passes[:-1])
        assert passes[-1] == row["quality_passed"] == row["quality_corner_laterality_passed"]
        if not row["quality_passed"]:
            assert row["quality_attempts"] == 3 and row["quality_corner_failed_attempts"] == 3
        assert row["quality_corner_failed_attempts"] == passes.count(False)
        kept_image = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
        np.testing.assert_array_equal(kept_image, np.asarray(images[-1]))
        assert row["seed"] == tries[-1].seed
        assert row["quality_corner_laterality"] == corner_says(images[-1])
    attempts = [row["quality_attempts"] for row in stored]
    assert 1 in attempts and max(attempts) > 1, "the corner rule should reject some images"


def test_card_and_manifest_tables_match_the_per_sample_columns(kept):
    stored = rows(kept)
    quality = json.loads((kept / "manifest.json").read_text())["quality"]
    images = sum(r["quality_attempts"] for r in stored)
    accepted = sum(r["quality_passed"] for r in stored)
    corner = sum(r["quality_attempts"] - r["quality_corner_failed_attempts"] for r in stored)
    assert (quality["samples"], quality["images"], quality["accepted"]) == (12, images, accepted)
    assert quality["checks"]["corner"] == {"images": images, "passed": corner}
    histogram = {}
    for r in stored:
        histogram[str(r["quality_attempts"])] = histogram.get(str(r["quality_attempts"]), 0) + 1
    assert quality["attempts"] == histogram
    card = (kept / "README.md").read_text()
    assert "## Quality gate" in card
    assert f"| corner | all labels | {images} | {corner} | {corner / images:.3f} |" in card
    for eye in ("right", "left"):
        mine = [r for r in stored if r["laterality"] == ["right", "left"].index(eye)]
        n, shown = sum(r["quality_attempts"] for r in mine), sum(r["quality_passed"] for r in mine)
        assert f"| laterality={eye} | {len(mine)} | {n} | {shown} | {shown / n:.3f} | 0 |" in card
    members = tar_members(kept)
    for row in stored:  # the tar JSON says what the columns say
        meta = json.loads(members[f"{row['key']}.json"])["quality"]
        label = meta["checks"]["corner"]["labels"]["laterality"]
        assert meta["attempts"] == row["quality_attempts"]
        assert label["probability"] == row["quality_corner_laterality_probability"]
    info = CliRunner().invoke(main, ["info", str(kept)])
    assert info.exit_code == 0 and f"| corner | all labels | {images} | {corner} |" in info.output


def test_drop_leaves_failing_samples_out_and_says_which(tmp_path, models, kept):
    out = run(tmp_path, gated(models, on_fail="drop"))
    stored, keeping = rows(out), rows(kept)
    failing = sorted(r["key"] for r in keeping if not r["quality_passed"])
    assert failing, "the keep run should have samples that failed every attempt"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quality"]["dropped"] == {"count": len(failing), "keys": failing}
    assert manifest["num_samples"] == 12 - len(failing) == len(stored)
    assert all(r["quality_passed"] for r in stored)
    assert [r["key"] for r in stored] == [r["key"] for r in keeping if r["quality_passed"]]
    for a, b in zip(stored, (r for r in keeping if r["quality_passed"])):
        assert a["image"] == b["image"]  # the same accepted image whatever on_fail says
    assert not any(f"{key}.png" in tar_members(out) for key in failing)


def test_fail_stops_the_shard_naming_the_sample(tmp_path, models):
    path = write_recipe(tmp_path / "fail.yaml", gated(models, on_fail="fail", attempts=1))
    result = generate(load_recipe(path), str(tmp_path / "out"))
    assert result.failed and not result.finalized
    for error in result.failed.values():
        assert re.search(r"quality\.on_fail: sample unit-\d{8} failed corner\.laterality", error)


def test_balanced_quotas_stay_exact_when_samples_are_dropped(tmp_path, models):
    recipe = gated(models, on_fail="drop", attempts=1, splits={"train": 1.0})
    recipe.pop("num_samples")
    recipe["balance"] = {"by": ["laterality"], "per_cell": 6}
    out = run(tmp_path, recipe)
    stored = rows(out)
    assert [r["laterality"] for r in stored].count(0) == 6 == len(stored) // 2
    quality = json.loads((out / "manifest.json").read_text())["quality"]
    assert quality["dropped"]["count"] == 0 and quality["replaced"]["count"] > 0
    for row in stored:
        assert row["quality_passed"]
        replaced = row["key"] in quality["replaced"]["keys"]
        assert replaced == (row["quality_attempts"] > 1)  # one attempt per draw of the cell


def test_two_runs_write_the_same_bytes_and_ungated_recipes_are_untouched(tmp_path, models, kept):
    again = run(tmp_path, gated(models, on_fail="keep"))
    assert dataset_bytes(again) == dataset_bytes(kept)
    plain = run(tmp_path, small_recipe(num_samples=5, shard_size=5), name="plain")
    row = rows(plain)[0]
    assert not any(name.startswith("quality") for name in row)
    assert "quality" not in json.loads(tar_members(plain)[f"{row['key']}.json"])
    assert "quality" not in json.loads((plain / "manifest.json").read_text())


def test_gate_command_reproduces_the_in_run_predictions(tmp_path, kept):
    report = tmp_path / "report"
    result = CliRunner().invoke(main, ["gate", str(kept), "-o", str(report)])
    assert result.exit_code == 0, result.output
    predicted = {r["key"]: r for r in pq.read_table(report / "predictions.parquet").to_pylist()}
    for row in rows(kept):
        again = predicted[row["key"]]
        for name in (
            "quality_passed",
            "quality_corner_laterality",
            "quality_corner_laterality_probability",
            "quality_corner_laterality_passed",
        ):
            assert again[name] == row[name], name
    judged = json.loads((report / "acceptance.json").read_text())
    assert judged["images"] == 12 == judged["samples"]
    assert judged["accepted"] == sum(r["quality_passed"] for r in rows(kept))
    inside = CliRunner().invoke(main, ["gate", str(kept), "-o", str(kept / "report")])
    assert inside.exit_code == 2 and "-o: the report goes outside OUT" in inside.output


def test_pickles_never_reach_an_unpickler(tmp_path, models, monkeypatch):
    reached = []
    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, name, lambda *a, n=name, **k: reached.append(n))
    recipe = gated(models)
    recipe["quality"]["checks"]["corner"]["model"] = str(models / "pickle.pt")
    for disguise in ("corner.pt2", "corner.safetensors", "corner"):
        (tmp_path / disguise).write_bytes((models / "pickle.pt").read_bytes())
        recipe["quality"]["checks"]["corner"]["model"] = str(tmp_path / disguise)
        path = write_recipe(tmp_path / "r.yaml", recipe)
        result = CliRunner().invoke(main, ["validate", str(path)])
        assert result.exit_code == 2 and "quality.checks.corner.model" in result.output
    assert reached == []


# --- workers, Ray and a kill in the middle of a shard ---------------------------------------------


@pytest.mark.slow
def test_worker_processes_ray_and_a_killed_run_write_the_same_bytes(tmp_path, models, kept):
    """Real subprocesses (tests/test_scale.py's helpers): two pool workers, local Ray actors,
    and a run SIGKILLed while a shard with rejections is half written, then resumed."""
    from test_scale import POOL, commits, kill_group, start, synthgen, temporaries, wait_for

    recipe = write_recipe(tmp_path / "scale.yaml", gated(models, on_fail="keep"))
    for name, flags in (("pool", POOL), ("ray", ("--executor", "ray"))):
        synthgen("generate", str(recipe), "-o", str(tmp_path / name), *flags)
        assert dataset_bytes(tmp_path / name) == dataset_bytes(kept), name

    out = tmp_path / "killed"
    first = start("generate", str(recipe), "-o", str(out), "--devices", "cpu")

    def mid_shard() -> bool:
        shard_files = [p for p in temporaries(out) if p.startswith("webdataset/")]
        return len(commits(out)) >= 1 and bool(shard_files)

    wait_for(first, mid_shard)
    half_written = {
        p.split("/")[1].split(".")[0] for p in temporaries(out) if p.startswith("webdataset/")
    }
    kill_group(first)
    assert not (out / "manifest.json").exists()
    records = {name: json.loads((kept / ".synthgen" / "commits" / f"{name}.json").read_text())
               for name in half_written}  # fmt: skip
    assert any(r["quality"]["images"] > r["quality"]["samples"] for r in records.values()), (
        "the shard killed mid-write should have had rejected images"
    )
    resumed = synthgen("generate", str(recipe), "-o", str(out), "--devices", "cpu")
    assert "resumed:" in resumed.stderr
    assert dataset_bytes(out) == dataset_bytes(kept)


def test_i2i_samples_go_again_from_their_own_source(tmp_path, models):
    from conftest import ROOT

    from synthgen.cohort.demo import make_cohort

    recipe = yaml.safe_load((ROOT / "recipes" / "demo-i2i.yaml").read_text())
    recipe.update(name="gi", shard_size=4)
    recipe["source"].update(manifest=str(make_cohort(tmp_path / "cohort", rows=6, marker="GQ")))
    recipe["privacy"]["linkage"] = str(tmp_path / "linkage.csv")
    recipe["generation"].update(steps=2, batch_size=2, strength=[0.5])
    recipe["quality"] = gated(models, on_fail="drop")["quality"]
    out = run(tmp_path, recipe)
    stored = rows(out)
    dropped = json.loads((out / "manifest.json").read_text())["quality"]["dropped"]
    assert len(stored) + dropped["count"] == 6 and all(r["quality_passed"] for r in stored)
    assert max(r["quality_attempts"] for r in stored) > 1
