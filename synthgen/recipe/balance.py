"""Exact quotas: `balance` names the labels whose value combinations (cells) are counted exactly.

    balance:
      by: [sex, age, findings]
      bins: {age: [[18, 40], [40, 60], [60, 90]]}      # numeric labels are balanced by bins
      per_cell: 100                                     # or cells: [{cell: {...}, count: N}, ...]

A cell fixes each categorical label to a category, each numeric label to a bin (its value is then
drawn from its distribution restricted to the bin) and each multilabel to the exact set of
findings drawn. A multilabel's cells are sets, not "contains finding X": sets are disjoint, so
every sample is in exactly one cell and the counts can be exact; "contains X" cells overlap (a
sample with two findings would count twice). By default its sets are "no finding" and each
finding alone; `sets` lists others (e.g. [[effusion, cardiomegaly]]). The labels outside `by`
are drawn inside each cell as the recipe says, given the cell's values.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from synthgen.errors import FieldError
from synthgen.recipe.conditional import LabelSpec, bin_label, check_bins
from synthgen.recipe.joint import LabelModel, family, leaf
from synthgen.recipe.labels import LabelValue
from synthgen.recipe.numbers import MAX_CELLS, MAX_SAMPLES, LabelNumber, Probability, integer


class CellQuota(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cell: dict[str, Any]  # label -> category, [low, high] bin, or list of findings
    count: integer(ge=1, le=MAX_SAMPLES) | None = None
    share: Probability | None = None

    @model_validator(mode="after")
    def _one_size(self) -> CellQuota:
        if (self.count is None) == (self.share is None):
            raise FieldError("count", "give a cell either a count or a share")
        return self


class BalanceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    by: list[str]
    bins: dict[str, list[tuple[LabelNumber, LabelNumber]]] = {}
    sets: dict[str, list[list[str]]] = {}
    per_cell: integer(ge=1, le=MAX_SAMPLES) | None = None
    cells: list[CellQuota] | None = None

    @model_validator(mode="after")
    def _one_quota(self) -> BalanceConfig:
        if not self.by:
            raise FieldError("by", "name at least one label to balance")
        if len(set(self.by)) != len(self.by):
            raise FieldError("by", "names a label twice")
        if (self.per_cell is None) == (self.cells is None):
            raise FieldError("per_cell", "give per_cell (the same count in every cell) or cells")
        if self.cells is not None:
            kinds = {quota.count is None for quota in self.cells}
            if len(kinds) > 1:
                raise FieldError("cells", "give every cell a count, or every cell a share")
        return self


@dataclass(frozen=True)
class Cell:
    """One combination of the balanced labels' values, and how many samples it holds."""

    key: str  # e.g. "sex=female; age [40, 60); findings=effusion"
    fixed: dict[str, LabelValue]  # categorical and multilabel values, taken as they are
    narrowed: dict[str, LabelSpec]  # numeric labels restricted to the cell's bin
    count: int


@dataclass(frozen=True)
class _Value:
    label: str
    text: str  # as the cell key shows it
    raw: Any  # what a `cells` entry writes for it: a category, (low, high), or a set
    fixed: LabelValue | None = None
    narrowed: LabelSpec | None = None

    def matches(self, written: Any) -> bool:
        if isinstance(self.raw, tuple):
            numbers = isinstance(written, list) and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in written
            )
            return numbers and [float(v) for v in written] == list(self.raw)
        if isinstance(self.raw, frozenset):
            unique = isinstance(written, list) and len(set(written)) == len(written)
            return unique and frozenset(written) == self.raw
        return str(written) == self.raw


def quota_cells(
    config: BalanceConfig, labels: dict[str, LabelSpec], num_samples: int | None
) -> list[Cell]:
    """Every cell with its count, in a fixed order; FieldError (under `balance.`) when the
    balance cannot be honoured."""
    model = LabelModel(labels)
    choices = [_values(config, name, labels, model) for name in config.by]
    for name in config.bins:
        if name not in config.by:
            raise FieldError(f"bins.{name}", f"'{name}' is not in by")
    for name in config.sets:
        if name not in config.by:
            raise FieldError(f"sets.{name}", f"'{name}' is not in by")
    size = math.prod(len(values) for values in choices)
    if size > MAX_CELLS:
        raise FieldError("by", f"{size} cells; at most {MAX_CELLS}: balance fewer labels or bins")
    combos = [list(combo) for combo in itertools.product(*choices)]
    counts = _counts(config, combos, num_samples)
    cells = []
    for combo, count in zip(combos, counts):
        if count:
            cells.append(
                Cell(
                    key="; ".join(value.text for value in combo),
                    fixed={v.label: v.fixed for v in combo if v.narrowed is None},  # type: ignore[misc]
                    narrowed={v.label: v.narrowed for v in combo if v.narrowed is not None},
                    count=count,
                )
            )
    if not cells:
        raise FieldError("cells", "no cell has a sample")
    return cells


def _values(
    config: BalanceConfig, name: str, labels: dict[str, LabelSpec], model: LabelModel
) -> list[_Value]:
    if name not in labels:
        raise FieldError("by", f"'{name}' is not a label (labels: {', '.join(labels)})")
    outside = sorted(model.ancestors(name) - set(config.by))
    if outside:
        raise FieldError(
            "by",
            f"'{name}' depends on '{outside[0]}', which is not balanced: a cell of {name} would "
            f"need {outside[0]} drawn given {name}, the other way round; add it to by",
        )
    spec, kind = labels[name], family(labels[name])
    if kind == "categorical":
        categories = leaf(spec).encoding().names or ()
        return [_Value(name, f"{name}={c}", c, fixed=c) for c in categories]
    if kind == "numeric":
        return _bins(config, name, spec)
    if kind == "multilabel":
        return _sets(config, name, spec)
    raise FieldError("by", f"'{name}' is a constant: there is nothing to balance")


