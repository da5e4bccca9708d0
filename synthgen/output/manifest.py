"""Build the manifest from the run's records: counts, versions, label encodings, shard list.

Pure bookkeeping over commit records: no shard byte is read (label statistics come merged from
the records; only a shard committed by an older synthgen, without them, has its labels read).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence

from synthgen import __version__
from synthgen.errors import OutputError
from synthgen.output.read import ShardReader
from synthgen.output.records import (
    Manifest,
    ModelRecord,
    QualitySummary,
    RunRecord,
    ShardRecord,
)
from synthgen.plan import ShardTask
from synthgen.recipe.joint import LabelModel
from synthgen.recipe.label_stats import LabelStats
from synthgen.recipe.labels import LabelEncoding
from synthgen.recipe.quality_stats import QualityTally
from synthgen.recipe.schema import Recipe


def library_versions() -> dict[str, str]:
    names = ("torch", "diffusers", "transformers", "peft", "datasets", "webdataset", "pyarrow")
    versions = {"synthgen": __version__}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def label_encodings(recipe: Recipe) -> dict[str, LabelEncoding]:
    """How training code turns each label into a target (read by synthgen.data)."""
    return {name: spec.encoding() for name, spec in recipe.labels.items()}


def committed_in_order(
    tasks: Sequence[ShardTask], records: Mapping[str, ShardRecord]
) -> list[ShardRecord]:
    """The records of every planned shard, in plan order; refuses while any is missing."""
    missing = [t.name for t in tasks if t.name not in records]
    if missing:
        raise OutputError(
            f"{len(missing)} of {len(tasks)} shards are not committed yet (first: {missing[0]}); "
            "run `synthgen generate` again to finish them"
        )
    return [records[t.name] for t in tasks]


def build_manifest(
    recipe: Recipe, run: RunRecord, shards: Sequence[ShardRecord], model: ModelRecord | None
) -> Manifest:
    counts: dict[str, int] = {}
    by_strength: dict[str, int] = {}
    for shard in shards:
        counts[shard.split] = counts.get(shard.split, 0) + shard.count
        if shard.strength is not None:
            key = f"{shard.strength:g}"
            by_strength[key] = by_strength.get(key, 0) + shard.count
    return Manifest(
        name=recipe.name,
        mode=recipe.generation.mode,
        recipe_sha256=recipe.sha256(),
        versions=library_versions(),
        model=model,
        num_samples=sum(counts.values()),
        counts=counts,
        counts_by_strength=by_strength,
        labels=label_encodings(recipe),
        skipped=list(run.skipped),
        shards=[shard.entry() for shard in shards],
        quality=merged_quality(shards),
    )


GATE_SECONDS = ("render", "gate", "rejected")  # what a gated shard's record times


def merged_quality(shards: Sequence[ShardRecord]) -> QualitySummary | None:
    """The quality gate's counts and seconds over `shards` (None when none was gated)."""
    gated = [shard for shard in shards if shard.quality is not None]
    if not gated:
        return None
    total = QualityTally()
    for shard in gated:
        total.merge(shard.quality)  # type: ignore[arg-type]
    seconds = {name: sum(s.seconds.get(name, 0.0) for s in gated) for name in GATE_SECONDS}
    return QualitySummary(total, seconds)


def merged_label_stats(
    recipe: Recipe, shards: Sequence[ShardRecord], reader: ShardReader
) -> dict[str, LabelStats]:
    """Each label's statistics over `shards`, merged from their records."""
    model = LabelModel(recipe.labels)
    merged = model.new_stats()
    for shard in shards:
        stats = shard.labels if set(shard.labels) == set(merged) else _recount(model, shard, reader)
        for name, total in merged.items():
            total.merge(stats[name])  # type: ignore[arg-type]
    return merged


def merged_cells(shards: Sequence[ShardRecord]) -> dict[str, int]:
    """Samples per balance cell over `shards`."""
    cells: dict[str, int] = {}
    for shard in shards:
        for cell, count in shard.cells.items():
            cells[cell] = cells.get(cell, 0) + count
    return cells


def _recount(model: LabelModel, shard: ShardRecord, reader: ShardReader) -> dict[str, LabelStats]:
    """Statistics of a shard whose record has none (written by synthgen before 0.2)."""
    stats = model.new_stats()
    for sample in reader.read(shard, images=False):
        model.add(stats, sample.labels)
    return stats
