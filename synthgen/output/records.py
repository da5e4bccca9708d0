"""The records OUT keeps, as types: the run record, a shard's commit record, the model record and
the manifest. Each has one `to_json` and one `from_json`; nothing else reads their JSON.

A record that cannot be read is an `OutputError` saying how to repair it, never a traceback.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from synthgen.cohort.rows import SkippedRow
from synthgen.errors import OutputError
from synthgen.output.record_fields import Damage, json_field, list_of, mapping, optional, same, text
from synthgen.plan import PLAN_VERSION, ShardTask
from synthgen.recipe.label_stats import LabelStats, stats_from_json
from synthgen.recipe.labels import LabelEncoding
from synthgen.recipe.quality_stats import QualityTally
from synthgen.recipe.schema import ModelConfig

_REPAIR = {
    "run": "rerun with --overwrite to start OUT again",
    "commit": "rerun `synthgen generate` (the shard is rendered again)",
    "manifest": "run `synthgen finalize OUT` to write it again",
    # Only a run that renders writes the model record, so no command writes it again.
    "model": "remove it and run `synthgen finalize OUT` (the card then names no model), or "
    "generate into a new OUT",
}


def repair(kind: str) -> str:
    """How to repair a record of this kind ("run", "commit", "manifest", "model")."""
    return _REPAIR[kind]


def parse_json(data: bytes, name: str, kind: str) -> Any:
    """JSON from a record file; a damaged file names itself and the way to repair it."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise OutputError(f"{name} is damaged (not JSON); {_REPAIR[kind]}") from None


def _damaged(name: str, kind: str, damage: Damage) -> OutputError:
    what = f"field '{damage.path}' {damage.problem}" if damage.path else f"it {damage.problem}"
    return OutputError(f"{name} is damaged ({what}); {_REPAIR[kind]}")


def _task(raw: Any) -> ShardTask:
    return ShardTask(
        json_field(raw, "split", text),
        json_field(raw, "shard", int),
        json_field(raw, "start", int),
        json_field(raw, "stop", int),
        json_field(raw, "strength", optional(float), None),
    )


def _skipped_row(raw: Any) -> SkippedRow:
    return SkippedRow(json_field(raw, "row", int), json_field(raw, "reason", str))


def _block(raw: Any) -> tuple[float, int, int]:
    strength, repeat, part = raw  # a list of three
    return float(strength), int(repeat), int(part)


@dataclass(frozen=True)
class RunRecord:
    """Written when a run claims OUT: which recipe, its shards, and the cohort rows it skipped.

    finalize needs no cohort (and no plan) to know the shard list: it is here.
    """

    recipe_sha256: str
    tasks: list[ShardTask]
    skipped: list[SkippedRow] = field(default_factory=list)
    corpus_sha256: str | None = None  # the recipe whatever its size: a larger one extends it
    plan_version: int = PLAN_VERSION  # how indices map to splits and shards (plan.py)
    # i2i: the (strength, repeat, cohort part) passes in index order, the last manifest row of
    # each part, and a digest of which row, strength, split and noise the first `layout_size`
    # indices are (Plan.layout_sha256)
    blocks: list[tuple[float, int, int]] = field(default_factory=list)
    layout_sha256: str | None = None
    layout_size: int = 0
    parts: list[int] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes, name: str) -> RunRecord:
        raw = parse_json(data, name, "run")
        try:
            return cls(
                json_field(raw, "recipe_sha256", text),
                json_field(raw, "tasks", list_of(_task)),
                json_field(raw, "skipped", list_of(_skipped_row), []),
                json_field(raw, "corpus_sha256", optional(text), None),
                json_field(raw, "plan_version", int, 1),  # records before 0.2 had none: plan 1
                json_field(raw, "blocks", list_of(_block), []),
                json_field(raw, "layout_sha256", optional(text), None),
                json_field(raw, "layout_size", int, 0),
                json_field(raw, "parts", list_of(int), []),
            )
        except Damage as damage:
            raise _damaged(name, "run", damage) from None


