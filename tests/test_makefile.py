"""`make data/NAME`: a no-op when up to date, refused then redone when the recipe changes, grown
when only num_samples rises."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT, small_recipe

VENV = Path(sys.executable).parent.parent


def make(folder: Path, *args: str) -> subprocess.CompletedProcess:
    # -o: the venv running this test is installed already; never reinstall it from a bare copy.
    skip_install = ["-o", f"{VENV}/.core", "-o", f"{VENV}/.installed"]
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(folder), f"VENV={VENV}", *skip_install, *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_make_data_is_incremental(tmp_path):
    shutil.copy2(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe(num_samples=8)))

    first = make(tmp_path, "data/tiny")
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "data" / "tiny" / "manifest.json").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*") if p.is_file()}

    second = make(tmp_path, "data/tiny")
    assert second.returncode == 0 and "nothing to do" in second.stdout
    assert {
        p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*") if p.is_file()
    } == mtimes

    recipe.write_text(yaml.safe_dump(small_recipe(num_samples=6, seed=99)))
    refused = make(tmp_path, "data/tiny")
    assert refused.returncode != 0 and "different recipe" in refused.stderr
    redone = make(tmp_path, "data/tiny", "GENERATE_ARGS=--overwrite")
    assert redone.returncode == 0, redone.stderr
    manifest = yaml.safe_load((tmp_path / "data" / "tiny" / "manifest.json").read_text())
    assert manifest["num_samples"] == 6

    recipe.write_text(yaml.safe_dump(small_recipe(num_samples=10, seed=99)))
    grown = make(tmp_path, "data/tiny")  # a larger num_samples grows the corpus in place
    assert grown.returncode == 0 and "rendered 4 samples" in grown.stdout, grown.stderr
