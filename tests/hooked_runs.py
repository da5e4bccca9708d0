"""synthgen runs for the integrity tests: the real command in this process (click's runner), or
as a process with the test hook of `tests/hooks/sitecustomize.py`; and an OUT read back byte for
byte."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from click.testing import CliRunner
from conftest import ROOT, SYNTHGEN, small_recipe

from synthgen.cli import main
from synthgen.output.outdir import PACKS, OutDir
from synthgen.run.ownership import finalize_paths

HOOKS = ROOT / "tests" / "hooks"
PROGRESS = re.compile(r"^[\w ]+: +\d+%\|.*\| \d+/\d+ \[")  # a tqdm bar
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID")


def tiny_recipe(**changes) -> dict:
    """6 samples in 3 shards over 2 splits, 64 px, 2 steps, two labels: seconds on a CPU."""
    recipe = small_recipe(**{"num_samples": 6, "shard_size": 4, **changes})
    recipe["labels"] = {name: recipe["labels"][name] for name in ("sex", "age")}
    recipe["prompt"] = "retina gender={sex} age={age}"
    recipe["generation"].update(steps=2, batch_size=2)
    return recipe


def copy_of(reference: Path, target: Path, without_finalize: bool = False) -> Path:
    """A copy of the reference; `without_finalize`: as it was when its last shard committed."""
    shutil.copytree(reference, target)
    if without_finalize:
        for path in finalize_paths(*recipe_and_splits(target)):
            (target / path).unlink()
    return target


def recipe_and_splits(out: Path):
    outdir = OutDir(str(out))
    return outdir.recipe(), [task.split for task in outdir.run_record().tasks]


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of OUT, byte for byte, but the timings in commit records and the record packs
    (copies of records, grouped as the run's history had it: test_record_packs checks them)."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        relative = path.relative_to(out).as_posix()
        if relative.startswith(f"{PACKS}/"):
            continue
        data = path.read_bytes()
        if relative.startswith(".synthgen/commits/"):
            record = json.loads(data)
            record.pop("seconds")
            data = json.dumps(record, sort_keys=True).encode()
        files[relative] = data
    return files


def hooked_env(**hook: str) -> dict[str, str]:
    """This environment without launcher ranks, with the test hook on and `hook` set."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(HOOKS), str(ROOT)])
    env.update(hook)
    return env


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*SYNTHGEN, *args], cwd=ROOT, env=env or hooked_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def synthgen(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = start(*args, env=env)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def cli(*args: str, **kwargs):
    """The real `synthgen` command, in this process (a subprocess would import torch again)."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kwargs)


def one_error_line(stderr: str) -> str:
    """The one line a refusal prints (tqdm's progress bars aside)."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr)]
    lines = [line for line in lines if line and not PROGRESS.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]
