"""Audit inputs from files: the synthetic images of an OUT, its linkage table, the real cohort.

Images are loaded lazily (a Parquet row group at a time for OUT, a file at a time for the cohort)
so a 10^5 cohort streams through the audit engine without being held in memory.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from synthgen.audit.embedders import AuditError
from synthgen.audit.items import SourceItem, SyntheticItem
from synthgen.cohort.images import read_image, to_model_rgb
from synthgen.cohort.rows import load_cohort
from synthgen.output.outdir import PARQUET, OutDir
from synthgen.output.read import ShardReader
from synthgen.recipe.schema import PreprocessConfig, SourceConfig, load_recipe


def read_linkage(path: str) -> dict[str, str]:
    """key -> source id, from the table `synthgen generate` wrote beside OUT (CSV or Parquet,
    told apart by their bytes, not their names)."""
    file = Path(path)
    if not file.is_file():
        raise AuditError("linkage table not found", where="--linkage")
    rows = _linkage_rows(file)
    if not rows or not {"key", "source_id"} <= set(rows[0]):
        raise AuditError("needs the columns key and source_id", where="--linkage")
    return {str(row["key"]): str(row["source_id"]) for row in rows}


def _linkage_rows(file: Path) -> list[dict]:
    try:
        with open(file, "rb") as handle:
            parquet = handle.read(4) == b"PAR1"
        if parquet:
            return pq.read_table(file).to_pylist()
        with open(file, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error, pa.ArrowException):
        raise AuditError("cannot be read as a CSV or Parquet table", where="--linkage") from None


def synthetic_items(out: OutDir, linkage: dict[str, str] | None) -> list[SyntheticItem]:
    """Every committed sample of OUT (from its Parquet shards), linked to its source for i2i.

    Keys and strengths are read now; each image is read (a row group at a time) when the engine
    asks for it.
    """
    manifest = out.manifest()
    shards = [s for s in manifest.shards if any(p.startswith(f"{PARQUET}/") for p in s.files)]
    if not shards:
        raise AuditError("has no Parquet shards to audit", file=out.url)
    i2i = manifest.mode == "i2i"
    if i2i and linkage is None:
        raise AuditError("an i2i dataset needs --linkage")
    reader = ShardReader(out, {})
    items = []
    for shard in shards:
        for position, sample in enumerate(reader.read(shard, images=False)):
            source = None
            if i2i:
                if sample.key not in linkage:
                    raise AuditError(
                        f"key {sample.key} is not in the linkage table", where="--linkage"
                    )
                source = linkage[sample.key]
            image = reader.image_loader(shard, position)
            load = lambda image=image: Image.open(io.BytesIO(image()))  # noqa: E731
            items.append(SyntheticItem(sample.key, load, source, sample.strength))
    return items


def _load_source(path: Path):
    return lambda: to_model_rgb(read_image(path))


def source_items(
    source: str, *, image_column: str, id_column: str, patient_column: str | None
) -> list[SourceItem]:
    """The real cohort, from an i2i recipe's `source` or from a manifest table and its columns."""
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
