"""Shared fixtures: small real recipes on the built-in `tiny` model, and one generated dataset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SYNTHGEN = [sys.executable, "-m", "synthgen"]
CONSOLE_SCRIPT = ROOT / ".venv" / "bin" / "synthgen"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")  # a launcher's rank

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


def i2i_recipe(cohort: Path, linkage: Path, **generation) -> dict:
    """The i2i demo recipe over `cohort` at 4 steps and strength 0.5 (`generation` overrides)."""
    recipe = yaml.safe_load((ROOT / "recipes" / "demo-i2i.yaml").read_text())
    recipe["name"] = "deid"
    recipe["shard_size"] = 6
    recipe["source"]["manifest"] = str(cohort)
    recipe["source"]["on_error"] = "fail"
    recipe["privacy"]["linkage"] = str(linkage)
    recipe["generation"].update({"steps": 4, "batch_size": 4, "strength": 0.5, **generation})
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([*SYNTHGEN, *args], capture_output=True, text=True, cwd=ROOT, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"synthgen {' '.join(args)} failed:\n{result.stderr}")
    return result


@contextmanager
def sample_in_background(*args: str) -> Iterator[subprocess.Popen]:
    """`synthgen sample ARGS` through the console script, started now so it runs alongside the
    tests that follow; killed on exit if nobody read it to the end."""
    proc = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "sample", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def sample_lines(proc: subprocess.Popen, warning: str = "") -> list[dict]:
    """The JSON lines of a `sample_in_background` run, which must succeed with nothing on stderr
    but the one `warning` line that begins so, if one is expected."""
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err == "" if not warning else err.startswith(warning) and err.count("\n") == 1, err
    return [json.loads(line) for line in out.splitlines()]


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


@pytest.fixture
def s3_server():
    """moto's S3 on 127.0.0.1; yields (s3fs filesystem, env for synthgen pointed at it)."""
    pytest.importorskip("s3fs")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")
    }
    env.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}",
        NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
    )  # fmt: skip
    import s3fs

    fs = s3fs.S3FileSystem(
        key="testing", secret="testing", endpoint_url=env["AWS_ENDPOINT_URL"],
        skip_instance_cache=True,
    )  # fmt: skip
    fs.makedirs("bucket", exist_ok=True)  # moto keeps its buckets for the whole process
    try:
        yield fs, env
    finally:
        server.stop()
        # OutDir("s3://…") in this process reuses cached filesystems: none may point at a
        # server that is gone when the next test starts its own.
        s3fs.S3FileSystem.clear_instance_cache()
