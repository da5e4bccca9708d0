"""Sufficient statistics of a label's drawn values: kept per shard as it is written, merged by
addition, so a summary of the whole dataset never reads a sample again.

Each label kind (synthgen.recipe.labels) says which of these it keeps and how to read a summary
off it. The JSON form carries its type, so a commit record is readable without the recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


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


LabelStats = Counts | Moments


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
