"""The one reader of committed shards: previews, finalize, the audit and the loaders use it.

Parquet is read by row group and column, with no read-ahead, so asking for keys and labels never
pulls image bytes over the network; a shard written as WebDataset only is streamed from its tar.
"""

from __future__ import annotations

import bisect
import json
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, Any

import pyarrow.parquet as pq

from synthgen.output.outdir import PARQUET, OutDir
from synthgen.output.records import ShardEntry
from synthgen.recipe.labels import LabelEncoding


@dataclass(frozen=True)
class StoredSample:
    key: str
    labels: dict[str, Any]  # decoded label values (categoricals as names)
    strength: float | None
    image: bytes | None  # None when images were not asked for


def open_exact(out: OutDir, path: str) -> IO[bytes]:
    """A handle that fetches exactly the byte ranges asked for: pyarrow asks for the column
    chunks it reads, and a read-ahead cache would fetch the image bytes beside the keys."""
    return out.fs.open(out.path(path), "rb", cache_type="none")


class ShardReader:
    """Reads the samples of committed shards, decoding label cells with `encodings`."""

    def __init__(self, out: OutDir, encodings: Mapping[str, LabelEncoding]):
        self.out = out
        self.encodings = dict(encodings)
        self._footers: dict[str, pq.FileMetaData] = {}
        # The audit walks images in order: one row group's images in memory at a time.
        self._group_images = lru_cache(maxsize=2)(self._read_group_images)

    def read(
        self, shard: ShardEntry, positions: Sequence[int] | None = None, *, images: bool = True
    ) -> list[StoredSample]:
        """Samples at `positions` of the shard (all of them if None), in the order asked."""
        parquet = _parquet_path(shard)
        if parquet is not None:
            return self._read_parquet(parquet, positions, images)
        return self._read_tar(shard, positions, images)

    def image_loader(self, shard: ShardEntry, position: int):
        """A zero-argument callable giving the image bytes of one sample, read when called."""
        path = _parquet_path(shard)
        if path is None:
            return lambda: self._read_tar(shard, [position], True)[0].image
        starts = self._row_group_starts(path)
        group = bisect.bisect_right(starts, position) - 1
        return lambda: self._group_images(path, group)[position - starts[group]]

    # --- Parquet ----------------------------------------------------------------------------

    def _footer(self, path: str) -> pq.FileMetaData:
        if path not in self._footers:
            with open_exact(self.out, path) as handle:
                self._footers[path] = pq.ParquetFile(handle).metadata
        return self._footers[path]

    def _row_group_starts(self, path: str) -> list[int]:
        footer = self._footer(path)
        starts = [0]
        for group in range(footer.num_row_groups):
            starts.append(starts[-1] + footer.row_group(group).num_rows)
        return starts

    def _read_parquet(
        self, path: str, positions: Sequence[int] | None, images: bool
    ) -> list[StoredSample]:
        starts = self._row_group_starts(path)
        if positions is None:
            positions = range(starts[-1])
        groups = sorted({bisect.bisect_right(starts, p) - 1 for p in positions})
        columns = ["key", "strength", *self.encodings, *(["image"] if images else [])]
        with open_exact(self.out, path) as handle:
            parquet = pq.ParquetFile(handle, metadata=self._footer(path))
            table = parquet.read_row_groups(groups, columns=columns)
        first_row, offset = {}, 0
        for group in groups:
            first_row[group] = offset
            offset += starts[group + 1] - starts[group]
        cells = table.to_pydict()
        samples = []
        for position in positions:
            group = bisect.bisect_right(starts, position) - 1
            row = first_row[group] + position - starts[group]
            labels = {
                name: encoding.from_stored(cells[name][row])
                for name, encoding in self.encodings.items()
            }
            image = cells["image"][row]["bytes"] if images else None
            samples.append(StoredSample(cells["key"][row], labels, cells["strength"][row], image))
        return samples

    def _read_group_images(self, path: str, group: int) -> list[bytes]:
        with open_exact(self.out, path) as handle:
            parquet = pq.ParquetFile(handle, metadata=self._footer(path))
            column = parquet.read_row_group(group, columns=["image"]).column("image")
        return [cell["bytes"] for cell in column.to_pylist()]

    # --- WebDataset tar ---------------------------------------------------------------------

    def _read_tar(
        self, shard: ShardEntry, positions: Sequence[int] | None, images: bool
    ) -> list[StoredSample]:
        path = next(p for p in sorted(shard.files) if p.endswith(".tar"))
        wanted = None if positions is None else set(positions)
        found = {
            index: sample
            for index, sample in enumerate(self._tar_samples(path, wanted, images))
            if sample is not None
        }
        order = range(len(found)) if positions is None else positions
        return [found[index] for index in order]

    def _tar_samples(
        self, path: str, wanted: set[int] | None, images: bool
    ) -> Iterator[StoredSample | None]:
        """Every sample of the tar in order (None for those not wanted); stops after the last
        wanted one."""
        last = max(wanted) if wanted else None
        members: dict[str, bytes] = {}
        key, index = None, -1
        with (
            self.out.fs.open(self.out.path(path), "rb") as handle,
            tarfile.open(fileobj=handle, mode="r|") as tar,
        ):
            for member in tar:
                name, _, extension = member.name.partition(".")
                if name != key:
                    if key is not None:
                        yield self._tar_sample(key, members, index, wanted)
                    if last is not None and index >= last:
                        return
                    key, index, members = name, index + 1, {}
                keep = wanted is None or index in wanted
                if keep and extension != "txt" and (images or extension == "json"):
                    members[extension] = tar.extractfile(member).read()
            if key is not None:
                yield self._tar_sample(key, members, index, wanted)

    def _tar_sample(
        self, key: str, members: dict[str, bytes], index: int, wanted: set[int] | None
    ) -> StoredSample | None:
        if wanted is not None and index not in wanted:
            return None
        meta = json.loads(members.pop("json"))
        image = next(iter(members.values()), None)
        labels = {name: meta["labels"][name] for name in self.encodings}
        return StoredSample(key, labels, meta.get("strength"), image)


def _parquet_path(shard: ShardEntry) -> str | None:
    return next((p for p in sorted(shard.files) if p.startswith(f"{PARQUET}/")), None)
