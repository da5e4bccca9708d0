"""A complete OUT is complete, and no one's files are touched: kills at every file finalize writes,
damaged shards in a complete OUT, two runs on one OUT, user files beside synthgen's, the
linkage table, and the audit's real images.

Kills are real SIGKILLs of a real `synthgen` process, placed by `tests/hooks/sitecustomize.py`
(CPython audit hooks at the exact file operation; nothing of synthgen is patched).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, write_recipe
from hooked_runs import (
    cli,
    copy_of,
    hooked_env,
    one_error_line,
    recipe_and_splits,
    snapshot,
    start,
    synthgen,
    tiny_recipe,
)

from synthgen.errors import OutputError
from synthgen.output.lock import LeaseRecord, hold
from synthgen.output.outdir import LEASES, MANIFEST, OutDir
from synthgen.recipe.schema import load_recipe
from synthgen.run.generate import generate
from synthgen.run.ownership import finalize_paths


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    return write_recipe(tmp_path_factory.mktemp("integrity") / "tiny.yaml", tiny_recipe())


@pytest.fixture(scope="module")
def reference(recipe_file) -> Path:
    """The OUT an uninterrupted run writes."""
    out = recipe_file.parent / "reference"
    generate(load_recipe(recipe_file), str(out))
    return out


# --- 1. a kill at every file finalize writes --------------------------------------------------


def test_a_kill_at_every_file_finalize_writes_resumes_to_the_uninterrupted_out(
    recipe_file, reference, tmp_path
):
    """`synthgen finalize` is SIGKILLed as it removes the old manifest, as it is about to rename
    each file into place (its temporary complete), and as it opens the first and the last
    temporary (still empty); `synthgen generate` then ends with the OUT an uninterrupted run
    wrote, byte for byte. The files are found by logging the renames of a real finalize, so
    every file it writes is a kill point, whatever finalize comes to write."""
    log = tmp_path / "renames.log"
    probe = copy_of(reference, tmp_path / "probe")
    assert (
        synthgen("finalize", str(probe), env=hooked_env(SYNTHGEN_TEST_LOG=str(log))).returncode == 0
    )
    written = [Path(line).relative_to(probe).as_posix() for line in log.read_text().splitlines()]
    written = [path for path in written if not path.startswith(LEASES)]
    assert written == finalize_paths(*recipe_and_splits(probe))  # manifest last
    assert snapshot(probe) == snapshot(reference)

    points = [("remove", MANIFEST), ("open", written[0]), ("open", MANIFEST)]
    points += [("rename", path) for path in written]
    for event, path in points:
        out = copy_of(reference, tmp_path / f"{event}-{path.replace('/', '-')}")
        killed = synthgen("finalize", str(out), env=hooked_env(SYNTHGEN_TEST_AT=f"{event}:{path}"))
        assert killed.returncode == -9, (event, path, killed.stderr[-2000:])
        assert list((out / LEASES).iterdir()), "the killed run's lease is left behind"
        if (event, path) != ("remove", MANIFEST):
            assert not (out / MANIFEST).exists(), (
                f"OUT says complete after a kill at {event} {path}"
            )
        resumed = generate(load_recipe(recipe_file), str(out))
        assert resumed.rendered == 0 and resumed.finalized
        assert snapshot(out) == snapshot(reference), f"killed at {event} {path}"


def test_a_generate_killed_while_finalizing_is_finished_by_the_next(
    recipe_file, reference, tmp_path
):
    out = copy_of(reference, tmp_path / "out", without_finalize=True)
    killed = synthgen("generate", str(recipe_file), "-o", str(out),
                      env=hooked_env(SYNTHGEN_TEST_AT="rename:README.md"))  # fmt: skip
    assert killed.returncode == -9 and not (out / MANIFEST).exists()
    generate(load_recipe(recipe_file), str(out))
    assert snapshot(out) == snapshot(reference)


def test_a_rank_killed_while_another_finalizes_leaves_an_honest_out(
    recipe_file, reference, tmp_path
):
    """Every shard is committed, so both ranks finalize at once; one is killed half way. OUT is
    then complete and right, or not complete; the next run makes it the reference either way.
    Rank 0 is held as it opens its card until rank 1 is killed at its own: without that, rank 0
    could finish first, and rank 1 would find OUT complete and never finalize."""
    out, release = copy_of(reference, tmp_path / "out", without_finalize=True), tmp_path / "go"
    command = ("generate", str(recipe_file), "-o", str(out))
    hold = hooked_env(SYNTHGEN_TEST_AT="open:README.md", SYNTHGEN_TEST_DO=f"wait:{release}")
    held = start(*command, env={**hold, "RANK": "0", "WORLD_SIZE": "2"})
    kill = hooked_env(SYNTHGEN_TEST_AT="rename:README.md")
    killed = start(*command, env={**kill, "RANK": "1", "WORLD_SIZE": "2"})
    killed.communicate(timeout=300)
    release.touch()
    held.communicate(timeout=300)
    assert [held.returncode, killed.returncode] == [0, -9]
    if (out / MANIFEST).exists():
        finished = {p: b for p, b in snapshot(out).items() if ".tmp-" not in p and LEASES not in p}
        assert finished == snapshot(reference)
    generate(load_recipe(recipe_file), str(out))
    assert snapshot(out) == snapshot(reference)


def test_an_audit_section_killed_on_its_way_into_the_card_is_finished_by_the_next_run(
    cohort, tmp_path
):
    """`audit --append-to-card` hands its section to finalize, which writes it first: killed
    before the card is renamed, OUT is not complete, and the next generate puts it in the card
    (before, an old manifest said complete and the card stayed without the audit for good)."""
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", i2i(cohort, tmp_path / "l.csv")))
    out = tmp_path / "out"
    generate(recipe, str(out))
    section = "### Audit\n\nAUDIT-SECTION-SENTINEL\n"
    script = f"from synthgen.run.finalize import finalize_alone; finalize_alone({str(out)!r}, {section!r})"
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300,
                            env=hooked_env(SYNTHGEN_TEST_AT="rename:README.md"))  # fmt: skip
    assert killed.returncode == -9 and not (out / MANIFEST).exists()
    assert generate(recipe, str(out)).finalized
    assert "AUDIT-SECTION-SENTINEL" in (out / "README.md").read_text()


# --- 2. a damaged shard in a complete OUT -----------------------------------------------------


@pytest.mark.parametrize(
    "damage", ["deleted", "truncated", "bit-flipped", "record-damaged", "wids-index-lost"]
)
def test_a_damaged_shard_in_a_complete_out_is_rendered_again(
    recipe_file, reference, tmp_path, damage
):
    out = copy_of(reference, tmp_path / "out")
    recipe = load_recipe(recipe_file)
    tar, parquet = out / "webdataset" / "train-000001.tar", out / "parquet" / "train-000000.parquet"
    if damage == "deleted":
        tar.unlink()
    elif damage == "truncated":
        parquet.write_bytes(parquet.read_bytes()[:-100])
    elif damage == "bit-flipped":
        data = bytearray(tar.read_bytes())
        data[600] ^= 0x01
        tar.write_bytes(bytes(data))
        assert generate(recipe, str(out)).already_complete  # the name-and-size check cannot see it
    elif damage == "record-damaged":
        (out / ".synthgen" / "commits" / "test-000000.json").write_text("{not json")
    else:  # a file of finalize's: written again, no shard rendered
        (out / "webdataset" / "train.wids.json").unlink()
    result = generate(recipe, str(out), verify=damage == "bit-flipped")
    assert not result.already_complete and result.finalized
    assert (result.rendered == 0) == (damage == "wids-index-lost")
    assert snapshot(out) == snapshot(reference)


# --- 3. two runs on one OUT ----------------------------------------------------------------------


def test_a_second_run_and_a_concurrent_overwrite_are_refused_while_the_first_runs(
    recipe_file, reference, tmp_path
):
    """The first run is held (one thread, at its claim) while its lease, renewed every third of
    a second, lives on: a second run of the same recipe and an --overwrite of another recipe
    are refused with one line and touch nothing; the first then finishes as if alone."""
    out, release = tmp_path / "out", tmp_path / "release"
    first = start("generate", str(recipe_file), "-o", str(out), env=hooked_env(
        SYNTHGEN_TEST_AT="rename:.synthgen/run.json", SYNTHGEN_TEST_DO=f"wait:{release}",
        SYNTHGEN_LEASE_SECONDS="1"))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".synthgen/run.json.tmp-*")):
            assert first.poll() is None and time.monotonic() < deadline, "no claim in sight"
            time.sleep(0.05)
        held = snapshot(out)
        time.sleep(1.5)  # past the lease's 1 s: only renewal keeps it
        second = cli("generate", str(recipe_file), "-o", str(out))
        other = write_recipe(tmp_path / "other.yaml", tiny_recipe(seed=99))
        overwrite = cli("generate", str(other), "-o", str(out), "--overwrite")
        for refused in (second, overwrite):
            assert refused.exit_code == 2
            assert "is in use by another synthgen run" in one_error_line(refused.stderr)
        assert snapshot(out).keys() == held.keys()
    finally:
        release.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert snapshot(out) == snapshot(reference)


def test_ranks_started_together_with_overwrite_replace_the_old_run_once(reference, tmp_path):
    """Rank 0 alone removes the previous recipe's run; rank 1 waits for its run record, so no
    rank removes what another has already rendered."""
    out = copy_of(reference, tmp_path / "out")
    other = write_recipe(tmp_path / "other.yaml", tiny_recipe(seed=99))
    command = ("generate", str(other), "-o", str(out), "--overwrite")
    ranks = [start(*command, env=hooked_env(RANK=str(r), WORLD_SIZE="2")) for r in (0, 1)]
    outputs = [proc.communicate(timeout=300) for proc in ranks]
    assert [proc.returncode for proc in ranks] == [0, 0], [err[-2000:] for _, err in outputs]
    fresh = tmp_path / "fresh"
    generate(load_recipe(other), str(fresh))
    assert snapshot(out) == snapshot(fresh)


def test_ranks_of_one_launch_share_the_lease_and_others_are_refused(tmp_path):
    out = OutDir(str(tmp_path / "out"))
    with hold(out, "ranks-2-abc"), hold(out, "ranks-2-abc"):  # two ranks of one launch
        for launch in ("ranks-4-abc", None):  # another world size; a run without ranks
            with pytest.raises(OutputError, match="in use by another synthgen run"):
                hold(out, launch)
    with hold(out, None):  # released: free again
        pass
    assert not (tmp_path / "out" / LEASES).exists()  # the lease cleans up the folders it made


def test_a_lease_from_another_machine_holds_until_it_runs_out(tmp_path):
    out = OutDir(str(tmp_path / "out"))
    (tmp_path / "out" / LEASES).mkdir(parents=True)
    elsewhere = LeaseRecord("0123456789ab", "x", "node7", "node7|boot|pid:[1]", 4242, "1",
                            time.time() + 60)  # fmt: skip
    path = tmp_path / "out" / LEASES / "0123456789ab.json"
    path.write_bytes(elsewhere.to_json())
    with pytest.raises(OutputError, match="pid 4242 on node7"):
        hold(out)
    path.write_bytes(LeaseRecord(**{**elsewhere.__dict__, "expires": time.time() - 1}).to_json())
    with hold(out):
        assert not path.exists()  # a lease that ran out is removed by the run that takes over


def test_a_lease_taken_away_stops_the_run_from_finishing(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHGEN_LEASE_SECONDS", "1")
    out = OutDir(str(tmp_path / "out"))
    lease = hold(out)
    try:
        (tmp_path / "out" / lease.path).unlink()  # as a run that found it run out would
        time.sleep(0.8)
        with pytest.raises(OutputError, match="took OUT over"):
            lease.check()
    finally:
        lease.release()


# --- 4. user files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["README.md", "recipe.yaml"])
def test_a_user_file_in_an_otherwise_empty_out_is_never_written_over(recipe_file, tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    mine = out / name
    if name == "recipe.yaml":  # a recipe kept in the folder it is generated into
        shutil.copy(recipe_file, mine)
    else:
        mine.write_text("# my notes\n")
    before = mine.read_bytes()
    for extra in ((), ("--overwrite",)):
        refused = cli("generate", str(out / name if name == "recipe.yaml" else recipe_file),
                      "-o", str(out), *extra)  # fmt: skip
        assert refused.exit_code == 2 and "did not write" in one_error_line(refused.stderr)
    assert mine.read_bytes() == before and sorted(os.listdir(out)) == [name]


def test_overwrite_removes_only_what_the_previous_run_wrote(recipe_file, reference, tmp_path):
    out = copy_of(reference, tmp_path / "out")
    user = {
        "notes.txt": b"mine", "previews/my-figure.png": b"\x89PNG mine",
        "webdataset/my-extra.tar": b"mine", "parquet/README.md": b"mine",
        ".synthgen/my-notes.json": b"{}", "notes.txt.tmp-0123456789ab": b"mine, a temporary's name",
        "webdataset/x.tar.tmp-0123456789ab": b"mine too",
    }  # fmt: skip
    for path, data in user.items():
        (out / path).write_bytes(data)
    other = write_recipe(tmp_path / "other.yaml", tiny_recipe(seed=99, num_samples=5))
    assert cli("generate", str(other), "-o", str(out), "--overwrite").exit_code == 0
    fresh = tmp_path / "fresh"
    generate(load_recipe(other), str(fresh))
    files = snapshot(out)
    assert {path: files.pop(path) for path in user} == user  # every user file, as it was
    assert files == snapshot(fresh)  # nothing of the previous run is left


def test_overwrite_refuses_a_user_file_where_the_new_run_writes(recipe_file, reference, tmp_path):
    out = copy_of(reference, tmp_path / "out")
    (out / "webdataset" / "train-000002.tar").write_bytes(b"mine")  # no shard of the old run
    bigger = write_recipe(tmp_path / "bigger.yaml", tiny_recipe(num_samples=12))
    refused = cli("generate", str(bigger), "-o", str(out), "--overwrite")
    assert refused.exit_code == 2 and "webdataset/train-000002.tar" in one_error_line(
        refused.stderr
    )
    assert snapshot(out) == {**snapshot(reference), "webdataset/train-000002.tar": b"mine"}


# --- 5. the audit's real images stay out of OUT -------------------------------------------------


def test_an_audit_report_inside_out_is_refused_also_through_a_symlink(reference, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(reference)
    for report in (reference / "audit", link / "report", reference / "previews"):
        refused = cli("audit", str(reference), "--source", "x.yaml", "-o", str(report))
        assert refused.exit_code == 2 and "--report-dir" in one_error_line(refused.stderr)
    assert not (reference / "audit").exists() and not (reference / "report").exists()


# --- 6. the linkage table -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from synthgen.cohort.demo import make_cohort

    return make_cohort(tmp_path_factory.mktemp("cohort"), rows=4, size=64)


def i2i(cohort: Path, linkage: Path) -> dict:
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "demo-i2i.yaml").read_text())
    recipe.update(name="link", shard_size=4)
    recipe["source"].update(manifest=str(cohort), on_error="fail")
    recipe["privacy"]["linkage"] = str(linkage)
    recipe["generation"].update(steps=2, batch_size=2, strength=0.5)
    return recipe


TARGETS = ["cohort manifest", "recipe", "recipe as .csv", "other table", "folder", "suffix"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_linkage_table_never_overwrites_what_it_did_not_write(cohort, tmp_path, target):
    paths = {
        "cohort manifest": cohort, "recipe": tmp_path / "r.yaml", "recipe as .csv": tmp_path / "r.csv",
        "other table": tmp_path / "t.csv", "folder": cohort.parent / "linkage.csv",
        "suffix": tmp_path / "linkage.txt",
    }  # fmt: skip
    linkage = paths[target]
    recipe = write_recipe(tmp_path / "r.yaml", i2i(cohort, linkage))
    if target == "recipe as .csv":
        shutil.copy(recipe, linkage)
    elif target == "other table":
        linkage.write_text("key,id\na,b\n")
    elif target == "folder":
        linkage.mkdir()
    before = {
        p: p.read_bytes() for p in (*cohort.parent.rglob("*"), *tmp_path.glob("*")) if p.is_file()
    }
    refused = cli("generate", str(recipe), "-o", str(tmp_path / "out"))
    assert refused.exit_code == 2 and "privacy.linkage" in one_error_line(refused.stderr)
    after = {
        p: p.read_bytes() for p in (*cohort.parent.rglob("*"), *tmp_path.glob("*")) if p.is_file()
    }
    assert after == before  # nothing overwritten, no temporary left beside the cohort
    assert not (tmp_path / "out" / ".synthgen" / "run.json").exists()


def test_the_linkage_table_is_parquet_or_csv_as_named_and_the_audit_reads_both(cohort, tmp_path):
    from synthgen.audit.inputs import read_linkage
    from synthgen.run.linkage import write_linkage
    from synthgen.run.planning import build_plan

    tables = {}
    for suffix in (".parquet", ".csv"):
        linkage = tmp_path / f"linkage{suffix}"
        recipe = load_recipe(write_recipe(tmp_path / f"r{suffix}.yaml", i2i(cohort, linkage)))
        generate(recipe, str(tmp_path / f"out{suffix}"))
        first = linkage.read_bytes()
        # A later run of the recipe replaces the table its earlier run wrote.
        write_linkage(build_plan(recipe), str(linkage), OutDir(str(tmp_path / f"again{suffix}")))
        assert linkage.read_bytes() == first
        tables[suffix] = read_linkage(str(linkage))
    assert (tmp_path / "linkage.parquet").read_bytes()[:4] == b"PAR1"
    assert pq.read_table(tmp_path / "linkage.parquet").column_names[:2] == ["key", "source_id"]
    assert (tmp_path / "linkage.csv").read_text().startswith("key,source_id,")
    assert tables[".parquet"] == tables[".csv"] and len(tables[".csv"]) == 4


def test_a_linkage_write_that_fails_leaves_no_temporary(cohort, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes the write fail for real, half way."""
    recipe = write_recipe(tmp_path / "r.yaml", i2i(cohort, tmp_path / "tables" / "linkage.csv"))
    script = (
        "import resource, sys\n"
        "from synthgen.output.outdir import OutDir\n"
        "from synthgen.recipe.schema import load_recipe\n"
        "from synthgen.run.linkage import write_linkage\n"
        "from synthgen.run.planning import build_plan\n"
        f"plan = build_plan(load_recipe({str(recipe)!r}))\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))\n"
        f"write_linkage(plan, plan.recipe.privacy.linkage, OutDir({str(tmp_path / 'out')!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=hooked_env(), timeout=120)  # fmt: skip
    assert (
        result.returncode == 1
        and "privacy.linkage: cannot be written (File too large)" in result.stderr
    )
    assert list((tmp_path / "tables").iterdir()) == []