def _bins(config: BalanceConfig, name: str, spec: LabelSpec) -> list[_Value]:
    if name not in config.bins:
        raise FieldError(f"bins.{name}", f"a numeric label needs bins: {name}: [[low, high], ...]")
    bins = config.bins[name]
    plain = leaf(spec)
    check_bins(bins, f"bins.{name}", contiguous=False)
    values = []
    for i, (low, high) in enumerate(bins):
        last = i == len(bins) - 1
        # [low, high): the integers below high, or high itself for the last bin
        top = high if last or plain.dtype == "float" else math.ceil(high) - 1  # type: ignore[union-attr]
        floor, ceiling = spec.bounds()  # type: ignore[union-attr]
        if max(floor, low) > min(ceiling, top):
            raise FieldError(
                f"bins.{name}.{i}",
                f"[{low:g}, {high:g}] lies outside {name}'s [{floor:g}, {ceiling:g}]",
            )
        values.append(
            _Value(
                name,
                f"{name} {bin_label(low, high, last)}",
                (float(low), float(high)),
                narrowed=spec.within(low, top),  # type: ignore[union-attr]
            )  # fmt: skip
        )
    return values


def _sets(config: BalanceConfig, name: str, spec: LabelSpec) -> list[_Value]:
    plain = leaf(spec)
    findings = list(plain.values)  # type: ignore[union-attr]
    sets = config.sets.get(name) or [[], *([f] for f in findings)]
    values, seen = [], set()
    for i, chosen in enumerate(sets):
        for finding in chosen:
            if finding not in findings:
                raise FieldError(f"sets.{name}.{i}", f"'{finding}' is not a finding of {name}")
        drawn = [f for f in findings if f in chosen]  # the declared order, as a draw gives
        if len(drawn) != len(chosen) or tuple(drawn) in seen:
            raise FieldError(f"sets.{name}.{i}", "lists a finding twice, or repeats a set")
        if plain.max_labels is not None and len(drawn) > plain.max_labels:  # type: ignore[union-attr]
            raise FieldError(f"sets.{name}.{i}", "holds more than max_labels findings")
        seen.add(tuple(drawn))
        text = plain.as_text(drawn)  # type: ignore[union-attr]
        values.append(_Value(name, f"{name}={text}", frozenset(drawn), fixed=drawn))
    return values


def _counts(
    config: BalanceConfig, combos: list[list[_Value]], num_samples: int | None
) -> list[int]:
    if config.per_cell is not None:
        counts = [config.per_cell] * len(combos)
    else:
        counts = _listed_counts(config, combos, num_samples)
    total = sum(counts)
    if total > MAX_SAMPLES:
        where = "per_cell" if config.per_cell is not None else "cells"
        raise FieldError(where, f"the quotas add up to {total} samples; at most {MAX_SAMPLES}")
    if num_samples is not None and num_samples != total and config.per_cell is not None:
        raise FieldError(
            "per_cell",
            f"{len(combos)} cells × {config.per_cell} = {total} samples, but num_samples is "
            f"{num_samples}: drop num_samples or make them agree",
        )
    if num_samples is not None and total > num_samples:
        raise FieldError(
            "cells", f"the quotas add up to {total}, more than num_samples ({num_samples})"
        )
    if num_samples is not None and total < num_samples:
        raise FieldError(
            "cells", f"the quotas add up to {total}, fewer than num_samples ({num_samples})"
        )
    return counts


def _listed_counts(
    config: BalanceConfig, combos: list[list[_Value]], num_samples: int | None
) -> list[int]:
    counts = [0] * len(combos)
    shares = [0.0] * len(combos)
    for n, quota in enumerate(config.cells or []):
        for name in config.by:
            if name not in quota.cell:
                raise FieldError(f"cells.{n}.cell", f"gives no value for {name}")
        extra = sorted(set(quota.cell) - set(config.by))
        if extra:
            raise FieldError(f"cells.{n}.cell.{extra[0]}", "is not a balanced label")
        for k, name in enumerate(config.by):  # the label whose value is none of its cells'
            if not any(combo[k].matches(quota.cell[name]) for combo in combos):
                kinds = "bins" if name in config.bins else "values"
                raise FieldError(f"cells.{n}.cell.{name}", f"is not one of {name}'s {kinds}")
        found = [
            i for i, combo in enumerate(combos)
            if all(value.matches(quota.cell[value.label]) for value in combo)
        ]  # fmt: skip
        if not found:
            raise FieldError(f"cells.{n}.cell", "names no cell of the balanced labels' values")
        if counts[found[0]] or shares[found[0]]:
            raise FieldError(f"cells.{n}.cell", "names a cell twice")
        if quota.count is not None:
            counts[found[0]] = quota.count
        else:
            shares[found[0]] = quota.share  # type: ignore[assignment]
    if any(shares):
        if num_samples is None:
            raise FieldError("cells", "cells given as shares need num_samples")
        if abs(sum(shares) - 1) > 1e-9:
            raise FieldError("cells", f"the shares add up to {sum(shares):g}, not 1")
        counts = _largest_remainder(shares, num_samples)
    return counts


def _largest_remainder(shares: list[float], total: int) -> list[int]:
    raw = [share * total for share in shares]
    counts = [math.floor(value) for value in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts
