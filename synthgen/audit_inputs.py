"""Audit inputs from files: the synthetic images of an OUT, its linkage table, the real cohort.

Images are loaded lazily (a Parquet row group at a time for OUT, a file at a time for the cohort)
so a 10^5 cohort streams through the audit engine without being held in memory.
"""

from __future__ import annotations

import csv
import io
from functools import lru_cache
from pathlib import Path
from typing import IO

import pyarrow.parquet as pq
from PIL import Image

from synthgen.audit_items import SourceItem, SyntheticItem
from synthgen.embedders import AuditError
from synthgen.outdir import OutDir
from synthgen.recipe import PreprocessConfig, SourceConfig, load_recipe


def read_linkage(path: str) -> dict[str, str]:
    """key -> source id, from the table `synthgen generate` wrote beside OUT."""
    file = Path(path)
    if not file.is_file():
        raise AuditError("linkage table not found", where="--linkage")
    with open(file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"key", "source_id"} <= set(rows[0]):
        raise AuditError("needs the columns key and source_id", where="--linkage")
    return {row["key"]: row["source_id"] for row in rows}


def synthetic_items(out: OutDir, linkage: dict[str, str] | None) -> list[SyntheticItem]:
    """Every committed sample of OUT (from its Parquet shards), linked to its source for i2i."""
    manifest = out.manifest()
    paths = [p for shard in manifest["shards"] for p in shard["files"] if p.endswith(".parquet")]
    if not paths:
        raise AuditError("has no Parquet shards to audit", file=out.url)
    i2i = manifest["mode"] == "i2i"
    if i2i and linkage is None:
        raise AuditError("an i2i dataset needs --linkage")

    footers: dict[str, pq.FileMetaData] = {}

    @lru_cache(maxsize=2)  # the engine walks the items in order: one row group in memory at a time
    def group_images(path: str, group: int) -> list[bytes]:
        with _open_exact(out, path) as handle:
            parquet = pq.ParquetFile(handle, metadata=footers[path])  # no second footer read
            column = parquet.read_row_group(group, columns=["image"]).column("image")
        return [cell["bytes"] for cell in column.to_pylist()]

    items = []
    for path in paths:
        with _open_exact(out, path) as handle:
            parquet = pq.ParquetFile(handle)
            table = parquet.read(columns=["key", "strength"])  # not the image bytes: they stream
            footers[path] = parquet.metadata
        places = [
            (group, row)
            for group in range(parquet.metadata.num_row_groups)
            for row in range(parquet.metadata.row_group(group).num_rows)
        ]
        keys, strengths = table.column("key").to_pylist(), table.column("strength").to_pylist()
        for (group, row), key, strength in zip(places, keys, strengths, strict=True):
            source = None
            if i2i:
                if key not in linkage:
                    raise AuditError(f"key {key} is not in the linkage table", where="--linkage")
                source = linkage[key]
            load = lambda p=path, g=group, r=row: Image.open(io.BytesIO(group_images(p, g)[r]))  # noqa: E731
            items.append(SyntheticItem(key, load, source, strength))
    return items


def _open_exact(out: OutDir, path: str) -> IO[bytes]:
    # pyarrow asks for the byte ranges of the columns it reads; a read-ahead cache would fetch the
    # image bytes beside the keys too, and every image would cross the network twice.
    return out.fs.open(out.path(path), "rb", cache_type="none")


def _load_source(path: Path):
    from synthgen.imaging import read_image, to_model_rgb

    return lambda: to_model_rgb(read_image(path))


def source_items(
    source: str, *, image_column: str, id_column: str, patient_column: str | None
) -> list[SourceItem]:
    """The real cohort, from an i2i recipe's `source` or from a manifest table and its columns."""
    from synthgen.cohort import load_cohort

    if source.endswith((".yaml", ".yml")):
        recipe = load_recipe(source)
        if recipe.source is None:
            raise AuditError("the recipe has no source cohort", where="--source")
        config, labels = recipe.source, recipe.labels
    else:
        config = SourceConfig(
            manifest=str(Path(source).resolve()), image_column=image_column, id_column=id_column,
            patient_column=patient_column, preprocess=PreprocessConfig(), on_error="fail",
        )  # fmt: skip
        labels = {}
    cohort = load_cohort(config, labels, check_images=False, progress=False)
    return [
        SourceItem(row.source_id, row.patient_id, _load_source(row.image_path), row.labels)
        for row in cohort.rows
    ]


def audit_summary(report: dict) -> dict:
    """What the dataset card shows: per group, top-1 re-identification beside chance. No ids."""
    groups = []
    for group in report["groups"]:
        reid = group.get("reidentification") or {}
        entry = {"group": group["name"], "strength": group["strength"], "n": group["n_synthetic"]}
        for level in ("image", "patient"):
            top1 = (reid.get(level) or {}).get("top1") or {}
            entry[level] = {k: top1.get(k) for k in ("value", "ci95", "chance")}
        groups.append(entry)
    settings = report["settings"]
    return {"embedder": settings["embedder"], "date": settings["date"], "groups": groups}
