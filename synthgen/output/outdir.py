"""The output directory, local or remote (any fsspec URL: s3://, gs://, file://).

Knows every name of the layout, where each record lives and which shards are committed; knows
nothing about images or models. Every write is atomic (a temporary sibling, then a rename), and a
write that fails leaves no temporary behind and is one `OutputError` naming the file.
"""

from __future__ import annotations

import asyncio
import errno
import os
import posixpath
import re
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import fsspec
import yaml
from fsspec.asyn import sync
from tqdm import tqdm

from synthgen.errors import OutputError, RecipeError
from synthgen.output.record_packs import PACK, listed_md5, pack_bytes, unpacked
from synthgen.output.records import Manifest, ModelRecord, RunRecord, ShardRecord, repair
from synthgen.recipe.schema import Recipe, recipe_from_dict

CARD = "README.md"
RECIPE = "recipe.yaml"  # the recipe as run, protected paths redacted
MANIFEST = "manifest.json"
CROISSANT = "croissant.json"  # Croissant metadata (mlcommons.org/croissant), with the Parquet files
WEBDATASET, PARQUET, PREVIEWS = "webdataset", "parquet", "previews"
STATE = ".synthgen"  # bookkeeping: never pushed
COMMITS = f"{STATE}/commits"
RUN_RECORD = f"{STATE}/run.json"  # recipe sha256, the shard list, skipped cohort rows
MODEL_RECORD = f"{STATE}/model.json"
AUDIT_SECTION = f"{STATE}/audit.md"  # the card's audit table, written by `audit --append-to-card`
LOGS = f"{STATE}/logs"
LEASES = f"{STATE}/leases"  # one file per process writing into OUT (synthgen.output.lock)
PACKS = f"{STATE}/packs"  # copies of many commit records in one file (synthgen.output.record_packs)
WIDS_INDEX = WEBDATASET + "/{split}.wids.json"
# A shard's name (plan.py): split, the strength tag of an i2i sweep, at least six digits.
SHARD_NAME = r"[a-z][a-z0-9_]*(-s\d{4})?-\d{6,}"
RECORD_FETCHERS = 16  # commit records read at once
# The one temporary-name rule: NAME.tmp-<12 hex digits>, nothing looser.
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{12}$")
COMMIT_FILE = re.compile(rf"{re.escape(COMMITS)}/({SHARD_NAME})\.json")  # group 1: the shard


def temporary_name(relative: str) -> str:
    return f"{relative}.tmp-{uuid.uuid4().hex[:12]}"


def is_temporary(name: str) -> bool:
    return _TEMPORARY.search(name) is not None


def final_name(name: str) -> str:
    """The name a temporary will be renamed to (the name itself if it is not a temporary)."""
    return _TEMPORARY.sub("", name)


def shard_files(name: str) -> tuple[str, str]:
    """The tar and the Parquet file a shard of this name is written to."""
    return f"{WEBDATASET}/{name}.tar", f"{PARQUET}/{name}.parquet"


def reason(error: OSError) -> str:
    """What went wrong, in the system's words (`No space left on device`), without the path."""
    return error.strerror or str(error) or error.__class__.__name__


