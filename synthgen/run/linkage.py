"""The linkage table: which source image each i2i key was made from, for audits — never in OUT.

Written as CSV or Parquet, as its name ends. It replaces only a linkage table synthgen wrote (an
earlier run's, recognised by its exact columns, and in Parquet by synthgen's mark): the cohort
manifest, the recipe, a folder, any other existing file, or a place inside OUT is refused. A
write that fails leaves no temporary behind (it would hold source ids next to the cohort).
"""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from synthgen.errors import OutputError
from synthgen.output.outdir import OutDir, reason, temporary_name
from synthgen.plan import Plan

WHERE = "privacy.linkage"
COLUMNS = ("key", "source_id", "patient_id", "source_row", "strength")
SCHEMA = pa.schema(
    [("key", pa.string()), ("source_id", pa.string()), ("patient_id", pa.string()),
     ("source_row", pa.int64()), ("strength", pa.float64())],
    metadata={"synthgen": "linkage"},
)  # fmt: skip
PARQUET_MAGIC = b"PAR1"


def is_linkage_table(path: Path) -> bool:
    """Whether an existing file is a linkage table synthgen wrote (so a rerun may replace it)."""
    if not path.is_file():  # a folder, a FIFO, a device: never
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(",".join(COLUMNS)) + 2)
    except OSError:
        return False
    if head.startswith(PARQUET_MAGIC):
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError):
            return False
        marked = (schema.metadata or {}).get(b"synthgen") == b"linkage"
        return marked and tuple(schema.names) == COLUMNS
    return head.rstrip(b"\r\n") == ",".join(COLUMNS).encode()


def check_target(target: Path, source_manifest: str | None, out: OutDir) -> None:
    """Refuse a linkage path that would overwrite what is not a linkage table, or land in OUT."""
    if target.suffix not in (".csv", ".parquet"):
        raise OutputError("must end in .csv or .parquet (the format it is written in)", where=WHERE)
    if out.holds(target):
        raise OutputError("must not be inside the output directory", where=WHERE)
    if target.is_dir():
        raise OutputError("is a folder; give the path of a file, e.g. linkage.csv", where=WHERE)
    if not (target.exists() or target.is_symlink()):
        return
    if source_manifest is not None and target.resolve() == Path(source_manifest).resolve():
        raise OutputError("is the cohort manifest (source.manifest); give it a path of its own",
                          where=WHERE)  # fmt: skip
    if not is_linkage_table(target):
        raise OutputError(
            "is an existing file that is not a linkage table synthgen wrote, and synthgen does "
            "not overwrite it; give a new path",
            where=WHERE,
        )


def encode(rows: list[dict], suffix: str) -> bytes:
    if suffix == ".parquet":
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buffer)
        return buffer.getvalue()
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def write_linkage(plan: Plan, path: str, out: OutDir) -> None:
    target = Path(path)
    source = plan.recipe.source.manifest if plan.recipe.source is not None else None
    check_target(target, source, out)
    data = encode(plan.linkage(), target.suffix)
    temporary = Path(temporary_name(str(target)))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(data)
        temporary.replace(target)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise OutputError(f"cannot be written ({reason(error)})", where=WHERE) from None
