"""Push a finished output directory to a Hugging Face dataset repo.

Only the published layout leaves the machine (card, recipe, manifest, shards, previews), chosen by
an allow-list: bookkeeping, temporary files and anything else in OUT stay local.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, set_client_factory
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import _http as hf_http
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from synthgen.errors import OutputError
from synthgen.output.outdir import MANIFEST, SHARD_NAME, OutDir
from synthgen.output.records import Manifest

# Files at the top of OUT that every push sends; they must exist.
REQUIRED_FILES = ("README.md", "recipe.yaml", "manifest.json")

# Everything else that may be sent: `folder/name` must match the folder's pattern. Split names are
# `[a-z][a-z0-9_]*` (recipe.py) and shard numbers at least six digits, so `x.parquet.tmp`,
# `x.partial` or a stray `notes.txt` never match. Previews are the contact sheet and the label
# plots finalize draws (label names are identifiers), nothing else a user or an audit put there.
ALLOWED_IN_FOLDER = {
    "webdataset": re.compile(rf"({SHARD_NAME}\.tar|[a-z][a-z0-9_]*\.wids\.json)"),
    "parquet": re.compile(rf"{SHARD_NAME}\.parquet"),
    "previews": re.compile(r"preview\.png|labels-[A-Za-z_][A-Za-z0-9_]*\.png"),
}

# Passed to upload_folder as well, so that even a mistake in the allow-list cannot send these:
# bookkeeping, partial files, and the audit's contact sheets, which show real source images.
AUDIT_IMAGES = ("pairs.png", "memorisation.png")
NEVER_UPLOADED = (
    ".synthgen/*", "*.tmp*", "*.partial", "*/.synthgen/*",
    *AUDIT_IMAGES, *(f"*/{name}" for name in AUDIT_IMAGES),
)  # fmt: skip

# Seconds any one connect, read or write may stall: huggingface_hub's client waits forever by
# default, so a dead network would hang a push with no word. A slow upload is not a stall.
HUB_TIMEOUT_S = 60.0

# An i2i card must carry this section: it says how the source cohort was protected.
_PRIVACY_HEADING = re.compile(r"^##[ \t]+Privacy\b", re.MULTILINE)


def token_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The Hub token from HF_TOKEN (`push --token-from-env`); refuses when it is unset or empty."""
    token = (os.environ if environ is None else environ).get("HF_TOKEN", "").strip()
    if not token:
        raise OutputError(
            "HF_TOKEN is not set; export a Hub token with write access or drop --token-from-env",
            where="HF_TOKEN",
        )
    return token


def read_manifest(out: Path) -> Manifest:
    """OUT/manifest.json if the run completed; an incomplete OUT is refused."""
    path = out / MANIFEST
    manifest = OutDir(str(out)).manifest()
    if not manifest.complete:
        raise OutputError(
            "the run is incomplete (complete is not true); finish it with `synthgen generate` "
            "or `synthgen finalize` before pushing",
            file=str(path),
            where="complete",
        )
    if manifest.mode not in ("t2i", "i2i"):
        raise OutputError(
            f"mode is {manifest.mode!r}, expected 't2i' or 'i2i'",
            file=str(path),
            where="mode",
        )
    return manifest


def check_pushable(out: Path) -> None:
    """Refuse an OUT that must not be published: incomplete, or i2i without a privacy section."""
    if not out.is_dir():
        raise OutputError("not a directory", file=str(out))
    manifest = read_manifest(out)
    for name in REQUIRED_FILES:
        if not (out / name).is_file():
            raise OutputError(f"{name} is missing; run `synthgen finalize`", file=str(out / name))
    if manifest.mode == "i2i":
        card = (out / "README.md").read_text(encoding="utf-8")
        if not _PRIVACY_HEADING.search(card):
            raise OutputError(
                "an i2i dataset card needs a '## Privacy' section before it can be published; "
                "rerun `synthgen finalize`",
                file=str(out / "README.md"),
            )


