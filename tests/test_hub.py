"""push: what leaves OUT, what is refused, and the Hub calls made, against a loopback fake Hub."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CONSOLE_SCRIPT
from hub_server import FakeHub  # tests/ is on sys.path: pytest's default rootdir-less import
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import _http as hf_http
from PIL import Image

from synthgen.errors import OutputError
from synthgen.output.hub import bound_hub_timeouts, files_to_upload, push_dataset, token_from_env
from synthgen.output.records import Manifest

REPO = "synthmed/retina-demo"
TOKEN = "hf_fake_write_token"

EXPECTED = [
    "README.md",
    "manifest.json",
    "parquet/train-000000.parquet",
    "previews/preview.png",
    "recipe.yaml",
    "webdataset/train-000000.tar",
]

CARD = """---
license: cc-by-4.0
configs:
- config_name: default
  data_files:
  - split: train
    path: parquet/train-*.parquet
---
# retina-demo

Synthetic retinal fundus photographs.
"""

PRIVACY = "\n## Privacy\n\nNo source image or identifier is published.\n"


def _png(color: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (color, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _parquet(keys: list[str]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"key": keys, "age": [52] * len(keys)}), buffer)
    return buffer.getvalue()


def make_out(
    root: Path,
    *,
    mode: str = "t2i",
    complete: bool | None = True,
    privacy: bool = False,
) -> Path:
    """A small OUT by hand: the published layout plus junk that must never leave it."""
    out = root / "out"
    (out / "webdataset").mkdir(parents=True)
    (out / "parquet").mkdir()
    (out / "previews").mkdir()
    (out / ".synthgen" / "shards").mkdir(parents=True)
    (out / "README.md").write_text(CARD + (PRIVACY if privacy else ""))
    (out / "recipe.yaml").write_text("name: retina-demo\nseed: 1\n")
    if complete is not None:
        counts = {"train": 1}
        manifest = Manifest("retina-demo", mode, "-", {}, None, 1, counts, {}, {}, [], [], complete)
        (out / "manifest.json").write_bytes(manifest.to_json())
    key = "retina-demo-00000000"
    (out / "webdataset" / "train-000000.tar").write_bytes(
        _tar({f"{key}.png": _png(1), f"{key}.json": b'{"age": 52}', f"{key}.txt": b"retina"})
    )
    (out / "parquet" / "train-000000.parquet").write_bytes(_parquet([key]))
    (out / "previews" / "preview.png").write_bytes(_png(2))
    # Junk: bookkeeping, an unfinished shard, a partial write.
    (out / ".synthgen" / "shards" / "x.json").write_text('{"shard": 0}')
    (out / "parquet" / "train-000001.parquet.tmp").write_bytes(_parquet(["half"]))
    (out / "webdataset" / "train-000001.tar.partial").write_bytes(b"half a tar")
    (out / "webdataset" / "train-000001.tar.tmp-0123456789ab").write_bytes(b"OutDir.write_atomic")
    return out


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    """A fake Hub on loopback; huggingface_hub's client gets bounded timeouts while it runs."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)

    server = FakeHub(token=TOKEN).start()
    bound_hub_timeouts(10.0)  # what `synthgen push` does; the library default is no timeout
    try:
        yield server
    finally:
        hf_http.set_client_factory(hf_http.default_client_factory)
        server.stop()


def _push(hub: FakeHub, out: Path, **kwargs) -> str:
    return push_dataset(out, REPO, token=TOKEN, endpoint=hub.url, **kwargs)


def _disk(out: Path, paths: list[str]) -> dict[str, bytes]:
    return {path: (out / path).read_bytes() for path in paths}


def test_files_to_upload_is_the_published_layout_only(tmp_path: Path) -> None:
    out = make_out(tmp_path)
    (out / "notes.txt").write_text("local only")
    (out / "webdataset" / "Train-1.tar").write_bytes(b"not a shard name")
    assert files_to_upload(out) == EXPECTED


