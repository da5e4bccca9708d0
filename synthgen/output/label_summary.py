"""Label summaries: what the recipe asked for beside what the shards hold, from merged statistics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from synthgen.recipe.label_stats import LabelStats
from synthgen.recipe.schema import Recipe


@dataclass(frozen=True)
class LabelRow:
    label: str
    value: str  # category, finding or statistic
    asked: str
    drawn: str


def label_rows(recipe: Recipe, stats: Mapping[str, LabelStats]) -> list[LabelRow]:
    """One row per category, finding or statistic of every label."""
    return [
        LabelRow(name, *row)
        for name, spec in recipe.labels.items()
        for row in spec.summary(stats.get(name) or spec.new_stats())
    ]


def markdown_table(rows: list[LabelRow]) -> str:
    lines = ["| label | value | asked | drawn |", "|---|---|---|---|"]
    lines += [f"| {r.label} | {r.value} | {r.asked} | {r.drawn} |" for r in rows]
    return "\n".join(lines)
