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
from synthgen.plan import PLAN_VERSION, ShardTask
from synthgen.recipe.label_stats import LabelStats, stats_from_json
from synthgen.recipe.labels import LabelEncoding
from synthgen.recipe.quality_stats import QualityTally
from synthgen.recipe.schema import ModelConfig

_REPAIR = {
    "run": "rerun with --overwrite to start OUT again",
    "commit": "rerun `synthgen generate` (the shard is rendered again)",
    "manifest": "run `synthgen finalize OUT` to write it again",
    "model": "run `synthgen generate` again to write it",
}


def parse_json(data: bytes, name: str, kind: str) -> Any:
    """JSON from a record file; a damaged file names itself and the way to repair it."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise OutputError(f"{name} is damaged (not JSON); {_REPAIR[kind]}") from None


def _damaged(name: str, kind: str, error: Exception) -> OutputError:
    missing = f"field {error}" if isinstance(error, KeyError) else error.__class__.__name__
    return OutputError(f"{name} is damaged ({missing} is missing or wrong); {_REPAIR[kind]}")


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
                raw["recipe_sha256"],
                [ShardTask(**task) for task in raw["tasks"]],
                [SkippedRow(int(s["row"]), str(s["reason"])) for s in raw.get("skipped", [])],
                raw.get("corpus_sha256"),
                int(raw.get("plan_version", 1)),  # records before 0.2 had none: plan 1
                [(float(b[0]), int(b[1]), int(b[2])) for b in raw.get("blocks", [])],
                raw.get("layout_sha256"),
                int(raw.get("layout_size", 0)),
                [int(part) for part in raw.get("parts", [])],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise _damaged(name, "run", error) from None


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
                name=raw["name"], split=raw["split"], shard=int(raw["shard"]),
                count=int(raw["count"]), files=dict(raw["files"]),
                sizes={k: int(v) for k, v in (raw.get("sizes") or {}).items()},
                strength=raw.get("strength"), seconds=dict(raw.get("seconds") or {}),
                labels={k: stats_from_json(v) for k, v in (raw.get("labels") or {}).items()},
                cells={k: int(v) for k, v in (raw.get("cells") or {}).items()},
                quality=QualityTally.from_json(raw["quality"]) if "quality" in raw else None,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise _damaged(name, "commit", error) from None


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
        return cls(**{name: raw.get(name) for name in cls.__dataclass_fields__})

    @classmethod
    def from_json(cls, data: bytes, name: str) -> ModelRecord:
        raw = parse_json(data, name, "model")
        try:
            return cls.from_dict(raw)
        except (KeyError, TypeError) as error:
            raise _damaged(name, "model", error) from None


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
                name=raw["name"], mode=raw["mode"], recipe_sha256=raw["recipe_sha256"],
                versions=dict(raw.get("versions") or {}),
                model=ModelRecord.from_dict(raw["model"]) if raw.get("model") else None,
                num_samples=int(raw["num_samples"]), counts=dict(raw["counts"]),
                counts_by_strength=dict(raw.get("counts_by_strength") or {}),
                labels={k: LabelEncoding.from_json(v) for k, v in raw["labels"].items()},
                skipped=[SkippedRow(int(s["row"]), str(s["reason"])) for s in raw.get("skipped", [])],
                shards=[_shard_entry(s) for s in raw["shards"]],
                complete=raw.get("complete") is True,
                quality=QualitySummary.from_json(raw["quality"]) if "quality" in raw else None,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise _damaged(name, "manifest", error) from None

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


def _shard_entry(raw: dict[str, Any]) -> ShardEntry:
    return ShardEntry(
        raw["name"], raw["split"], int(raw["shard"]), int(raw["count"]), dict(raw["files"]),
        {k: int(v) for k, v in (raw.get("sizes") or {}).items()}, raw.get("strength"),
    )  # fmt: skip