@dataclass(frozen=True)
class ShardEntry:
    """What the manifest lists of a committed shard: its files, their sha256 and sizes."""

    name: str
    split: str
    shard: int
    count: int
    files: dict[str, str]  # relative path -> sha256
    sizes: dict[str, int] = field(default_factory=dict)  # relative path -> bytes (quick resume)
    strength: float | None = None

    def entry(self) -> ShardEntry:
        return ShardEntry(
            self.name, self.split, self.shard, self.count, self.files, self.sizes, self.strength
        )


@dataclass(frozen=True)
class ShardRecord(ShardEntry):
    """The commit record: a shard counts once this exists (written after its files are renamed).

    `labels` holds each label's statistics over the shard, so finalize reads no sample again;
    `quality` the quality gate's counts (only under a gate: other records keep their bytes).
    """

    seconds: dict[str, float] = field(default_factory=dict)
    labels: dict[str, LabelStats] = field(default_factory=dict)
    cells: dict[str, int] = field(default_factory=dict)  # balance cell -> samples
    quality: QualityTally | None = None

    def to_json(self) -> bytes:
        data = asdict(self.entry())
        data["seconds"] = self.seconds
        data["labels"] = {name: stats.to_json() for name, stats in self.labels.items()}
        data["cells"] = self.cells
        if self.quality is not None:
            data["quality"] = self.quality.to_json()
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, data: bytes, name: str) -> ShardRecord:
        raw = parse_json(data, name, "commit")
        try:
            return cls(
                **_entry_fields(raw),
                seconds=json_field(raw, "seconds", mapping(float, null_is_empty=True), {}),
                labels=json_field(raw, "labels", mapping(stats_from_json, null_is_empty=True), {}),
                cells=json_field(raw, "cells", mapping(int, null_is_empty=True), {}),
                quality=json_field(raw, "quality", QualityTally.from_json, None),
            )
        except Damage as damage:
            raise _damaged(name, "commit", damage) from None


