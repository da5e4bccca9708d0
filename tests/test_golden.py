"""Golden output: a fixed T2I recipe and a fixed I2I sweep write exactly the bytes recorded in
tests/golden/, so no refactoring changes a dataset without the change showing here.

Pixels come from float kernels, which differ between CPU instruction sets and library versions;
`environment` is recorded beside the hashes. Where it differs, every file whose bytes do not
depend on pixels is still compared exactly, and the shards are compared sample by sample on
everything but the image bytes. manifest.json also records the versions of libraries that draw no
pixel (transformers, peft, pyarrow, …), which an unpinned install moves: its bytes are compared
only where those match too, its content everywhere. To record new golden files after a deliberate change:
`SYNTHGEN_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import ROOT, small_recipe, write_recipe

from synthgen.cohort.demo import make_cohort
from synthgen.recipe.schema import load_recipe
from synthgen.run.generate import generate

GOLDEN = ROOT / "tests" / "golden"
# Files whose bytes depend on no pixel: compared in every environment.
PIXEL_FREE = ("README.md", "recipe.yaml", "previews/labels-")


def environment() -> dict[str, str]:
    """What the pixels depend on: the library versions and the CPU. The vector extensions alone
    do not say enough: AMD EPYC and Intel Xeon both report AVX512 and round differently."""
    versions = {name: importlib.metadata.version(name) for name in ("torch", "diffusers")}
    return {"cpu": torch.backends.cpu.get_cpu_capability(), "cpu_vendor": cpu_vendor(),
            **versions}  # fmt: skip


def cpu_vendor() -> str:
    """`GenuineIntel`, `AuthenticAMD`, … from /proc/cpuinfo (the machine type elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def i2i_recipe(base: Path) -> dict:
    cohort = make_cohort(base / "cohort", rows=8, marker="GOLD")
    recipe = yaml.safe_load((ROOT / "recipes" / "demo-i2i.yaml").read_text())
    recipe["name"] = "gold"
    recipe["shard_size"] = 6
    recipe["source"].update(manifest=str(cohort), on_error="skip")
    recipe["privacy"]["linkage"] = str(base / "linkage.csv")
    recipe["generation"].update(steps=4, batch_size=4, strength=[0.5, 0.8])
    return recipe


def digests(out: Path) -> dict[str, str]:
    return {
        str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out.rglob("*"))
        if path.is_file() and not path.relative_to(out).parts[0] == ".synthgen"
    }


def shard_content(path: Path) -> list:
    """Every sample of a shard file but its image bytes."""
    if path.suffix == ".tar":
        with tarfile.open(path) as tar:
            return [
                (m.name, tar.extractfile(m).read().decode())
                for m in tar
                if not m.name.endswith((".png", ".jpg", ".webp"))
            ]
    return pq.read_table(path).drop_columns(["image"]).to_pylist()


def record(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        shard["files"] = sorted(shard["files"])  # their sha256 depend on the pixels
    return {
        "environment": environment(),
        "versions": manifest.pop("versions"),
        "files": digests(out),
        "manifest_without_hashes": manifest,
        "shards": {
            str(p.relative_to(out)): shard_content(p)
            for p in sorted([*out.glob("webdataset/*.tar"), *out.glob("parquet/*.parquet")])
        },
    }


@pytest.mark.parametrize("mode", ["t2i", "i2i"])
def test_outputs_match_the_golden_bytes(tmp_path, mode):
    recipe = small_recipe() if mode == "t2i" else i2i_recipe(tmp_path)
    path = write_recipe(tmp_path / f"{mode}.yaml", recipe)
    generate(load_recipe(path), str(tmp_path / "out"))
    got = json.loads(json.dumps(record(tmp_path / "out")))
    golden_file = GOLDEN / f"{mode}.json"
    if os.environ.get("SYNTHGEN_WRITE_GOLDEN"):
        golden_file.parent.mkdir(exist_ok=True)
        golden_file.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    golden = json.loads(golden_file.read_text())
    assert got["manifest_without_hashes"] == golden["manifest_without_hashes"]
    assert got["shards"] == golden["shards"]
    assert sorted(got["files"]) == sorted(golden["files"])
    if got["environment"] == golden["environment"]:
        if got["versions"] != golden["versions"]:
            del got["files"]["manifest.json"], golden["files"]["manifest.json"]
        assert got["files"] == golden["files"]
    else:
        for name, digest in golden["files"].items():
            if name.startswith(PIXEL_FREE):
                assert got["files"][name] == digest, name
