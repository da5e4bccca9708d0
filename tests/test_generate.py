"""End to end on the tiny model: files read back by datasets, webdataset and pyarrow; determinism."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

import datasets
import pytest
import webdataset as wds
import yaml
from conftest import ROOT, SYNTHGEN, run_cli, small_recipe, write_recipe
from hooked_runs import cli, copy_of, hooked_env, one_error_line, snapshot, tiny_recipe
from PIL import Image

from synthgen.output.outdir import OutDir
from synthgen.output.shards import ShardWriter
from synthgen.plan import SampleSpec, ShardTask
from synthgen.recipe.schema import load_recipe, recipe_from_dict
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
    other = write_recipe(tmp_path / "other.yaml", small_recipe(seed=7, num_samples=5))
    refused = run_cli("generate", str(other), "-o", str(fresh_copy), check=False)
    assert refused.returncode == 2
    assert "different recipe" in refused.stderr and "Traceback" not in refused.stderr
    assert json.loads((fresh_copy / "manifest.json").read_text())["num_samples"] == 20
    run_cli("generate", str(other), "-o", str(fresh_copy), "--overwrite")
    assert json.loads((fresh_copy / "manifest.json").read_text())["num_samples"] == 5
    assert len(tar_samples(fresh_copy)) == 5


def test_foreign_files_are_never_overwritten(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe())
    refused = run_cli("generate", str(recipe), "-o", str(out), "--overwrite", check=False)
    assert refused.returncode == 2 and "did not write" in refused.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_a_run_whose_run_record_was_deleted_is_named_as_such_and_kept(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(num_samples=6))
    out = tmp_path / "out"
    run_cli("generate", str(recipe), "-o", str(out))
    (out / ".synthgen" / "run.json").unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra in ((), ("--overwrite",)):
        refused = run_cli("generate", str(recipe), "-o", str(out), *extra, check=False)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr
        assert "run record (.synthgen/run.json) is gone" in lines[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


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


# --- output locations and damaged records: one line, exit 2, the way to repair it ---------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe file, the OUT an uninterrupted run of it writes)."""
    recipe = write_recipe(tmp_path_factory.mktemp("tiny") / "tiny.yaml", tiny_recipe())
    generate(load_recipe(recipe), str(recipe.parent / "out"))
    return recipe, recipe.parent / "out"


def test_outputs_that_would_vanish_or_land_elsewhere_are_refused(tiny, tmp_path, monkeypatch):
    recipe, _ = tiny
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = {
        "": "--out: is empty",  # would be the current folder
        "memory://x": "gone when synthgen exits",
        "xyz://bucket/out": "Protocol not known: xyz",
        str(tmp_path / "a-file"): "is a file, not a folder",
        str(tmp_path / "a-file" / "out"): "a folder above it is a file",
        str(tmp_path / "dangling"): "symbolic link to a place that does not exist",
    }
    if importlib.util.find_spec("gcsfs") is None:
        cases["gs://bucket/out"] = "install gcsfs"
    monkeypatch.chdir(tmp_path)
    for out, message in cases.items():
        refused = cli("generate", str(recipe), "-o", out)
        line = one_error_line(refused.stderr)
        assert refused.exit_code == 2 and message in line and (out in line or not out), line
    assert sorted(os.listdir(tmp_path)) == ["a-file", "dangling"]  # nothing written anywhere
    outside = cli(
        "generate", str(recipe), "-o", str(tmp_path / "o"), env={"RANK": "3", "WORLD_SIZE": "2"}
    )
    assert (
        outside.exit_code == 2
        and "RANK: this process is rank 3 of a world of 2" in one_error_line(outside.stderr)
    )


def unshared(script: str) -> subprocess.CompletedProcess:
    """`script` (sh) in a mount namespace of its own, where it may mount file systems."""
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                          env=hooked_env(), cwd=ROOT, timeout=300)  # fmt: skip


@pytest.fixture
def namespaces(tmp_path):
    if shutil.which("unshare") is None or unshared(f"mount -t tmpfs tmpfs {tmp_path}").returncode:
        pytest.skip("needs unshare -m and mount (root in a container, or CAP_SYS_ADMIN)")


