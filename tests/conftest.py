"""Shared fixtures: small real recipes on the built-in `tiny` model, and one generated dataset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SYNTHGEN = [sys.executable, "-m", "synthgen"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# datasets keys its cache of a local folder by the folder's name and data-file patterns, not by
# the files' contents: two test sessions' `out/` folders would share (stale) cache entries.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="synthgen-test-datasets-")


def small_recipe(**changes) -> dict:
    """The demo recipe cut down to seconds: 20 samples, 64x64, 4 steps, with a multilabel."""
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    recipe.update(name="unit", num_samples=20, shard_size=8)
    recipe["splits"] = {"train": 0.8, "test": 0.2}
    recipe["generation"].update(steps=4, batch_size=4)
    recipe["prompt"] = "retina {laterality} age={age} sbp={sbp} gender={sex} showing {findings}"
    recipe["labels"]["findings"] = {
        "dist": "multilabel",
        "values": {"drusen": 0.3, "hemorrhage": 0.2},
        "none": "no finding",
    }
    for key, value in changes.items():
        recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([*SYNTHGEN, *args], capture_output=True, text=True, cwd=ROOT, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"synthgen {' '.join(args)} failed:\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def generated(tmp_path_factory) -> Path:
    """One dataset made through the real CLI, shared by the read-back tests."""
    base = tmp_path_factory.mktemp("generated")
    recipe = write_recipe(base / "unit.yaml", small_recipe())
    out = base / "out"
    run_cli("generate", str(recipe), "-o", str(out), "--device", "cpu")
    return out


@pytest.fixture
def fresh_copy(tmp_path, generated) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(generated, target)
    return target
