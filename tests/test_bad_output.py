"""Bad output locations and damaged records that tests/test_generate.py does not already cover:
each is exit code 2 and one line naming OUT (or the record) and the repair, no traceback, no
temporary left behind, and a complete OUT is not made incomplete by a command that refuses.

Every command is a real `python -m synthgen` process on real files; the S3 cases reach for a
store on a loopback port where nothing listens, so they cannot hang on a network.
"""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from hooked_runs import hooked_env, one_error_line

from synthgen.errors import OutputError

RUN_JSON = ".synthgen/run.json"
COMMIT = ".synthgen/commits/train-000000.json"
MODEL_JSON = ".synthgen/model.json"
NOWHERE = "http://127.0.0.1:9"  # the discard port: refused at once


@pytest.fixture
def recipe(generated) -> str:
    return str(generated.parent / "unit.yaml")


def refused(*args: str, **kwargs) -> str:
    """Run synthgen; it must exit 2 with one `error:` line (no traceback), which is returned."""
    result = run_cli(*args, check=False, env=kwargs.pop("env", hooked_env()), timeout=120, **kwargs)
    assert result.returncode == 2, result.stderr[-3000:]
    return one_error_line(result.stderr)


def temporaries(folder: Path) -> list[Path]:
    return list(folder.rglob("*.tmp-*"))


def edit_json(path: Path, **fields) -> None:
    record = json.loads(path.read_text())
    record.update(fields)
    path.write_text(json.dumps(record))


def read_commands(out: Path, recipe: str, tmp_path: Path) -> dict[str, tuple[str, ...]]:
    """The commands that read OUT's records before they write anything."""
    return {
        "generate": ("generate", recipe, "-o", str(out), "--devices", "cpu"),
        "finalize": ("finalize", str(out)),
        "info": ("info", str(out)),
        "preview": ("preview", str(out), "-o", str(tmp_path / "sheet.png")),
    }


# --- S3 without credentials, or with no store there -----------------------------------------------


def no_credentials() -> dict[str, str]:
    """No credentials anywhere botocore looks: every AWS_* variable empty, no config files."""
    env = {k: v for k, v in hooked_env().items() if not k.startswith("AWS_")}
    names = ("ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "SESSION_TOKEN", "PROFILE", "DEFAULT_REGION",
             "EC2_METADATA_DISABLED")  # fmt: skip
    env.update({f"AWS_{name}": "" for name in names})
    env.update(AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
               AWS_ENDPOINT_URL=NOWHERE)  # fmt: skip
    return env


@pytest.mark.parametrize(
    "url,credentials",
    [("s3://bucket/x", False), ("s3://bucket", False), ("s3://bucket", True)],
    ids=["key-no-credentials", "bucket-no-credentials", "bucket-no-store"],
)
def test_s3_that_cannot_be_reached_is_one_line(recipe, url, credentials):
    """A bucket alone used to pass the check (s3fs's `exists` says False for a bucket it cannot
    reach) and fail later with a botocore traceback, after half a minute of retries."""
    pytest.importorskip("s3fs")
    env = no_credentials()
    if credentials:  # credentials, but nothing listens at the endpoint
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    line = refused("generate", recipe, "-o", url, "--devices", "cpu", env=env)
    assert line.startswith(f"error: {url}: cannot reach it (")
    assert line.endswith("check the credentials and the address")
    assert not (ROOT / "s3:").exists()  # nothing written locally instead (run_cli's cwd)


# --- a damaged run record -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage,message",
    [
        ("shard-text", "field 'tasks.shard' has the wrong type"),
        ("sha-number", "field 'recipe_sha256' has the wrong type"),
        ("dangling-link", "cannot be read (a symbolic link to a place that does not exist)"),
    ],
)
def test_a_damaged_run_record_is_one_line_and_overwrite_repairs_it(
    fresh_copy, recipe, tmp_path, damage, message
):
    """Wrong types used to pass the reader and fail far away (`'>' not supported`, `Unknown
    format code 'd'`); a link to nowhere in its place made OUT look like a stranger's folder."""
    out, run_json = fresh_copy, fresh_copy / RUN_JSON
    task = json.loads(run_json.read_text())["tasks"][0]
    if damage == "shard-text":
        edit_json(run_json, tasks=[{**task, "shard": "zero"}])
    elif damage == "sha-number":
        edit_json(run_json, recipe_sha256=5)
    else:
        run_json.unlink()
        run_json.symlink_to(tmp_path / "elsewhere" / "run.json")
    for command in read_commands(out, recipe, tmp_path).values():
        line = refused(*command)
        assert line.startswith(f"error: {out}: .synthgen/run.json ")
        assert message in line and line.endswith("rerun with --overwrite to start OUT again")
    assert not temporaries(out) and not (tmp_path / "sheet.png").exists()
    assert (out / "manifest.json").exists()  # still complete: a refusal removes nothing

    run_cli("generate", recipe, "-o", str(out), "--devices", "cpu", "--overwrite")
    assert run_json.is_file() and not run_json.is_symlink()
    assert not (tmp_path / "elsewhere").exists()  # the link was replaced, never followed