def test_a_read_only_file_system_is_one_line(tiny, tmp_path, namespaces):
    recipe, reference = tiny
    mount = tmp_path / "ro"
    mount.mkdir()
    shutil.copytree(reference, mount / "done")
    command = " ".join([*SYNTHGEN, "generate", str(recipe)])
    result = unshared(
        f"mount --bind {mount} {mount} && mount -o remount,ro,bind {mount} && "
        f"{command} -o {mount}/new; echo new=$?; {' '.join(SYNTHGEN)} finalize {mount}/done; echo done=$?"
    )
    assert "new=2" in result.stdout and "done=2" in result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"error: {mount}/new: cannot create it (Read-only file system); choose another place",
        f"error: {mount}/done: cannot be written to (a read-only file system, or no permission); "
        "choose another place",
    ]


def test_a_file_size_limit_during_finalize_is_one_line_and_leaves_nothing_behind(tiny, tmp_path):
    """RLIMIT_FSIZE, set in the child, makes the preview's write fail for real; finalize then
    reports the file and the repair, leaves no temporary, and does not say OUT is complete."""
    _, reference = tiny
    out = copy_of(reference, tmp_path / "out")
    limit = (out / "previews" / "preview.png").stat().st_size - 1

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = run_cli("finalize", str(out), check=False, preexec_fn=limited)
    line = one_error_line(failed.stderr)
    assert failed.returncode == 2 and "cannot write previews/preview.png (File too large)" in line
    assert "run the same command again" in line
    assert not list(out.rglob("*.tmp-*")) and not (out / "manifest.json").exists()
    run_cli("finalize", str(out))
    assert snapshot(out) == snapshot(reference)


def test_a_full_disk_during_finalize_is_one_line_and_leaves_nothing_behind(
    tiny, tmp_path, namespaces
):
    """A tmpfs with room for the shards and records but not for the contact sheet."""
    _, reference = tiny
    disk = tmp_path / "disk"
    disk.mkdir()
    out = copy_of(reference, tmp_path / "out")
    shutil.rmtree(out / "previews")
    (out / "manifest.json").unlink()
    pages = sum(-(-p.stat().st_size // 4096) for p in out.rglob("*") if p.is_file())
    sheet = -(-(reference / "previews" / "preview.png").stat().st_size // 4096)
    size_kb = 4 * (pages + 4 + sheet // 2)  # tmpfs counts whole pages
    result = unshared(
        f"mount -t tmpfs -o size={size_kb}k tmpfs {disk} && cp -a {out} {disk}/out && "
        f"{' '.join(SYNTHGEN)} finalize {disk}/out; echo rc=$?; "
        f"find {disk}/out -name '*.tmp-*' -o -name manifest.json"
    )
    assert result.stdout.strip() == "rc=2", result.stdout  # no temporary, no manifest
    line = one_error_line(result.stderr)
    assert "cannot write previews/preview.png (No space left on device)" in line


def test_damaged_records_are_one_line_naming_the_repair(tiny, tmp_path):
    recipe, reference = tiny
    out = copy_of(reference, tmp_path / "out")
    run_json = out / ".synthgen" / "run.json"
    run_json.write_text("{not json")
    for command in (
        ("generate", str(recipe), "-o", str(out)),
        ("finalize", str(out)),
        ("info", str(out)),
    ):
        refused = cli(*command)
        line = one_error_line(refused.stderr)
        assert (
            refused.exit_code == 2
            and "run.json is damaged (not JSON); rerun with --overwrite" in line
        )
    assert cli("generate", str(recipe), "-o", str(out), "--overwrite").exit_code == 0
    assert snapshot(out) == snapshot(reference)

    run_json.unlink()
    run_json.mkdir()
    refused = cli("generate", str(recipe), "-o", str(out))
    assert (
        refused.exit_code == 2
        and ".synthgen/run.json cannot be read (Is a directory)" in one_error_line(refused.stderr)
    )
    run_json.rmdir()
    shutil.copy(reference / ".synthgen" / "run.json", run_json)

    commit = out / ".synthgen" / "commits" / "train-000000.json"
    commit.write_bytes(b"\xff\xfe")
    for command in (("finalize", str(out)), ("info", str(out))):
        refused = cli(*command)
        line = one_error_line(refused.stderr)
        assert (
            refused.exit_code == 2
            and "train-000000.json is damaged (not JSON); rerun `synthgen generate`" in line
        )
    (out / "manifest.json").write_text("[]")
    refused = cli("push", str(out), "--repo-id", "a/b", "--dry-run")
    assert refused.exit_code == 2 and "manifest.json is damaged" in one_error_line(refused.stderr)
    assert cli("generate", str(recipe), "-o", str(out)).exit_code == 0  # renders the shard again
    assert snapshot(out) == snapshot(reference)
