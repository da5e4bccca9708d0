"""The output directory, local or remote (any fsspec URL: s3://, gs://, file://).

Knows every name of the layout, where each record lives and which shards are committed; knows
nothing about images or models. Every write is atomic (a temporary sibling, then a rename).
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from typing import IO

import fsspec
import yaml

from synthgen.errors import OutputError
from synthgen.output.records import Manifest, ModelRecord, RunRecord, ShardRecord
from synthgen.recipe.schema import Recipe, recipe_from_dict

CARD = "README.md"
RECIPE = "recipe.yaml"  # the recipe as run, protected paths redacted
MANIFEST = "manifest.json"
WEBDATASET, PARQUET, PREVIEWS = "webdataset", "parquet", "previews"
STATE = ".synthgen"  # bookkeeping: never pushed
COMMITS = f"{STATE}/commits"
RUN_RECORD = f"{STATE}/run.json"  # recipe sha256, the shard list, skipped cohort rows
MODEL_RECORD = f"{STATE}/model.json"
AUDIT_SECTION = f"{STATE}/audit.md"  # the card's audit table, written by `audit --append-to-card`
LOGS = f"{STATE}/logs"
WIDS_INDEX = WEBDATASET + "/{split}.wids.json"
# Top-level names synthgen writes; anything else in OUT is the user's.
OWN_PATHS = (CARD, RECIPE, MANIFEST, WEBDATASET, PARQUET, PREVIEWS, STATE)
# The one temporary-name rule: NAME.tmp-<12 hex digits>, nothing looser.
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{12}$")


def temporary_name(relative: str) -> str:
    return f"{relative}.tmp-{uuid.uuid4().hex[:12]}"


def is_temporary(name: str) -> bool:
    return _TEMPORARY.search(name) is not None


def final_name(name: str) -> str:
    """The name a temporary will be renamed to (the name itself if it is not a temporary)."""
    return _TEMPORARY.sub("", name)


class OutDir:
    def __init__(self, url: str):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

    def exists(self, relative: str = "") -> bool:
        return self.fs.exists(self.path(relative) if relative else self.root)

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def write_atomic(self, relative: str, data: bytes) -> None:
        """Write under a temporary name, then rename, so a reader never sees half a file."""
        temporary, handle = self.open_temporary(relative)
        with handle:
            handle.write(data)
        self.rename(temporary, relative)

    def open_temporary(self, relative: str) -> tuple[str, IO[bytes]]:
        """Open a new temporary sibling of `relative` for writing, bit by bit; returns its
        relative path and the open handle. `rename` it into place once complete: until then no
        reader takes it for the real file, and `remove_temporaries` deletes it if the writer dies.
        """
        temporary = temporary_name(relative)
        target = self.path(temporary)
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        return temporary, self.fs.open(target, "wb")

    def rename(self, source: str, target: str) -> None:
        if self.is_local:  # atomic, and an error (not a move into it) when a folder is in the way
            os.replace(self.path(source), self.path(target))
        else:
            self.fs.mv(self.path(source), self.path(target))

    def remove(self, relative: str) -> None:
        if self.fs.exists(self.path(relative)):
            self.fs.rm(self.path(relative), recursive=True)

    def listdir(self, relative: str) -> list[str]:
        """Names (not paths) of the files directly under `relative`; empty if it is absent.

        Listings are never served from fsspec's cache: other processes (ranks, Ray actors on
        other nodes) write into OUT, and an object store's cached listing would not show it."""
        folder = self.path(relative)
        self.fs.invalidate_cache(folder)
        if not self.fs.exists(folder):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False))

    def all_files(self) -> list[str]:
        """Every file below the root, as paths relative to it."""
        self.fs.invalidate_cache(self.root)
        if not self.exists():
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p.removeprefix(prefix) for p in self.fs.find(self.root))

    def file_sizes(self) -> dict[str, int]:
        """Every file below the root with its size in bytes, from one listing (no reads)."""
        self.fs.invalidate_cache(self.root)
        if not self.exists():
            return {}
        prefix = self.root.rstrip("/") + "/"
        listing = self.fs.find(self.root, detail=True)
        return {path.removeprefix(prefix): info["size"] for path, info in listing.items()}

    def recipe(self) -> Recipe:
        """The recipe as run (recipe.yaml)."""
        if not self.exists(RECIPE):
            raise OutputError(
                "no recipe.yaml: this is not a synthgen output directory", file=self.url
            )
        try:
            data = yaml.safe_load(self.read_text(RECIPE))
        except (UnicodeDecodeError, yaml.YAMLError):
            raise OutputError(
                "recipe.yaml is damaged; rerun `synthgen generate` with the recipe and --overwrite",
                file=self.url,
            ) from None
        return recipe_from_dict(data, file=RECIPE)

    def manifest(self) -> Manifest:
        """manifest.json, which exists once every shard is committed (finalize writes it)."""
        if not self.exists(MANIFEST):
            raise OutputError(
                "no manifest.json: the run is not finished; run `synthgen generate` again or "
                "`synthgen finalize OUT`",
                file=self.url,
            )
        return self._load(Manifest, MANIFEST)

    def run_record(self) -> RunRecord | None:
        return self._load(RunRecord, RUN_RECORD) if self.exists(RUN_RECORD) else None

    def model_record(self) -> ModelRecord | None:
        return self._load(ModelRecord, MODEL_RECORD) if self.exists(MODEL_RECORD) else None

    def _load(self, record: type, relative: str):
        try:
            return record.from_json(self.read_bytes(relative), relative)
        except OutputError as error:
            raise OutputError(error.message, file=self.url) from None

    def commit_path(self, shard_name: str) -> str:
        return f"{COMMITS}/{shard_name}.json"

    def committed_names(self) -> set[str]:
        """Names of the committed shards, from one listing (no record is read)."""
        return {
            name.removesuffix(".json")
            for name in self.listdir(COMMITS)
            if name.endswith(".json") and not is_temporary(name)
        }

    def committed_records(self) -> dict[str, ShardRecord]:
        return {
            name: self._load(ShardRecord, self.commit_path(name))
            for name in sorted(self.committed_names())
        }

    def commit(self, record: ShardRecord) -> None:
        """Write a shard's commit record: the last step, after its files are in place."""
        self.write_atomic(self.commit_path(record.name), record.to_json())

    def remove_temporaries(self, folders: tuple[str, ...] | None = None) -> int:
        """Delete what killed workers left behind (in `folders` only, if given); returns how
        many files went."""
        leftovers = [
            p for p in self.all_files()
            if is_temporary(p) and (folders is None or p.startswith(folders))
        ]  # fmt: skip
        for relative in leftovers:
            self.remove(relative)
        return len(leftovers)
