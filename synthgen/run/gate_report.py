"""`synthgen gate OUT`: the quality gate's checks over a finished dataset, without rendering:
every sample's predictions and the acceptance table, written to a report folder outside OUT.

The checks are OUT's own recipe's (which reproduces the predictions the run recorded, for a
lossless image format) or another recipe's `quality` section over OUT's labels: to size
`max_attempts` and thresholds before a long run, or to check a dataset made otherwise.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from synthgen.errors import FieldError, OutputError, RecipeError
from synthgen.output.manifest import label_encodings
from synthgen.output.outdir import OutDir
from synthgen.output.quality_summary import acceptance_markdown
from synthgen.output.read import ShardReader
from synthgen.recipe.quality import bind_checks, grouping
from synthgen.recipe.quality_stats import QualityTally, SampleVerdict
from synthgen.recipe.schema import Recipe
from synthgen.render.gate import Gate

PREDICTIONS, ACCEPTANCE_MD, ACCEPTANCE_JSON = (
    "predictions.parquet",
    "acceptance.md",
    "acceptance.json",
)
CHUNK = 100  # samples read at a time: one Parquet row group


@dataclass(frozen=True)
class GateReport:
    samples: int
    tally: QualityTally
    files: list[Path]


def gated_recipe(recipe: Recipe, checks_from: Recipe | None, file: str | None) -> Recipe:
    """OUT's recipe with the quality section to run: `checks_from`'s, or its own."""
    quality = checks_from.quality if checks_from is not None else recipe.quality
    if quality is None:
        where = "--checks" if checks_from is not None else None
        raise RecipeError(
            "has no quality section; name a recipe with one: synthgen gate OUT --checks R.yaml",
            file=file if checks_from is not None else "recipe.yaml",
            where=where,
        )
    try:
        bind_checks(quality, recipe.labels)
        balance = recipe.balance
        grouping(quality, recipe.labels, balance.by if balance else (),
                 balance.bins if balance else None)  # fmt: skip
    except FieldError as error:
        raise RecipeError(f"{error} (checked against OUT's labels)", file=file,
                          where=error.field) from None  # fmt: skip
    return recipe.model_copy(update={"quality": quality})


def gate_dataset(
    out: OutDir, report_dir: Path, *, checks_from: Recipe | None = None,
    checks_file: str | None = None, device: str = "cpu",
) -> GateReport:  # fmt: skip
    """Judge every committed sample of a complete OUT; write the report files."""
    _refuse_inside(out, report_dir)
    recipe = gated_recipe(out.recipe(), checks_from, checks_file)
    manifest = out.manifest()
    gate = Gate.load(recipe, device)
    reader = ShardReader(out, label_encodings(recipe))
    balance = recipe.balance
    cells = grouping(recipe.quality, recipe.labels, balance.by if balance else (),
                     balance.bins if balance else None)  # type: ignore[arg-type]  # fmt: skip
    tally, rows = QualityTally(weights=gate.weights), []
    failure_keys = [f"{c.check.name}{suffix}" for c in gate.checks
                    for suffix in ["", *(f".{r.label}" for r in c.check.rules)]]  # fmt: skip
    for shard in manifest.shards:
        for start in range(0, shard.count, CHUNK):
            stored = reader.read(shard, range(start, min(start + CHUNK, shard.count)))
            images = [Image.open(io.BytesIO(s.image)) for s in stored]  # type: ignore[arg-type]
            for sample, verdict in zip(stored, gate.judge([s.labels for s in stored], images)):
                failures = dict.fromkeys(failure_keys, 0)
                for check, labels in verdict.items():
                    failures[check] = int(not all(v.passed for v in labels.values()))
                    for label, v in labels.items():
                        failures[f"{check}.{label}"] = int(not v.passed)
                judged = SampleVerdict(1, verdict, failures)
                cell = cells.cell(sample.labels)
                tally.add(sample.key, cell, judged)
                rows.append({"key": sample.key, "split": shard.split, "cell": cell,
                             **_prediction_columns(judged)})  # fmt: skip
    return GateReport(len(rows), tally, _write(report_dir, recipe, tally, rows))


def _prediction_columns(verdict: SampleVerdict) -> dict:
    """The in-run columns that describe one image (not its attempts)."""
    return {name: value for name, value in verdict.columns().items()
            if not name.endswith("failed_attempts") and name != "quality_attempts"}  # fmt: skip


def _write(report_dir: Path, recipe: Recipe, tally: QualityTally, rows: list[dict]) -> list[Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    files = [report_dir / PREDICTIONS, report_dir / ACCEPTANCE_MD, report_dir / ACCEPTANCE_JSON]
    pq.write_table(pa.Table.from_pylist(rows), files[0])
    title = f"# Quality gate over {recipe.name}\n\nEach stored image judged once.\n\n"
    files[1].write_text(title + acceptance_markdown(recipe, tally) + "\n")
    files[2].write_text(json.dumps(tally.to_json(), indent=2))
    return files


def _refuse_inside(out: OutDir, report_dir: Path) -> None:
    if not out.is_local:
        return
    inside = Path(out.root).resolve()
    target = report_dir.resolve()
    if target == inside or inside in target.parents:
        raise OutputError(
            "the report goes outside OUT (OUT holds only what synthgen generated)", where="-o"
        )