@dataclass(frozen=True)
class ModelRecord:
    """What the manifest and the card say about the model that made the images.

    With a LoRA it also says the rank and alpha that were fused and where alpha came from
    ("file: …", "recipe" or "assumed: …"); a record without a LoRA leaves those keys out.
    """

    base: str
    revision: str | None
    lora: str | None
    lora_weight_name: str | None
    lora_scale: float | None
    lora_sha256: str | None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_alpha_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.lora is None:
            for name in ("lora_rank", "lora_alpha", "lora_alpha_source"):
                del data[name]
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2).encode()

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        lora_sha256: str | None,
        *,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_alpha_source: str | None = None,
    ) -> ModelRecord:
        lora = config.lora
        return cls(
            base=config.base,
            revision=config.revision,
            lora=lora.path if lora else None,
            lora_weight_name=lora.weight_name if lora else None,
            lora_scale=lora.scale if lora else None,
            lora_sha256=lora_sha256,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_alpha_source=lora_alpha_source,
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelRecord:
        json_field(raw, "base", text)
        return cls(**{name: raw.get(name) for name in cls.__dataclass_fields__})

    @classmethod
    def from_json(cls, data: bytes, name: str) -> ModelRecord:
        raw = parse_json(data, name, "model")
        try:
            return cls.from_dict(raw)
        except Damage as damage:
            raise _damaged(name, "model", damage) from None


@dataclass(frozen=True)
class QualitySummary:
    """The quality gate over the whole dataset: the shards' counts merged, and their seconds
    (measured: the one part of the manifest that differs between two runs of a recipe)."""

    tally: QualityTally
    seconds: dict[str, float]  # render, gate, rejected: summed over the shards

    def to_json(self) -> dict[str, Any]:
        return {**self.tally.to_json(), "seconds": self.seconds}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> QualitySummary:
        return cls(QualityTally.from_json(raw), {k: float(v) for k, v in raw["seconds"].items()})


@dataclass(frozen=True)
class Manifest:
    """manifest.json: written by finalize once every shard is committed, read by every reader."""

    name: str
    mode: str
    recipe_sha256: str
    versions: dict[str, str]
    model: ModelRecord | None
    num_samples: int
    counts: dict[str, int]  # per split
    counts_by_strength: dict[str, int]
    labels: dict[str, LabelEncoding]
    skipped: list[SkippedRow]
    shards: list[ShardEntry]
    complete: bool = True
    quality: QualitySummary | None = None  # under a quality gate only

    def to_json(self) -> bytes:
        data = {
            "name": self.name,
            "complete": self.complete,
            "mode": self.mode,
            "recipe_sha256": self.recipe_sha256,
            "versions": self.versions,
            "model": self.model.to_dict() if self.model else {},
            "num_samples": self.num_samples,
            "counts": self.counts,
            "counts_by_strength": self.counts_by_strength,
            "labels": {name: encoding.to_json() for name, encoding in self.labels.items()},
            "skipped": [asdict(row) for row in self.skipped],
            "shards": [asdict(shard) for shard in self.shards],
        }
        if self.quality is not None:
            data["quality"] = self.quality.to_json()
        return json.dumps(data, indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes, name: str) -> Manifest:
        raw = parse_json(data, name, "manifest")
        try:
            return cls(
                name=json_field(raw, "name", text),
                mode=json_field(raw, "mode", text),
                recipe_sha256=json_field(raw, "recipe_sha256", text),
                versions=json_field(raw, "versions", mapping(same, null_is_empty=True), {}),
                model=json_field(raw, "model", _model_or_none, None),
                num_samples=json_field(raw, "num_samples", int),
                counts=json_field(raw, "counts", mapping(int)),
                counts_by_strength=json_field(
                    raw, "counts_by_strength", mapping(int, null_is_empty=True), {}
                ),
                labels=json_field(raw, "labels", mapping(LabelEncoding.from_json)),
                skipped=json_field(raw, "skipped", list_of(_skipped_row), []),
                shards=json_field(raw, "shards", list_of(_shard_entry)),
                complete=json_field(raw, "complete", lambda value: value is True, False),
                quality=json_field(raw, "quality", QualitySummary.from_json, None),
            )
        except Damage as damage:
            raise _damaged(name, "manifest", damage) from None

    def shard_files(
        self, split: str, folder: str, strength: float | None = None
    ) -> list[ShardFile]:
        """The `folder` ("webdataset" or "parquet") files of one split, in plan order."""
        if split not in self.counts:
            raise OutputError(f"no split '{split}'; this dataset has {', '.join(self.counts)}")
        files = []
        for shard in self.shards:
            if shard.split != split:
                continue
            if strength is not None and (
                shard.strength is None or abs(shard.strength - strength) > 1e-9
            ):
                continue
            for path, digest in shard.files.items():
                if path.startswith(f"{folder}/"):
                    files.append(ShardFile(path, shard.count, digest))
        if not files:
            at = f" at strength {strength:g}" if strength is not None else ""
            raise OutputError(f"split '{split}' has no {folder} files{at}")
        return files


@dataclass(frozen=True)
class ShardFile:
    path: str  # relative to OUT
    count: int
    sha256: str


def _entry_fields(raw: Any) -> dict[str, Any]:
    """The fields a commit record shares with the manifest's entry of its shard."""
    return dict(
        name=json_field(raw, "name", text), split=json_field(raw, "split", text),
        shard=json_field(raw, "shard", int), count=json_field(raw, "count", int),
        files=json_field(raw, "files", mapping(text)),
        sizes=json_field(raw, "sizes", mapping(int, null_is_empty=True), {}),  # quick resume
        strength=json_field(raw, "strength", optional(float), None),
    )  # fmt: skip


def _shard_entry(raw: Any) -> ShardEntry:
    return ShardEntry(**_entry_fields(raw))


def _model_or_none(raw: Any) -> ModelRecord | None:
    return ModelRecord.from_dict(raw) if raw else None  # finalize writes {} without a model