# huggingface_hub's LFS PUT passes `data=fileobj`, which httpx2 deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
@pytest.mark.parametrize("transfer", ["inline", "lfs"])
def test_push_sends_exactly_the_published_files(
    tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch, transfer: str
) -> None:
    """`inline`: the hf_xet pipeline with every file regular; `lfs`: binaries via LFS, no hf_xet."""
    if transfer == "lfs":
        hub.lfs = True
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    out = make_out(tmp_path)

    url = _push(hub, out)

    assert url == f"{hub.url}/datasets/{REPO}"
    assert files_to_upload(out) == EXPECTED
    assert hub.received(REPO) == _disk(out, EXPECTED)
    assert [commit.revision for commit in hub.commits] == ["main"]
    assert not hub.repos[REPO].private
    assert hub.unhandled == []
    assert not any(".synthgen" in path or ".tmp" in path for _, path in hub.requests)
    # The token goes to the Hub API only; LFS uploads (pre-signed URLs on the Hub) carry none.
    expected_auth = {f"Bearer {TOKEN}"} | ({None} if transfer == "lfs" else set())
    assert hub.authorizations == expected_auth
    calls = {
        "POST /api/repos/create",
        "POST /api/validate-yaml",
        "POST /api/datasets/{repo_id}/preupload/{revision}",
        "POST /api/datasets/{repo_id}/commit/{revision}",
    }
    if transfer == "lfs":
        binaries = [path for path in EXPECTED if not path.endswith((".md", ".json", ".yaml"))]
        assert sorted(hub.lfs_objects.values()) == sorted(_disk(out, binaries).values())
        calls |= {
            "POST /datasets/{repo_id}.git/info/lfs/objects/batch",
            "PUT /lfs-upload/{oid}",
            "POST /lfs-verify/{oid}",
        }
    assert set(hub.endpoints()) == calls


@pytest.mark.parametrize("complete", [None, False], ids=["no-manifest", "complete-false"])
def test_push_refuses_an_incomplete_out(tmp_path: Path, hub: FakeHub, complete: bool | None):
    out = make_out(tmp_path, complete=complete)
    with pytest.raises(OutputError, match="manifest.json"):
        _push(hub, out)
    with pytest.raises(OutputError):
        files_to_upload(out)
    assert hub.requests == []


def test_push_refuses_an_i2i_card_without_privacy_section(tmp_path: Path, hub: FakeHub) -> None:
    out = make_out(tmp_path, mode="i2i", privacy=False)
    with pytest.raises(OutputError, match="Privacy"):
        _push(hub, out)
    assert hub.requests == []

    (out / "README.md").write_text(CARD + PRIVACY)
    _push(hub, out)
    assert hub.received(REPO)["README.md"] == (out / "README.md").read_bytes()


def test_revision_creates_the_branch_and_a_second_push_sends_nothing(
    tmp_path: Path, hub: FakeHub
) -> None:
    out = make_out(tmp_path)
    _push(hub, out, revision="v1")

    repo = hub.repos[REPO]
    assert ("POST", f"/api/datasets/{REPO}/branch/v1") in hub.requests
    assert repo.branches["main"] == {}
    assert {path: stored.data for path, stored in repo.branches["v1"].items()} == _disk(
        out, EXPECTED
    )
    assert [commit.revision for commit in hub.commits] == ["v1"]

    # Rerun (an interrupted push resumes the same way): repo and branch exist, files unchanged.
    _push(hub, out, revision="v1")
    assert len(hub.commits) == 1
    assert hub.unhandled == []


def test_private_creates_a_private_repo(tmp_path: Path, hub: FakeHub) -> None:
    _push(hub, make_out(tmp_path), private=True)
    assert hub.repos[REPO].private


def test_private_refuses_an_existing_public_repo(tmp_path: Path, hub: FakeHub) -> None:
    out = make_out(tmp_path)
    _push(hub, out)
    (out / "recipe.yaml").write_text("name: retina-demo\nseed: 2\n")
    with pytest.raises(OutputError, match="public"):
        _push(hub, out, private=True)
    assert len(hub.commits) == 1