class OutDir:
    def __init__(self, url: str):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        protocols = self.fs.protocol
        self.protocols = protocols if isinstance(protocols, tuple) else (protocols,)
        self.is_local = "file" in self.protocols

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

    def holds(self, path: str | Path) -> bool:
        """Whether a local path is inside OUT, symbolic links followed (never for a remote OUT)."""
        return self.is_local and Path(path).resolve().is_relative_to(Path(self.root).resolve())

    def exists(self, relative: str = "") -> bool:
        return self.fs.exists(self.path(relative) if relative else self.root)

    def _dangling(self, relative: str) -> bool:
        """A local symbolic link to nowhere: `exists` says no, yet something is in the way."""
        return self.is_local and os.path.islink(self.path(relative)) and not self.exists(relative)

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def write_atomic(self, relative: str, data: bytes) -> None:
        """Write under a temporary name, then rename, so a reader never sees half a file.

        A write that fails (disk full, file-size limit, read-only, a folder in the way) removes
        its temporary and is one OutputError naming the file: nothing half-written stays.
        """
        temporary = None
        try:
            temporary, handle = self.open_temporary(relative)
            with handle:
                handle.write(data)
            self.rename(temporary, relative)
        except OSError as error:
            if temporary is not None:
                self._discard(temporary)
            raise OutputError(
                f"cannot write {relative} ({reason(error)}); fix that and run the same command "
                "again",
                file=self.url,
            ) from None

    def _discard(self, temporary: str) -> None:
        try:
            self.remove(temporary)
        except OSError:
            pass  # the error that brought us here is the one to report

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
        """Delete one file (never a folder and what is in it); absent is fine."""
        if self.fs.isfile(self.path(relative)):
            self.fs.rm_file(self.path(relative))

    def listdir(self, relative: str) -> list[str]:
        """Names (not paths) of the files directly under `relative`; empty if it is absent.

        Listings are never served from fsspec's cache: other processes (ranks, Ray actors on
        other nodes) write into OUT, and an object store's cached listing would not show it."""
        folder = self.path(relative)
        self.forget_listings(relative)
        if not self.fs.exists(folder):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False))

    def listing(self) -> dict[str, dict[str, Any]]:
        """Everything below the root, folders too, with the store's entry for it (type, size; on
        S3 the ETag), as paths relative to the root, from one listing (no reads). Folders are
        kept so that one where a record belongs is seen, and said to be in the way."""
        prefix = self.root.rstrip("/") + "/"
        self.forget_listings()
        if not self.exists():
            return {}
        found = self._find_everything()
        return {p.removeprefix(prefix): info for p, info in found.items() if p.startswith(prefix)}

    def _find_everything(self) -> dict[str, dict[str, Any]]:
        """`find` of the root, on an object store one listing per top folder, all at once.

        A store lists a prefix a page (1,000 keys) per round trip, one page after another, and
        OUT's keys are mostly in three folders of one key per shard (tars, Parquet, commit
        records): listed side by side, the store serves the three at once."""
        if not getattr(self.fs, "async_impl", False):  # fsspec's mark of an asyncio file system
            return self.fs.find(self.root, withdirs=True, detail=True)
        top = self.fs.ls(self.root, detail=True)
        folders = [entry["name"] for entry in top if entry["type"] == "directory"]

        async def find_folders() -> list[dict[str, dict[str, Any]]]:
            finds = (self.fs._find(folder, withdirs=True, detail=True) for folder in folders)
            return await asyncio.gather(*finds)

        found = {entry["name"]: entry for entry in top}
        for in_folder in sync(self.fs.loop, find_folders):
            found.update(in_folder)
        return found

    def forget_listings(self, relative: str = "") -> None:
        """Drop fsspec's cached listings of a folder (the root by default) and of every folder
        below it: other processes write into OUT. `invalidate_cache(folder)` alone forgets the
        folder and those above it, and a stale listing below would still shape what `find`
        reports (s3fs)."""
        folder = self.path(relative).rstrip("/")
        for cached in [path for path in self.fs.dircache if path.startswith(f"{folder}/")]:
            self.fs.dircache.pop(cached, None)
        self.fs.invalidate_cache(folder)

    def all_files(self) -> list[str]:
        """Every file below the root, as paths relative to it."""
        return sorted(files_in(self.listing()))

    def file_sizes(self) -> dict[str, int]:
        """Every file below the root with its size in bytes, from one listing (no reads)."""
        return files_in(self.listing())

    def recipe(self) -> Recipe:
        """The recipe as run (recipe.yaml)."""
        if not self.exists(RECIPE):
            raise OutputError(
                "no recipe.yaml: this is not a synthgen output directory", file=self.url
            )
        repair_recipe = "rerun `synthgen generate` with the recipe and --overwrite"
        try:
            return recipe_from_dict(yaml.safe_load(self.read_text(RECIPE)), file=RECIPE)
        except (UnicodeDecodeError, yaml.YAMLError):
            raise OutputError(f"recipe.yaml is damaged; {repair_recipe}", file=self.url) from None
        except RecipeError as error:  # valid YAML, yet not the recipe synthgen wrote there
            what = ": ".join(part for part in (error.where, error.message) if part)
            raise OutputError(
                f"recipe.yaml is damaged ({what}); {repair_recipe}", file=self.url
            ) from None

    def manifest(self) -> Manifest:
        """manifest.json, which exists once every shard is committed (finalize writes it)."""
        if not self.exists(MANIFEST):
            raise OutputError(
                "no manifest.json: the run is not finished; run `synthgen generate` again or "
                "`synthgen finalize OUT`",
                file=self.url,
            )
        return self._load(Manifest, MANIFEST, "manifest")

    def run_record(self) -> RunRecord | None:
        """None where no run ever claimed OUT; a link to nowhere in its place is damage."""
        if not self.exists(RUN_RECORD) and not self._dangling(RUN_RECORD):
            return None
        return self._load(RunRecord, RUN_RECORD, "run")

    def model_record(self) -> ModelRecord | None:
        if not self.exists(MODEL_RECORD) and not self._dangling(MODEL_RECORD):
            return None
        return self._load(ModelRecord, MODEL_RECORD, "model")

    def commit_record(self, shard_name: str) -> ShardRecord:
        return self._load(ShardRecord, self.commit_path(shard_name), "commit")

    def _load(self, record: type, relative: str, kind: str):
        try:
            data = self.read_bytes(relative)
        except OSError as error:  # a folder in its place, no permission, a failing disk
            why = reason(error)
            if self._dangling(relative):
                why = "a symbolic link to a place that does not exist"
            raise OutputError(
                f"{relative} cannot be read ({why}); {repair(kind)}",
                file=self.url,
            ) from None
        try:
            return record.from_json(data, relative)
        except OutputError as error:
            raise OutputError(error.message, file=self.url) from None

    def commit_path(self, shard_name: str) -> str:
        return f"{COMMITS}/{shard_name}.json"

    def committed_names(self) -> set[str]:
        """Names of the committed shards, from one listing (no record is read)."""
        return set(self._commit_listing())

    def _commit_listing(self) -> dict[str, dict[str, Any]]:
        """Each committed shard's name and the listing's entry for its record, from one listing
        of the commits folder that bypasses fsspec's cache (see `listdir`)."""
        folder = self.path(COMMITS)
        self.forget_listings(COMMITS)
        if not self.fs.exists(folder):
            return {}
        entries = self.fs.ls(folder, detail=True)
        return _commits_in(
            {f"{COMMITS}/{posixpath.basename(e['name'].rstrip('/'))}": e for e in entries}
        )

    def committed_records(
        self, progress: bool = False, listing: dict[str, dict] | None = None
    ) -> dict[str, ShardRecord]:
        """Every commit record (of `listing`, OUT's `listing()` if the caller has one, else of a
        listing of the commits); a damaged one is an OutputError."""
        commits = _commits_in(listing) if listing is not None else self._commit_listing()
        return self._records(sorted(commits), commits, self.commit_record, progress)

    def readable_commit_records(
        self, names: list[str], listing: dict[str, dict]
    ) -> dict[str, ShardRecord | None]:
        """The commit records of `names` (committed in OUT's `listing()`), None where one cannot
        be read (a resume redoes it)."""
        commits = _commits_in(listing)
        return self._records(names, commits, self._commit_record_or_none, len(names) > 500)

    def _commit_record_or_none(self, shard_name: str) -> ShardRecord | None:
        try:
            return self.commit_record(shard_name)
        except OutputError:
            return None

    def _records(
        self, names: list[str], listing: dict, load: Callable[[str], Any], progress: bool
    ) -> dict:
        """The records of `names`: from packs where the listing vouches for their bytes, the
        rest with `load`, one round trip each."""
        vouched = {name: md5 for name in names if (md5 := listed_md5(listing.get(name, {})))}
        packed = self._packed(vouched) if vouched else {}
        fetched = self._fetch([name for name in names if name not in packed], load, progress)
        return {name: packed[name] if name in packed else fetched[name] for name in names}

    def _packed(self, vouched: dict[str, str]) -> dict[str, ShardRecord]:
        packs = [name for name in self.listdir(PACKS) if PACK.fullmatch(name)]
        records: dict[str, ShardRecord] = {}
        for data in self._fetch(packs, self._pack_bytes, progress=False).values():
            records.update(unpacked(data, vouched, self.commit_path))
        return records

    def _pack_bytes(self, name: str) -> bytes:
        try:
            return self.read_bytes(f"{PACKS}/{name}")
        except OSError:  # gone or unreadable: its records are read one by one
            return b""

    def _fetch(self, names: list[str], load: Callable[[str], Any], progress: bool) -> dict:
        """`load` of every name, in parallel (an object store answers each in a round trip),
        with a progress bar on stderr when `progress` (and something is left to read: the packs
        may have held every record). Names go to the threads in chunks: a task per record cost
        more than reading it from local disk (3 of 3.7 s for 10^4 records)."""
        size = max(1, -(-len(names) // (RECORD_FETCHERS * 8)))
        chunks = [names[start : start + size] for start in range(0, len(names), size)]
        bar = tqdm(total=len(names), desc="reading commit records", unit="shard",
                   file=sys.stderr, leave=False, disable=not (progress and names))  # fmt: skip
        loaded: list[Any] = []
        with ThreadPoolExecutor(RECORD_FETCHERS) as pool, bar:
            for records in pool.map(lambda chunk: [load(name) for name in chunk], chunks):
                loaded.extend(records)
                bar.update(len(records))
        return dict(zip(names, loaded))

    def commit(self, record: ShardRecord) -> None:
        """Write a shard's commit record: the last step, after its files are in place."""
        self.write_atomic(self.commit_path(record.name), record.to_json())

    def write_pack(self, records: list[ShardRecord]) -> None:
        """Write a pack of committed records (a copy: see synthgen.output.record_packs)."""
        self.write_atomic(f"{PACKS}/{uuid.uuid4().hex[:12]}.json", pack_bytes(records))

    def remove_temporaries(
        self,
        is_own: Callable[[str], bool],
        folders: tuple[str, ...] | None = None,
        files: list[str] | None = None,
    ) -> int:
        """Delete what killed writers left behind (in `folders` only, if given): temporaries of
        files synthgen writes (`is_own` of their final name), never a user's `x.tmp-…`. Lease
        files are left to the lease. `files`: OUT's files if the caller has just listed them.
        Returns how many files went."""
        leftovers = [
            p for p in (self.all_files() if files is None else files)
            if is_temporary(p) and is_own(final_name(p)) and not p.startswith(f"{LEASES}/")
            and (folders is None or p.startswith(folders))
        ]  # fmt: skip
        for relative in leftovers:
            self.remove(relative)
        return len(leftovers)


def files_in(listing: dict[str, dict]) -> dict[str, int]:
    """The files (all but folders, as `find` has it) of an OUT `listing()`, with their sizes."""
    return {path: info["size"] for path, info in listing.items() if info["type"] != "directory"}


def _commits_in(listing: dict[str, dict]) -> dict[str, dict]:
    """The committed shards' names and listing entries among OUT's files."""
    return {
        m.group(1): info for path, info in listing.items() if (m := COMMIT_FILE.fullmatch(path))
    }


def writable_out(url: str, create: bool = True) -> OutDir:
    """OUT for a command that writes into it, refused with one line where the data would not land
    where it was asked to: an empty path (the current folder), memory:// (gone when synthgen
    exits), an unknown protocol, or a place that cannot hold the folder. `create`: make the
    folder if it is missing (else that is refused too)."""
    if not url.strip():
        raise OutputError("is empty; give the output folder or URL", where="--out")
    try:
        out = OutDir(url)
    except ValueError as error:  # fsspec: "Protocol not known: xyz"
        raise OutputError(
            f"{error}; use a folder or an fsspec URL (s3://, gs://, file://)", file=url
        ) from None
    except ImportError as error:  # a known protocol whose package is missing: it says which
        raise OutputError(str(error), file=url) from None
    if "memory" in out.protocols:
        raise OutputError(
            "memory:// lasts only as long as this process: the dataset would be gone when "
            "synthgen exits; write to a folder or a lasting URL",
            file=url,
        )
    if out.is_local:
        _make_local_folder(Path(out.root), url, create)
    else:
        _reach_store(out)
    return out


def _make_local_folder(folder: Path, url: str, create: bool) -> None:
    if folder.is_symlink() and not folder.exists():
        raise OutputError(
            "is a symbolic link to a place that does not exist; create its target or remove the "
            "link",
            file=url,
        )
    if folder.exists() and not folder.is_dir():
        raise OutputError("is a file, not a folder; choose a folder", file=url)
    if not create and not folder.is_dir():
        raise OutputError("does not exist", file=url)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        cause = reason(error)
        if error.errno in (errno.ENOTDIR, errno.EEXIST):
            cause = "a folder above it is a file"
        raise OutputError(f"cannot create it ({cause}); choose another place", file=url) from None
    if not os.access(folder, os.W_OK):  # also false for root on a read-only file system
        raise OutputError(
            "cannot be written to (a read-only file system, or no permission); choose another "
            "place",
            file=url,
        )


def _reach_store(out: OutDir) -> None:
    # `info`, not `exists`: s3fs's exists answers False for a bucket it cannot reach at all
    try:
        out.fs.info(out.root)
    except FileNotFoundError:
        pass  # a new folder
    except Exception as error:  # noqa: BLE001 - any backend's failure to reach its store
        # (no credentials, no network, a refused address) is the user's to fix, not a traceback
        first = str(error).splitlines()[0] if str(error) else ""
        raise OutputError(
            f"cannot reach it ({error.__class__.__name__}: {first}); check the credentials "
            "and the address",
            file=out.url,
        ) from None
