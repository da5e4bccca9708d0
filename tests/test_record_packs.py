"""Record packs: commit records read from an object store in a few round trips, never a stale copy;
and OUT's listing there, one listing per folder at once, that sees what one `find` sees.

The packs are written by the real writer during a real (tiny-model) run and read back through
s3fs from moto's S3 server on loopback, whose listing gives each object's ETag (its MD5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import small_recipe
from counting_fs import CountingFS

from synthgen.output import shards
from synthgen.output.outdir import COMMITS, PACKS, OutDir
from synthgen.output.records import ShardRecord
from synthgen.recipe.schema import Recipe, recipe_from_dict
from synthgen.run.generate import generate
from synthgen.run.ownership import recorded_ownership


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """20 samples in shards of 2 (10 shards), written with packs of 3 records."""
    out = tmp_path_factory.mktemp("packs") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shards, "PACK_SIZE", 3)
        generate(packed_recipe(), str(out))
    return out


def packed_recipe() -> Recipe:
    generation = {**small_recipe()["generation"], "steps": 1, "batch_size": 2}
    return recipe_from_dict(small_recipe(num_samples=20, shard_size=2, generation=generation))


def pack_contents(out: Path) -> list[dict[str, str]]:
    return [json.loads(p.read_bytes())["records"] for p in sorted((out / PACKS).iterdir())]


def test_a_run_packs_every_record_it_commits_as_committed(packed):
    packs = pack_contents(packed)
    commits = sorted((packed / COMMITS).iterdir())
    assert len(commits) == 10
    assert sorted(len(pack) for pack in packs) == [1, 3, 3, 3]  # every 3, the rest at close
    copies = {name: text for pack in packs for name, text in pack.items()}
    assert {name: text.encode() for name, text in copies.items()} == {
        path.name.removesuffix(".json"): path.read_bytes() for path in commits
    }


def test_packs_are_synthgens_to_clean_up(packed):
    files = [str(p.relative_to(packed)) for p in packed.rglob("*") if p.is_file()]
    own = recorded_ownership(OutDir(str(packed)), files)
    packs = [f for f in files if f.startswith(f"{PACKS}/")]
    assert packs and all(pack in own for pack in packs)
    assert f"{packs[0]}.tmp-0123456789ab" in own  # what a killed writer leaves is removed
    assert f"{PACKS}/notes.json" not in own  # a user's file there is not synthgen's


@pytest.fixture
def on_s3(packed, s3_server, monkeypatch) -> OutDir:
    fs, env = s3_server
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                 "AWS_ENDPOINT_URL"):  # fmt: skip
        monkeypatch.setenv(name, env[name])
    if fs.exists("bucket/packed"):  # moto keeps what an earlier test put there
        fs.rm("bucket/packed", recursive=True)
    fs.put(str(packed), "bucket/packed", recursive=True)
    out = OutDir("s3://bucket/packed")
    out.fs = CountingFS(out.fs)
    return out


def fetched_records(out: OutDir) -> list[str]:
    return [Path(path).name for path in out.fs.fetched if f"/{COMMITS}/" in path]


def test_on_s3_records_come_from_the_packs(packed, on_s3):
    records = on_s3.committed_records()
    assert records == OutDir(str(packed)).committed_records()  # local disk reads each record
    assert fetched_records(on_s3) == []
    assert len(on_s3.fs.fetched) == math.ceil(10 / 3)  # the packs, and nothing else
    readable = on_s3.readable_commit_records(sorted(records), on_s3.listing())
    assert readable == records and fetched_records(on_s3) == []


def test_a_record_written_again_is_read_not_its_packed_copy(on_s3):
    """Same length, other bytes (a shard rendered anew): the listing's MD5 tells them apart."""
    before = on_s3.committed_records()
    name = sorted(before)[4]
    files = before[name].files
    path = next(iter(files))
    again = ShardRecord(**{**before[name].__dict__, "files": {**files, path: "f" * 64}})
    assert len(again.to_json()) == len(before[name].to_json())
    on_s3.fs.pipe(on_s3.path(on_s3.commit_path(name)), again.to_json())
    on_s3.fs.fetched.clear()
    after = on_s3.committed_records()
    assert after[name] == again and after == {**before, name: again}
    assert fetched_records(on_s3) == [f"{name}.json"]  # that record alone is read on its own


def test_damaged_or_missing_packs_leave_every_record_read_on_its_own(on_s3):
    expected = on_s3.committed_records()
    packs = on_s3.fs.ls(on_s3.path(PACKS))
    on_s3.fs.pipe(packs[0], b"{not json")
    on_s3.fs.pipe(packs[1], json.dumps({"records": {"train-000000": 7}}).encode())
    on_s3.fs.rm(packs[2])
    on_s3.fs.fetched.clear()
    assert on_s3.committed_records() == expected
    assert 0 < len(fetched_records(on_s3)) < len(expected)  # only the last pack still serves


def test_on_s3_the_listing_by_folders_sees_what_one_find_sees(on_s3):
    """Files at the top, folders in folders, a folder where a record belongs, a user's file."""
    fs, root = on_s3.fs, on_s3.root
    for extra in ("notes.txt", "webdataset/mine/deeper/x.bin", f"{COMMITS}/train-000004.json/x"):
        fs.pipe(f"{root}/{extra}", b"user")
    fs.invalidate_cache()
    everything = fs.find(root, withdirs=True, detail=True)
    expected = {p.removeprefix(f"{root}/"): e for p, e in everything.items() if p != root}
    listing = on_s3.listing()
    assert listing == expected
    assert {"notes.txt", "webdataset/mine/deeper", f"{COMMITS}/train-000004.json"} <= set(listing)


def test_a_resume_of_a_complete_out_on_s3_lists_it_once(on_s3, monkeypatch):
    """The claim's listing serves the leftovers and the resume check: 10^4 shards' keys are
    listed once, not twice."""
    listings = []
    listing = OutDir.listing
    monkeypatch.setattr(OutDir, "listing", lambda out: listings.append(out.url) or listing(out))
    result = generate(packed_recipe(), on_s3.url)
    assert result.already_complete and result.rendered == 0
    assert listings == [on_s3.url]