def test_a_rejected_token_is_one_clear_error_without_the_token(tmp_path: Path, hub: FakeHub):
    secret = "hf_wrong_secret_value"
    with pytest.raises(OutputError, match="write access") as caught:
        push_dataset(make_out(tmp_path), REPO, token=secret, endpoint=hub.url)
    assert secret not in str(caught.value)
    assert hub.commits == []


@pytest.mark.parametrize("repo_id", ["just-a-name", "a/b/c", "bad name/x"])
def test_push_refuses_a_malformed_repo_id(tmp_path: Path, hub: FakeHub, repo_id: str) -> None:
    with pytest.raises(OutputError, match="repo-id"):
        push_dataset(make_out(tmp_path), repo_id, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_token_from_env() -> None:
    assert token_from_env({"HF_TOKEN": " hf_abc \n"}) == "hf_abc"
    for environ in ({}, {"HF_TOKEN": ""}):
        with pytest.raises(OutputError, match="HF_TOKEN"):
            token_from_env(environ)


def test_a_hub_that_stops_answering_fails_the_push_in_time(tmp_path: Path) -> None:
    # A real socket on loopback that accepts and reads but never answers: a stalled network.
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": f"http://127.0.0.1:{listener.getsockname()[1]}"}  # fmt: skip
    started = time.monotonic()
    try:
        result = subprocess.run(
            [str(CONSOLE_SCRIPT), "push", str(make_out(tmp_path)), "--repo-id", REPO,
             "--token-from-env", "--timeout", "1"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
    finally:
        listener.close()
        for connection in held:
            connection.close()
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "did not answer for 1 s while trying to create the repo" in result.stderr
    assert TOKEN not in result.stderr
    assert time.monotonic() - started < 90


def test_every_name_synthgen_writes_is_on_the_allow_list() -> None:
    # The allow-list spells out plan.py's shard names and data.py's wids index name: if either
    # format changes, push must not silently leave those files behind.
    from synthgen.output.hub import ALLOWED_IN_FOLDER
    from synthgen.output.outdir import WIDS_INDEX
    from synthgen.plan import ShardTask

    tasks = [ShardTask("train", 0, 0, 1), ShardTask("validation", 12, 0, 1)]
    tasks += [ShardTask("test", 3, 0, 1, strength) for strength in (0.05, 0.5, 1.0)]
    for task in tasks:
        assert ALLOWED_IN_FOLDER["webdataset"].fullmatch(f"{task.name}.tar"), task.name
        assert ALLOWED_IN_FOLDER["parquet"].fullmatch(f"{task.name}.parquet"), task.name
    folder, name = WIDS_INDEX.format(split="train").split("/")
    assert ALLOWED_IN_FOLDER[folder].fullmatch(name)


def test_audit_images_and_other_previews_are_never_pushed(tmp_path: Path) -> None:
    # pairs.png and memorisation.png show real source images, wherever in OUT they are put.
    out = make_out(tmp_path)
    for folder in ("", "previews/", "webdataset/", "parquet/"):
        for name in ("pairs.png", "memorisation.png"):
            (out / f"{folder}{name}").write_bytes(_png(3))
    (out / "previews" / "my-figure.png").write_bytes(_png(4))
    assert files_to_upload(out) == EXPECTED


def test_every_preview_finalize_draws_is_on_the_allow_list() -> None:
    from synthgen.output.card import SHEET
    from synthgen.output.hub import ALLOWED_IN_FOLDER
    from synthgen.preview.plots import plot_name

    folder, name = SHEET.split("/")
    assert ALLOWED_IN_FOLDER[folder].fullmatch(name)
    for label in ("age", "Sex_2", "_x"):  # label names are identifiers
        assert ALLOWED_IN_FOLDER["previews"].fullmatch(plot_name(label))