def files_to_upload(out: Path) -> list[str]:
    """The exact paths, relative to OUT and sorted, that `push_dataset` sends.

    Refuses (OutputError) an OUT that cannot be pushed, so a dry run fails the same way.
    """
    out = Path(out)
    check_pushable(out)
    files = [name for name in REQUIRED_FILES if (out / name).is_file()]
    for folder, pattern in ALLOWED_IN_FOLDER.items():
        if (out / folder).is_dir():
            files += [
                f"{folder}/{path.name}"
                for path in (out / folder).iterdir()
                if path.is_file() and pattern.fullmatch(path.name)
            ]
    # The same filter upload_folder applies, so the two lists cannot disagree.
    files = list(filter_repo_objects(files, ignore_patterns=list(NEVER_UPLOADED)))
    if not any(name.startswith(("webdataset/", "parquet/")) for name in files):
        raise OutputError("no shard files in webdataset/ or parquet/", file=str(out))
    return sorted(files)


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise OutputError(str(err).splitlines()[0], where="--repo-id") from err
    if repo_id.count("/") != 1:
        raise OutputError(f"'{repo_id}' is not ORG/NAME", where="--repo-id")


def _hub_refused(err: HfHubHTTPError, repo_id: str, step: str) -> OutputError:
    status = err.response.status_code if err.response is not None else None
    hint = ""
    if status in (401, 403):
        hint = "; check that the token has write access to this namespace"
    elif status == 404:
        hint = "; check the repo id and that the token can see it"
    reason = str(err).splitlines()[0]
    return OutputError(f"the Hub refused to {step} ({reason}){hint}", where=repo_id)


def bound_hub_timeouts(seconds: float = HUB_TIMEOUT_S) -> None:
    """Give huggingface_hub's process-wide HTTP client a stall timeout.

    The client is shared by everything in the process that talks to the Hub, so this belongs to
    whoever owns the process (the `synthgen push` command), not to `push_dataset`.
    """

    def factory() -> httpx2.Client:
        client = hf_http.default_client_factory()  # keeps the library's request hooks
        client.timeout = httpx2.Timeout(seconds)
        return client

    set_client_factory(factory)


def push_dataset(
    out: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Create the dataset repo if needed and upload OUT's publishable files; returns the repo URL.

    `endpoint` defaults to huggingface_hub's (HF_ENDPOINT); `token` to its usual lookup (HF_TOKEN,
    then the saved login). Everything is checked before the first request.
    """
    out = Path(out)
    _check_repo_id(repo_id)
    files = files_to_upload(out)
    api = HfApi(endpoint=endpoint, token=token)
    step = "create the repo"
    try:
        repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if private:
            # create_repo(exist_ok=True) leaves an existing repo's visibility as it is: never
            # publish into a public repo when the user asked for a private one.
            step = "read the repo"
            if not api.dataset_info(repo_id).private:
                raise OutputError(
                    "the repo already exists and is public; make it private on the Hub first "
                    "or push without --private",
                    where=repo_id,
                )
        if revision is not None:
            step = f"create branch '{revision}'"
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        step = "upload the files"
        api.upload_folder(
            repo_id=repo_id,
            folder_path=out,
            repo_type="dataset",
            revision=revision,
            # Exact, escaped paths: what is sent is files_to_upload(out), nothing else.
            allow_patterns=[glob.escape(name) for name in files],
            # A fresh list each call: upload_folder appends its defaults to the list it is given.
            ignore_patterns=list(NEVER_UPLOADED),
            commit_message=f"Upload {len(files)} files with synthgen",
        )
    except HfHubHTTPError as err:
        raise _hub_refused(err, repo_id, step) from err
    except httpx2.TimeoutException as err:
        waited = hf_http.get_session().timeout.read
        raise OutputError(
            f"the Hub did not answer for {waited:g} s while trying to {step}; check the network "
            "(or HF_ENDPOINT) and push again: files already on the Hub are not sent twice",
            where=repo_id,
        ) from err
    return str(repo_url)
