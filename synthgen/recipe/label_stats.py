"""Sufficient statistics of a label's drawn values: kept per shard as it is written, merged by
addition, so a summary of the whole dataset never reads a sample again.

Each label kind (synthgen.recipe.labels) says which of these it keeps and how to read a summary
off it. The JSON form carries its type, so a commit record is readable without the recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Counts:
    """How often each value (category, finding, or the no-finding value) was drawn, of `n`."""

    n: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, *values: str) -> None:
        """One sample holding `values` (one for a categorical, the findings for a multilabel)."""
        self.n += 1
        for value in values:
            self.counts[value] = self.counts.get(value, 0) + 1

    def merge(self, other: Counts) -> None:
        self.n += other.n
        for value, count in other.counts.items():
            self.counts[value] = self.counts.get(value, 0) + count

    def share(self, value: str) -> float:
        return self.counts.get(value, 0) / max(self.n, 1)

    def to_json(self) -> dict[str, Any]:
        return {"type": "counts", "n": self.n, "counts": dict(sorted(self.counts.items()))}


@dataclass
class Moments:
    """Count, sum, sum of squares, extremes and a fixed-bin histogram of numeric values.

    The bin edges come from the label's declaration, never from the data, so the histograms of
    any two shards of a run add up bin by bin; `below`/`above` count values outside them.
    """

    edges: list[float]
    n: int = 0
    total: float = 0.0
    squares: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    bins: list[int] = field(default_factory=list)
    below: int = 0
    above: int = 0

    def __post_init__(self) -> None:
        if not self.bins:
            self.bins = [0] * (len(self.edges) - 1)

    def add(self, value: float) -> None:
        x = float(value)
        self.n += 1
        self.total += x
        self.squares += x * x
        self.low, self.high = min(self.low, x), max(self.high, x)
        if x < self.edges[0]:
            self.below += 1
        elif x > self.edges[-1]:
            self.above += 1
        else:
            self.bins[_bin(self.edges, x)] += 1

    def merge(self, other: Moments) -> None:
        if other.edges != self.edges:
            raise ValueError("histograms with different bin edges cannot be merged")
        self.n += other.n
        self.total += other.total
        self.squares += other.squares
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        self.bins = [a + b for a, b in zip(self.bins, other.bins, strict=True)]
        self.below += other.below
        self.above += other.above

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation (ddof 0), as the asked-for moments are."""
        if not self.n:
            return math.nan
        return math.sqrt(max(self.squares / self.n - self.mean**2, 0.0))

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "moments", "n": self.n, "sum": self.total, "sum_sq": self.squares,
            "min": self.low if self.n else None, "max": self.high if self.n else None,
            "edges": self.edges, "bins": self.bins, "below": self.below, "above": self.above,
        }  # fmt: skip


def _bin(edges: list[float], x: float) -> int:
    """Index of the bin holding `x` (the last bin is closed on the right)."""
    lo, hi = 0, len(edges) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x >= edges[mid]:
            lo = mid
        else:
            hi = mid
    return lo


def stats_from_json(data: dict[str, Any]) -> LabelStats:
    kind = data.get("type")
    if kind == "grouped":
        groups = {key: stats_from_json(value) for key, value in data["groups"].items()}
        return Grouped(data["by"], stats_from_json(data["marginal"]), groups)  # type: ignore[arg-type]
    if kind == "fitted":
        return Fitted(stats_from_json(data["marginal"]), stats_from_json(data["fit"]))  # type: ignore[arg-type]
    if kind == "regression":
        return Regression(list(data["names"]), [list(map(float, r)) for r in data["xtx"]],
                          [float(v) for v in data["xty"]])  # fmt: skip
    if data.get("type") == "counts":
        return Counts(int(data["n"]), {str(k): int(v) for k, v in data["counts"].items()})
    if data.get("type") == "moments":
        low = math.inf if data["min"] is None else float(data["min"])
        high = -math.inf if data["max"] is None else float(data["max"])
        return Moments(
            [float(e) for e in data["edges"]], int(data["n"]), float(data["sum"]),
            float(data["sum_sq"]), low, high, [int(b) for b in data["bins"]],
            int(data["below"]), int(data["above"]),
        )  # fmt: skip
    raise ValueError(f"unknown label statistics type {data.get('type')!r}")


@dataclass
class Regression:
    """Least squares of a label on the labels its mean moves with, as mergeable sums:
    XᵀX and Xᵀy over rows [1, x1, …, xk], so shards add up and the fit is solved once."""

    names: list[str]
    xtx: list[list[float]] = field(default_factory=list)
    xty: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        size = len(self.names) + 1
        if not self.xtx:
            self.xtx = [[0.0] * size for _ in range(size)]
            self.xty = [0.0] * size

    def add(self, y: float, xs: list[float]) -> None:
        row = [1.0, *xs]
        for i, a in enumerate(row):
            self.xty[i] += a * y
            for j, b in enumerate(row):
                self.xtx[i][j] += a * b

    def merge(self, other: Regression) -> None:
        for i, row in enumerate(other.xtx):
            self.xty[i] += other.xty[i]
            for j, value in enumerate(row):
                self.xtx[i][j] += value

    def solve(self) -> list[float] | None:
        """[intercept, slope per name], or None while the rows cannot determine it."""
        matrix = np.array(self.xtx)
        if matrix[0][0] <= len(self.names) or abs(np.linalg.det(matrix)) < 1e-12:
            return None
        return [float(v) for v in np.linalg.solve(matrix, np.array(self.xty))]

    def to_json(self) -> dict[str, Any]:
        return {"type": "regression", "names": self.names, "xtx": self.xtx, "xty": self.xty}


@dataclass
class Fitted:
    """A numeric label whose mean moves with others: its moments and its fitted line."""

    marginal: Moments
    fit: Regression

    @property
    def n(self) -> int:
        return self.marginal.n

    def merge(self, other: Fitted) -> None:
        self.marginal.merge(other.marginal)
        self.fit.merge(other.fit)

    def to_json(self) -> dict[str, Any]:
        return {"type": "fitted", "marginal": self.marginal.to_json(), "fit": self.fit.to_json()}


@dataclass
class Grouped:
    """A conditional label: its marginal, and its statistics per case of its parent."""

    by: str
    marginal: Counts | Moments
    groups: dict[str, Any] = field(default_factory=dict)  # case key -> LabelStats

    @property
    def n(self) -> int:
        return self.marginal.n

    def merge(self, other: Grouped) -> None:
        self.marginal.merge(other.marginal)  # type: ignore[arg-type]
        for key, stats in other.groups.items():
            if key in self.groups:
                self.groups[key].merge(stats)
            else:
                self.groups[key] = stats_from_json(stats.to_json())  # a copy, not a share

    def to_json(self) -> dict[str, Any]:
        groups = {key: stats.to_json() for key, stats in sorted(self.groups.items())}
        return {"type": "grouped", "by": self.by, "marginal": self.marginal.to_json(),
                "groups": groups}  # fmt: skip


LabelStats = Counts | Moments | Grouped | Fitted | Regression
