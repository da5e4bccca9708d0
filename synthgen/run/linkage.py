"""The linkage table: which source image each i2i key was made from, for audits — never in OUT."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from synthgen.errors import OutputError
from synthgen.output.outdir import OutDir, temporary_name
from synthgen.plan import Plan


def write_linkage(plan: Plan, path: str, out: OutDir) -> None:
    target = Path(path).resolve()
    if out.is_local and target.is_relative_to(Path(out.root).resolve()):
        raise OutputError("must not be inside the output directory", where="privacy.linkage")
    rows = plan.linkage()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(temporary_name(str(target)))
    temporary.write_text(buffer.getvalue())
    temporary.replace(target)
