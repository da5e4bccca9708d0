"""What the quality gate found: one sample's verdict (its attempts and the kept image's
predictions), its per-sample columns, and the counts a shard's commit record carries and the
manifest merges (acceptance per check, label and cell; the attempts histogram; dropped keys).

Rates are over rendered images: a check's pass rate is the share of every attempt's image that
passed it, and a cell's acceptance rate is accepted images over images rendered, which for
attempts that each pass with probability p estimates p whatever `max_attempts` cut off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from synthgen.recipe.quality import COLUMN_PREFIX, BoundCheck, LabelVerdict

ImageVerdict = dict[str, dict[str, LabelVerdict]]  # check -> label -> verdict, for one image


def image_passes(verdict: ImageVerdict) -> bool:
    return all(v.passed for labels in verdict.values() for v in labels.values())


@dataclass(frozen=True)
class SampleVerdict:
    """A sample after the gate: `attempts` images rendered, the last one's `checks`, and how
    many attempts failed each check and each check's label (`failures["check"]`,
    `failures["check.label"]`)."""

    attempts: int
    checks: ImageVerdict
    failures: dict[str, int]
    dropped: bool = False
    replaced: bool = False  # balance: its labels were drawn again in its cell

    @property
    def passed(self) -> bool:
        return image_passes(self.checks)

    def to_json(self) -> dict[str, Any]:
        """The tar JSON's `quality` member."""
        return {
            "attempts": self.attempts,
            "passed": self.passed,
            "checks": {
                check: {
                    "passed": all(v.passed for v in labels.values()),
                    "failed_attempts": self.failures[check],
                    "labels": {
                        label: {
                            "predicted": v.predicted,
                            "probability": v.probability,
                            "passed": v.passed,
                            "failed_attempts": self.failures[f"{check}.{label}"],
                        }
                        for label, v in labels.items()
                    },  # fmt: skip
                }
                for check, labels in self.checks.items()
            },
        }

    def columns(self) -> dict[str, Any]:
        """The Parquet cells, named as `column_names` says."""
        row: dict[str, Any] = {"quality_attempts": self.attempts, "quality_passed": self.passed}
        for check, labels in self.checks.items():
            row[f"{COLUMN_PREFIX}{check}_passed"] = all(v.passed for v in labels.values())
            row[f"{COLUMN_PREFIX}{check}_failed_attempts"] = self.failures[check]
            for label, v in labels.items():
                stem = f"{COLUMN_PREFIX}{check}_{label}"
                row[stem] = v.predicted
                row[f"{stem}_passed"] = v.passed
                row[f"{stem}_failed_attempts"] = self.failures[f"{check}.{label}"]
                if v.probability is not None:
                    row[f"{stem}_probability"] = v.probability
        return row


def column_kinds(checks: list[BoundCheck]) -> dict[str, str]:
    """Every per-sample column the gate adds, with its storage: int32, bool, float64, string,
    list<string>, list<float64>."""
    kinds = {"quality_attempts": "int32", "quality_passed": "bool"}
    predicted = {"categorical": "string", "numeric": "float64", "multilabel": "list<string>"}
    probability = {"categorical": "float64", "multilabel": "list<float64>"}
    for check in checks:
        kinds[f"{COLUMN_PREFIX}{check.name}_passed"] = "bool"
        kinds[f"{COLUMN_PREFIX}{check.name}_failed_attempts"] = "int32"
        for rule in check.rules:
            stem = f"{COLUMN_PREFIX}{check.name}_{rule.label}"
            kinds[stem] = predicted[rule.kind]
            kinds[f"{stem}_passed"] = "bool"
            kinds[f"{stem}_failed_attempts"] = "int32"
            if rule.kind in probability:
                kinds[f"{stem}_probability"] = probability[rule.kind]
    return kinds


@dataclass
class Rate:
    images: int = 0
    passed: int = 0

    def add(self, images: int, failed: int) -> None:
        self.images += images
        self.passed += images - failed

    @property
    def share(self) -> float:
        return self.passed / self.images if self.images else float("nan")


@dataclass
class CellTally:
    samples: int = 0
    images: int = 0
    accepted: int = 0  # images that passed every check (one per sample at most)
    dropped: int = 0
    checks: dict[str, Rate] = field(default_factory=dict)


