"""Scale-out on CPU with the tiny model: real processes, real Ray, real kills, a real S3 server.

Every run here is the `synthgen` command in its own process group, so a kill takes the
worker processes with it and no test can hang: each subprocess has a bounded timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from conftest import ROOT, SYNTHGEN, small_recipe, write_recipe

RUN_TIMEOUT = 300  # seconds for one `synthgen generate`; a 2-core CI box needs ~30-60
POOL = ("--devices", "cpu", "--workers-per-device", "2")
ONE = ("--devices", "cpu")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")

pytestmark = pytest.mark.slow


# --- processes ---------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's rank, plus `extra`."""
    env = {
        k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")
    }
    env.update(extra)
    return env


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`synthgen ARGS` in a new session: its process group holds it and every worker it spawns.

    Output goes to files, not pipes: nobody reads a pipe while a test polls, and a full one
    would stall the run.
    """
    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [*SYNTHGEN, *args], cwd=ROOT, env=env or clean_env(), start_new_session=True,
        stdout=stdout, stderr=stderr, text=True,
    )  # fmt: skip
    proc.output_files = (stdout, stderr)
    return proc


def output(proc: subprocess.Popen) -> tuple[str, str]:
    texts = []
    for handle in proc.output_files:
        handle.seek(0)
        texts.append(handle.read())
        handle.close()
    return texts[0], texts[1]


def live_members(group: int) -> list[int]:
    """Processes of a process group that still run (zombies waiting for init do not count)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def gone(group: int, within: float) -> bool:
    """Whether every process of `group` has ended within `within` seconds."""
    deadline = time.monotonic() + within
    while live_members(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not live_members(group)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group and wait until none of it runs."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert gone(proc.pid, within=30), "processes of the killed run are still alive"


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        _, stderr = output(proc)
        raise AssertionError(
            f"synthgen {' '.join(proc.args[3:])} ran over {timeout} s:\n{stderr[-3000:]}"
        ) from None
    stdout, stderr = output(proc)
    if not gone(proc.pid, within=30):  # e.g. worker processes that outlive their parent
        kill_group(proc)
        raise AssertionError(f"synthgen {' '.join(proc.args[3:])} left processes running")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def synthgen(*args: str, env: dict[str, str] | None = None, check: bool = True):
    result = finish(start(*args, env=env))
    if check and result.returncode != 0:
        raise AssertionError(f"synthgen {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def wait_for(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 240) -> None:
    """Poll `condition` every 10 ms while `proc` runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            kill_group(proc)  # whatever it left running
            stderr = output(proc)[1][-3000:]
            raise AssertionError(
                f"the run ended (exit {proc.returncode}) before the kill point:\n{stderr}"
            )
        if time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"no kill point within {timeout} s")
        time.sleep(0.01)


# --- reading an output directory ---------------------------------------------------------------


def commits(out: Path) -> set[str]:
    folder = out / ".synthgen" / "commits"
    names = os.listdir(folder) if folder.is_dir() else []
    return {name.removesuffix(".json") for name in names if name.endswith(".json")}


def temporaries(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp-*"))


def samples(out: Path) -> dict[str, tuple[str, dict]]:
    """key -> (sha256 of the image bytes, the `.json` member), read back with webdataset."""
    tars = sorted(str(p) for p in (out / "webdataset").glob("*.tar"))
    found, seen = {}, Counter()
    for sample in wds.WebDataset(tars, shardshuffle=False):
        seen[sample["__key__"]] += 1
        found[sample["__key__"]] = (hashlib.sha256(sample["png"]).hexdigest(),
                                    json.loads(sample["json"]))  # fmt: skip
    duplicated = [key for key, n in seen.items() if n > 1]
    assert not duplicated, f"keys in more than one tar: {duplicated}"
    return found


def parquet_rows(out: Path) -> list[dict]:
    files = sorted((out / "parquet").glob("*.parquet"))
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    return sorted(rows, key=lambda row: row["key"])


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def assert_same_dataset(out: Path, reference: Path) -> None:
    """Same samples (keys, pixels, metadata), same Parquet rows, same manifest, nothing left over."""
    assert temporaries(out) == []
    expected = samples(reference)
    assert samples(out) == expected and len(expected) == manifest(reference)["num_samples"]
    assert parquet_rows(out) == parquet_rows(reference)
    assert manifest(out) == manifest(reference)
    assert commits(out) == commits(reference)


# --- the runs every comparison starts from ------------------------------------------------------


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """24 samples in 7 shards of at most 4, 2 steps, batches of 2."""
    generation = {**small_recipe()["generation"], "steps": 2, "batch_size": 2}
    changes = {"num_samples": 24, "shard_size": 4, "generation": generation}
    return write_recipe(tmp_path_factory.mktemp("scale") / "scale.yaml", small_recipe(**changes))


@pytest.fixture(scope="module")
def one_worker(recipe) -> Path:
    out = recipe.parent / "one-worker"
    synthgen("generate", str(recipe), "-o", str(out), *ONE)
    return out


@pytest.fixture(scope="module")
def two_processes(recipe) -> Path:
    out = recipe.parent / "two-processes"
    synthgen("generate", str(recipe), "-o", str(out), *POOL)
    return out


@pytest.fixture(scope="module")
def ray_actors(recipe) -> Path:
    """A local Ray cluster of os.cpu_count() CPU actors (2 on the 2-core test box; no flag of
    `generate` sets the count: start a cluster and pass --address for fewer)."""
    out = recipe.parent / "ray"
    synthgen("generate", str(recipe), "-o", str(out), "--executor", "ray")
    return out


# --- 1. one worker, worker processes and Ray write the same dataset -------------------------------


def test_worker_processes_and_ray_write_the_one_worker_dataset(
    one_worker, two_processes, ray_actors
):
    """Same keys, pixels, metadata, Parquet rows and manifest, whoever renders the shards.

    CPU kernels split their sums by thread count, so this holds only because every executor
    renders with the same fixed thread count (SYNTHGEN_CPU_THREADS).
    """
    assert len(samples(one_worker)) == 24
    assert_same_dataset(two_processes, one_worker)
    assert_same_dataset(ray_actors, one_worker)
    logs = sorted(p.name for p in (two_processes / ".synthgen" / "logs").glob("*.log"))
    assert logs == ["worker-0.log", "worker-1.log"]


# --- 2. SIGKILL at any point, then the same command again ---------------------------------------


def test_killed_pool_resumes_to_the_uninterrupted_dataset(recipe, one_worker, tmp_path):
    """Two SIGKILLs, a leftover temporary and a damaged shard: the same command then ends with
    the dataset an uninterrupted run writes, byte for byte."""
    out = tmp_path / "killed"
    command = ("generate", str(recipe), "-o", str(out), *POOL)
    total = len(commits(one_worker))

    # Killed as soon as the first shard is committed, the parent only (as the OOM killer or
    # `kill -9 PID` would): its workers must stop by themselves, not render on or hang.
    first = start(*command)
    wait_for(first, lambda: len(commits(out)) >= 1)
    first.kill()
    first.wait(timeout=30)
    stopped = gone(first.pid, within=20)
    kill_group(first)  # what did not stop: a failing test leaves no process behind
    assert stopped, "pool workers outlived their killed parent"
    after_first = commits(out)
    assert 1 <= len(after_first) < total and not (out / "manifest.json").exists()

    # Killed mid-way: as a shard's file is half written, or two shards later (the other worker
    # is then mid-shard), whichever comes first.
    left_by_first = set(temporaries(out))
    second = start(*command)  # this time the whole process group
    wait_for(
        second,
        lambda: (
            len(commits(out)) >= len(after_first) + 2 or bool(set(temporaries(out)) - left_by_first)
        ),
    )
    kill_group(second)
    assert len(commits(out)) < total, "the second run finished before it could be killed"

    # What a kill between writing a temporary file and renaming it leaves behind.
    (out / "webdataset" / "train-000004.tar.tmp-0123456789ab").write_bytes(b"half a tar")
    # A committed shard damaged on disk is not trusted: its bytes no longer match the record.
    damaged = sorted(commits(out))[0]
    tar = out / "webdataset" / f"{damaged}.tar"
    tar.write_bytes(tar.read_bytes()[:512])

    resumed = synthgen(*command)
    assert "resumed:" in resumed.stderr
    assert_same_dataset(out, one_worker)


def test_a_claim_killed_mid_write_is_taken_up_again(recipe, tmp_path):
    """A kill inside the very first write (recipe.yaml) leaves its temporary: still ours."""
    from synthgen.output.outdir import OutDir
    from synthgen.recipe.schema import load_recipe
    from synthgen.run.generate import claim_output
    from synthgen.run.planning import build_plan

    out = tmp_path / "claimed"
    out.mkdir()
    text = recipe.read_text()
    (out / "recipe.yaml.tmp-0123456789ab").write_text(text[: len(text) // 2])
    loaded = load_recipe(recipe)
    claim_output(OutDir(str(out)), loaded, build_plan(loaded))
    assert OutDir(str(out)).run_record().recipe_sha256 == loaded.sha256()


# --- 3. ranks: torchrun-style env, flags, a SLURM array ------------------------------------------


def share(reference: Path, rank: int, world_size: int) -> list[dict]:
    """The shards rank `rank` renders: every world_size-th of the plan, in plan order."""
    return manifest(reference)["shards"][rank::world_size]


def rendered(result: subprocess.CompletedProcess) -> int:
    line = next(l for l in result.stdout.splitlines() if l.startswith("rendered "))  # noqa: E741
    return int(line.split()[1])


def test_ranks_started_together_split_the_shards(recipe, one_worker, tmp_path):
    out = tmp_path / "ranks"
    command = ("generate", str(recipe), "-o", str(out), *ONE)
    procs = [start(*command, env=clean_env(RANK=str(r), WORLD_SIZE="2")) for r in (0, 1)]
    try:
        results = [finish(proc) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_group(proc)
    for rank, result in enumerate(results):
        assert result.returncode == 0, result.stderr[-2000:]
        # Each rendered exactly its own share: together they rendered every sample once.
        assert rendered(result) == sum(s["count"] for s in share(one_worker, rank, 2))
    assert sum(rendered(r) for r in results) == manifest(one_worker)["num_samples"]
    assert any("wrote 24 samples" in r.stdout for r in results)  # the last rank finalized
    assert_same_dataset(out, one_worker)

    card = (out / "README.md").read_bytes()
    (out / "manifest.json").unlink()
    synthgen("finalize", str(out))
    assert manifest(out) == manifest(one_worker)
    assert (out / "README.md").read_bytes() == card


def test_rank_flags_and_a_slurm_array_split_the_shards(recipe, one_worker, tmp_path):
    out = tmp_path / "flags"
    command = ("generate", str(recipe), "-o", str(out), *ONE)
    first = synthgen(*command, "--rank", "0", "--world-size", "2")
    assert "this rank is done" in first.stdout
    assert commits(out) == {s["name"] for s in share(one_worker, 0, 2)}
    assert not (out / "manifest.json").exists()

    # Array indices 4 and 5 of `sbatch --array=4-5`: index 5 is rank 1 of 2.
    slurm = clean_env(SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_TASK_MIN="4", SLURM_ARRAY_TASK_COUNT="2")
    second = synthgen(*command, env=slurm)
    assert rendered(second) == sum(s["count"] for s in share(one_worker, 1, 2))
    assert "wrote 24 samples" in second.stdout
    assert_same_dataset(out, one_worker)


# --- 4. an S3-compatible server on loopback -------------------------------------------------------


def test_s3_output_resumes_and_finalizes_like_local(recipe, one_worker, s3_server, tmp_path):
    fs, env = s3_server
    command = ("generate", str(recipe), "-o", "s3://bucket/run", *ONE)

    def download() -> Path:
        local = tmp_path / f"download-{time.monotonic_ns()}"
        fs.invalidate_cache()
        fs.get("bucket/run/", str(local), recursive=True)
        return local

    synthgen(*command, env=env)
    assert_same_dataset(download(), one_worker)

    lost = manifest(one_worker)["shards"][2]
    fs.rm([f"bucket/run/.synthgen/commits/{lost['name']}.json"] +
          [f"bucket/run/{path}" for path in lost["files"]])  # fmt: skip
    again = synthgen(*command, env=env)
    assert rendered(again) == lost["count"]  # only the lost shard is rendered again
    assert f"resumed: {len(manifest(one_worker)['shards']) - 1} shards" in again.stderr
    assert_same_dataset(download(), one_worker)


# --- 5. a shard that fails: retried, reported, the rest kept -------------------------------------


def i2i_recipe(tmp_path: Path) -> Path:
    """16 cohort rows, i2i, shards of 2 (8 shards)."""
    from synthgen.cohort.demo import make_cohort

    cohort = make_cohort(tmp_path / "cohort", rows=16, size=64)
    recipe = yaml.safe_load((ROOT / "recipes" / "demo-i2i.yaml").read_text())
    recipe.update(name="failing", shard_size=2)
    recipe["source"].update(manifest=str(cohort), on_error="fail")
    recipe["privacy"]["linkage"] = str(tmp_path / "linkage.csv")
    recipe["generation"].update(steps=2, batch_size=2, strength=0.5)
    return write_recipe(tmp_path / "failing.yaml", recipe)


def test_failing_shard_is_retried_reported_and_the_rest_kept(tmp_path):
    from synthgen.recipe.schema import load_recipe
    from synthgen.run.planning import build_plan

    recipe = i2i_recipe(tmp_path)
    plan = build_plan(load_recipe(recipe), check_images=False)
    failing = plan.tasks[-1]  # the pool hands shards out in plan order: this one goes last
    victim = plan.specs(failing)[0].source_row
    users = {t.name for t in plan.tasks for s in plan.specs(t) if s.source_row == victim}
    assert users == {failing.name}
    image = plan.cohort.by_row[victim].image_path
    kept = tmp_path / "kept-image"
    shutil.copy(image, kept)

    out = tmp_path / "out"
    command = ("generate", str(recipe), "-o", str(out), *POOL, "--max-retries", "1")
    proc = start(*command)
    # The image goes after the cohort was checked and before its shard starts: that shard is
    # handed out only once six others are committed.
    wait_for(proc, lambda: len(commits(out)) >= 1)
    image.unlink()
    result = finish(proc)

    assert result.returncode == 1
    summary = result.stderr[result.stderr.index("error: 1 shards failed:") :]
    line = next(l for l in summary.splitlines() if failing.name in l)  # noqa: E741
    assert f"row {victim}" in line and str(image.name) not in result.stderr  # no path leaks
    assert commits(out) == {t.name for t in plan.tasks} - {failing.name}
    assert not (out / "manifest.json").exists()
    logs = "".join(p.read_text() for p in (out / ".synthgen" / "logs").glob("worker-*.log"))
    assert logs.count(f"shard {failing.name} failed") == 2  # the first attempt and one retry

    shutil.copy(kept, image)
    again = synthgen(*command)
    assert rendered(again) == failing.size
    assert manifest(out)["num_samples"] == 16 and temporaries(out) == []
    assert len(samples(out)) == 16


def test_shard_whose_path_is_blocked_fails_alone(recipe, one_worker, tmp_path):
    """A folder where a shard's tar goes: that shard fails (it is not moved into the folder and
    then swept away as a temporary), the one-worker path retries it, the others commit."""
    out = tmp_path / "blocked"
    obstacle = out / "webdataset" / "train-000001.tar"
    obstacle.mkdir(parents=True)
    command = ("generate", str(recipe), "-o", str(out), *ONE, "--max-retries", "1")
    result = synthgen(*command, check=False)
    assert result.returncode == 1, "a shard that could not be written was reported as written"
    assert "train-000001:" in result.stderr[result.stderr.index("shards failed:") :]
    assert result.stderr.count("shard train-000001 failed (attempt") == 2
    assert commits(out) == commits(one_worker) - {"train-000001"}
    assert list(obstacle.iterdir()) == [] and not (out / "manifest.json").exists()
    expected = manifest(one_worker)["shards"]
    kept = [shard for shard in expected if shard["name"] != "train-000001"]
    assert [json.loads((out / ".synthgen" / "commits" / f"{s['name']}.json").read_text())["files"]
            for s in kept] == [s["files"] for s in kept]  # fmt: skip


def test_s3_lease_refuses_a_second_run_and_lets_ranks_share(recipe, s3_server, monkeypatch):
    """The lease on an object store: a file per process and a listing, no conditional write."""
    from synthgen.errors import OutputError
    from synthgen.output.lock import LeaseRecord, hold
    from synthgen.output.outdir import LEASES, OutDir

    fs, env = s3_server
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                 "AWS_ENDPOINT_URL"):  # fmt: skip
        monkeypatch.setenv(name, env[name])
    out = OutDir("s3://bucket/leased")
    with hold(out, "ranks-2-x"), hold(out, "ranks-2-x"):  # two ranks of one launch
        with pytest.raises(OutputError, match="in use by another synthgen run"):
            hold(out)
        refused = synthgen("generate", str(recipe), "-o", "s3://bucket/leased", *ONE, env=env,
                           check=False)  # fmt: skip
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert "s3://bucket/leased: is in use by another synthgen run" in refused.stderr
    elsewhere = LeaseRecord("0123456789ab", "x", "node7", "node7|boot", 1, "1", time.time() - 1)
    fs.pipe(f"bucket/leased/{LEASES}/0123456789ab.json", elsewhere.to_json())
    with hold(out):  # a lease of another machine that ran out is taken over
        fs.invalidate_cache()
        assert not fs.exists(f"bucket/leased/{LEASES}/0123456789ab.json")


def test_s3_without_credentials_is_one_line(recipe, s3_server):
    _, env = s3_server
    bare = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    bare.update(AWS_ENDPOINT_URL=env["AWS_ENDPOINT_URL"], AWS_EC2_METADATA_DISABLED="true",
                AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")  # fmt: skip
    result = synthgen(
        "generate", str(recipe), "-o", "s3://bucket/none", *ONE, env=bare, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: s3://bucket/none: cannot reach it (NoCredentialsError: Unable to locate "
        "credentials); check the credentials and the address"
    ]
