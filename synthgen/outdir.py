"""The output directory, local or remote (any fsspec URL: s3://, gs://, file://).

Knows where each file of the layout lives and which shards are committed; knows nothing about
images or models.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import IO

import fsspec

from synthgen.errors import OutputError

COMMITS = ".synthgen/commits"
RUN_RECORD = ".synthgen/run.json"  # recipe sha256, the shard list, skipped cohort rows


class OutDir:
    def __init__(self, url: str):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

    def commit_path(self, shard_name: str) -> str:
        return f"{COMMITS}/{shard_name}.json"

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
        temporary = f"{relative}.tmp-{uuid.uuid4().hex[:12]}"
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
        """Names (not paths) of the files directly under `relative`; empty if it is absent."""
        folder = self.path(relative)
        if not self.fs.exists(folder):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False))

    def all_files(self) -> list[str]:
        """Every file below the root, as paths relative to it."""
        if not self.exists():
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p.removeprefix(prefix) for p in self.fs.find(self.root))

    def file_sizes(self) -> dict[str, int]:
        """Every file below the root with its size in bytes, from one listing (no reads)."""
        if not self.exists():
            return {}
        prefix = self.root.rstrip("/") + "/"
        listing = self.fs.find(self.root, detail=True)
        return {path.removeprefix(prefix): info["size"] for path, info in listing.items()}

    def manifest(self) -> dict:
        """manifest.json, which exists once every shard is committed (finalize writes it)."""
        if not self.exists("manifest.json"):
            raise OutputError(
                "no manifest.json: the run is not finished; run `synthgen generate` again or "
                "`synthgen finalize OUT`",
                file=self.url,
            )
        try:
            return json.loads(self.read_text("manifest.json"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise OutputError(f"manifest.json is unreadable ({err})", file=self.url) from None

    def run_record(self) -> dict | None:
        return json.loads(self.read_text(RUN_RECORD)) if self.exists(RUN_RECORD) else None

    def committed_names(self) -> set[str]:
        """Names of the committed shards, from one listing (no record is read)."""
        return {
            name.removesuffix(".json") for name in self.listdir(COMMITS) if name.endswith(".json")
        }

    def committed_records(self) -> dict[str, dict]:
        return {
            name: json.loads(self.read_text(self.commit_path(name)))
            for name in sorted(self.committed_names())
        }

    def remove_temporaries(self, folders: tuple[str, ...] | None = None) -> int:
        """Delete what killed workers left behind (in `folders` only, if given); returns how
        many files went."""
        leftovers = [
            p for p in self.all_files()
            if ".tmp-" in posixpath.basename(p) and (folders is None or p.startswith(folders))
        ]  # fmt: skip
        for relative in leftovers:
            self.remove(relative)
        return len(leftovers)