@dataclass
class QualityTally:
    """Counts over a shard (or, merged, a dataset). `checks` is keyed by check and by
    "check.label"; `cells` by the acceptance table's cell; `attempts` maps attempts used to
    samples."""

    samples: int = 0
    images: int = 0
    accepted: int = 0
    kept_failing: int = 0  # on_fail keep: written with quality_passed false
    attempts: dict[int, int] = field(default_factory=dict)
    checks: dict[str, Rate] = field(default_factory=dict)
    cells: dict[str, CellTally] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # keys
    replaced: list[str] = field(default_factory=list)  # keys whose labels were drawn again
    weights: dict[str, str] = field(default_factory=dict)  # check -> the model file's sha256

    def add(self, key: str, cell: str, verdict: SampleVerdict) -> None:
        passed = verdict.passed
        self.samples += 1
        self.images += verdict.attempts
        self.accepted += passed
        self.attempts[verdict.attempts] = self.attempts.get(verdict.attempts, 0) + 1
        if verdict.dropped:
            self.dropped.append(key)
        elif not passed:
            self.kept_failing += 1
        if verdict.replaced:
            self.replaced.append(key)
        tally = self.cells.setdefault(cell, CellTally())
        tally.samples += 1
        tally.images += verdict.attempts
        tally.accepted += passed
        tally.dropped += verdict.dropped
        for name, failed in verdict.failures.items():
            self.checks.setdefault(name, Rate()).add(verdict.attempts, failed)
            if "." not in name:
                tally.checks.setdefault(name, Rate()).add(verdict.attempts, failed)

    def merge(self, other: QualityTally) -> None:
        self.samples += other.samples
        self.images += other.images
        self.accepted += other.accepted
        self.kept_failing += other.kept_failing
        for attempts, count in other.attempts.items():
            self.attempts[attempts] = self.attempts.get(attempts, 0) + count
        for name, rate in other.checks.items():
            _merge_rate(self.checks.setdefault(name, Rate()), rate)
        for key, cell in other.cells.items():
            mine = self.cells.setdefault(key, CellTally())
            mine.samples += cell.samples
            mine.images += cell.images
            mine.accepted += cell.accepted
            mine.dropped += cell.dropped
            for name, rate in cell.checks.items():
                _merge_rate(mine.checks.setdefault(name, Rate()), rate)
        self.dropped += other.dropped
        self.replaced += other.replaced
        for name, digest in other.weights.items():
            self.weights.setdefault(name, digest)

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples, "images": self.images, "accepted": self.accepted,
            "kept_failing": self.kept_failing,
            "attempts": {str(k): v for k, v in sorted(self.attempts.items())},
            "checks": {name: _rate_json(rate) for name, rate in self.checks.items()},
            "cells": {
                key: {"samples": c.samples, "images": c.images, "accepted": c.accepted,
                      "dropped": c.dropped,
                      "checks": {n: _rate_json(r) for n, r in c.checks.items()}}
                for key, c in sorted(self.cells.items())
            },
            "dropped": {"count": len(self.dropped), "keys": self.dropped},
            "replaced": {"count": len(self.replaced), "keys": self.replaced},
            "weights_sha256": self.weights,
        }  # fmt: skip

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> QualityTally:
        return cls(
            samples=int(raw["samples"]), images=int(raw["images"]),
            accepted=int(raw["accepted"]), kept_failing=int(raw["kept_failing"]),
            attempts={int(k): int(v) for k, v in raw["attempts"].items()},
            checks={name: _rate(r) for name, r in raw["checks"].items()},
            cells={
                key: CellTally(int(c["samples"]), int(c["images"]), int(c["accepted"]),
                               int(c["dropped"]), {n: _rate(r) for n, r in c["checks"].items()})
                for key, c in raw["cells"].items()
            },
            dropped=[str(k) for k in raw["dropped"]["keys"]],
            replaced=[str(k) for k in raw["replaced"]["keys"]],
            weights={str(k): str(v) for k, v in raw["weights_sha256"].items()},
        )  # fmt: skip


def _merge_rate(total: Rate, other: Rate) -> None:
    total.images += other.images
    total.passed += other.passed


def _rate_json(rate: Rate) -> dict[str, int]:
    return {"images": rate.images, "passed": rate.passed}


def _rate(raw: Mapping[str, Any]) -> Rate:
    return Rate(int(raw["images"]), int(raw["passed"]))