# --- a damaged commit record, model record or recipe.yaml ----------------------------------------


@pytest.mark.parametrize(
    "damage,message",
    [
        ("strength-text", "field 'strength' has the wrong type"),
        ("directory", "cannot be read (Is a directory)"),
    ],
)
def test_a_damaged_commit_record_is_one_line(fresh_copy, recipe, tmp_path, damage, message):
    out, commit = fresh_copy, fresh_copy / COMMIT
    if damage == "strength-text":
        edit_json(commit, strength="half")
    else:
        commit.unlink()
        commit.mkdir()
    commands = read_commands(out, recipe, tmp_path)
    for name in ("finalize", "info", "preview"):
        line = refused(*commands[name])
        assert line.startswith(f"error: {out}: {COMMIT} ") and message in line
        assert line.endswith("rerun `synthgen generate` (the shard is rendered again)")
    assert not temporaries(out) and (out / "manifest.json").exists()
    if damage != "directory":  # what the line says mends it
        run_cli(*commands["generate"])
        run_cli("finalize", str(out))


def test_a_damaged_model_record_leaves_a_complete_out_complete(fresh_copy):
    """finalize read the model record only after removing manifest.json: a damaged one turned a
    complete OUT incomplete, and then failed with an AttributeError."""
    out, model = fresh_copy, fresh_copy / MODEL_JSON
    manifest = (out / "manifest.json").read_bytes()
    model.write_text("[]")
    line = refused("finalize", str(out))
    assert line.startswith(
        f"error: {out}: .synthgen/model.json is damaged (it is not a JSON object)"
    )
    assert "remove it and run `synthgen finalize OUT`" in line
    assert (out / "manifest.json").read_bytes() == manifest and not temporaries(out)
    model.unlink()  # what the line says mends it
    run_cli("finalize", str(out))


def test_a_recipe_yaml_that_is_no_recipe_names_out(fresh_copy, tmp_path):
    """It used to say only `recipe.yaml: name: …`, not which OUT, nor how to repair it."""
    (fresh_copy / "recipe.yaml").write_text("name: [not, a, name]\n")
    for command in (("info", str(fresh_copy)), ("finalize", str(fresh_copy)),
                    ("preview", str(fresh_copy), "-o", str(tmp_path / "sheet.png"))):  # fmt: skip
        line = refused(*command)
        assert line.startswith(f"error: {fresh_copy}: recipe.yaml is damaged (")
        assert line.endswith("rerun `synthgen generate` with the recipe and --overwrite")


# --- a damaged manifest: push --dry-run and the loaders ------------------------------------------


MANIFEST_DAMAGE = {
    "truncated": "is damaged (not JSON)",
    "shards-text": "field 'shards' has the wrong type",
    "digest-number": "field 'shards.files' has the wrong type",  # wids used to raise a TypeError
}


def damage_manifest(out: Path, damage: str) -> None:
    path = out / "manifest.json"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
        return
    manifest = json.loads(path.read_text())
    if damage == "shards-text":
        manifest["shards"] = "train-000000"
    else:
        for shard in manifest["shards"]:
            shard["files"] = {name: 5 for name in shard["files"]}
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE)
def test_a_damaged_manifest_is_one_clear_error_for_push_and_every_loader(fresh_copy, damage):
    from synthgen.data import parquet_dataset, webdataset_loader, wids_dataset

    damage_manifest(fresh_copy, damage)
    line = refused("push", str(fresh_copy), "--repo-id", "a/b", "--dry-run")
    assert MANIFEST_DAMAGE[damage] in line and "run `synthgen finalize OUT`" in line
    for loader in (webdataset_loader, wids_dataset, parquet_dataset):
        with pytest.raises(OutputError, match="run `synthgen finalize OUT`") as caught:
            loader(str(fresh_copy), "train")
        assert str(caught.value).startswith(f"{fresh_copy}: manifest.json ")
        assert MANIFEST_DAMAGE[damage] in str(caught.value)


# --- the contact sheet `preview -o` writes ---------------------------------------------------------


def test_a_preview_that_cannot_be_written_is_one_line_and_leaves_nothing(generated, tmp_path):
    """`-o` under a regular file used to be a FileExistsError traceback; a write cut short
    (RLIMIT_FSIZE, as a full disk would) left half a PNG under the name asked for."""
    (tmp_path / "a-file").write_text("x")
    sheet = tmp_path / "a-file" / "sheet.png"
    line = refused("preview", str(generated), "-o", str(sheet))
    assert (
        line
        == f"error: {sheet}: cannot be written (a folder above it is a file); choose another place"
    )

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    sheet = tmp_path / "sheets" / "sheet.png"
    line = refused("preview", str(generated), "-o", str(sheet), preexec_fn=limited)
    assert line == f"error: {sheet}: cannot be written (File too large); choose another place"
    assert list((tmp_path / "sheets").iterdir()) == []  # neither half a PNG nor a temporary
    shutil.rmtree(tmp_path / "sheets")
    run_cli("preview", str(generated), "-o", str(sheet))
    assert sheet.read_bytes()[:4] == b"\x89PNG"
