"""Label summaries: what the recipe asked for beside what the shards actually hold."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import pandas as pd

from synthgen.labels import Categorical, Constant, Multilabel, Normal, Uniform
from synthgen.recipe import Recipe


@dataclass(frozen=True)
class LabelRow:
    label: str
    value: str  # category, finding or statistic
    asked: str
    drawn: str


def _truncated_normal_moments(spec: Normal) -> tuple[float, float]:
    """Mean and std of the normal truncated to [min, max] (what a correct sampler yields)."""
    unit = NormalDist()
    low, high = spec._bounds()
    a, b = (low - spec.mean) / spec.std, (high - spec.mean) / spec.std
    mass = unit.cdf(b) - unit.cdf(a)
    pdf_a = unit.pdf(a) if math.isfinite(a) else 0.0
    pdf_b = unit.pdf(b) if math.isfinite(b) else 0.0
    shift = (pdf_a - pdf_b) / mass
    term_a = a * pdf_a if math.isfinite(a) else 0.0
    term_b = b * pdf_b if math.isfinite(b) else 0.0
    variance = 1 + (term_a - term_b) / mass - shift**2
    return spec.mean + spec.std * shift, spec.std * math.sqrt(variance)


def label_rows(recipe: Recipe, frame: pd.DataFrame) -> list[LabelRow]:
    """One row per category/finding/statistic; `frame` holds decoded label values."""
    rows: list[LabelRow] = []
    for name, spec in recipe.labels.items():
        column = frame[name] if name in frame else pd.Series([], dtype=object)
        n = max(len(column), 1)
        if isinstance(spec, Categorical):
            counts = column.value_counts()
            for value, p in spec.probabilities().items():
                rows.append(LabelRow(name, value, f"{p:.3f}", f"{counts.get(value, 0) / n:.3f}"))
        elif isinstance(spec, Multilabel):
            flat = pd.Series([f for findings in column for f in findings], dtype=object)
            counts = flat.value_counts()
            for value, p in spec.values.items():
                rows.append(LabelRow(name, value, f"{p:.3f}", f"{counts.get(value, 0) / n:.3f}"))
            empty = sum(1 for findings in column if len(findings) == 0) / n
            rows.append(LabelRow(name, spec.none, "-", f"{empty:.3f}"))
        elif isinstance(spec, (Uniform, Normal)):
            if isinstance(spec, Normal):
                mean, std = _truncated_normal_moments(spec)
                low, high = spec._bounds()
            else:
                mean, std = (spec.min + spec.max) / 2, (spec.max - spec.min) / math.sqrt(12)
                low, high = spec.min, spec.max
            values = column.astype(float)
            stats = [
                ("mean", f"{mean:.2f}", f"{values.mean():.2f}"),
                ("std", f"{std:.2f}", f"{values.std(ddof=0):.2f}"),
                ("min", f"{low:g}", f"{values.min():g}"),
                ("max", f"{high:g}", f"{values.max():g}"),
            ]
            rows.extend(LabelRow(name, *stat) for stat in stats)
        elif isinstance(spec, Constant):
            share = (column.astype(str) == str(spec.value)).mean() if len(column) else 0.0
            rows.append(LabelRow(name, str(spec.value), "1.000", f"{share:.3f}"))
    return rows


def markdown_table(rows: list[LabelRow]) -> str:
    lines = ["| label | value | asked | drawn |", "|---|---|---|---|"]
    lines += [f"| {r.label} | {r.value} | {r.asked} | {r.drawn} |" for r in rows]
    return "\n".join(lines)
