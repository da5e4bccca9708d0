"""The joint law of a recipe's labels: who depends on whom, the draw order, one sample's draw,
and the statistics that report each label and each of its conditional cases.

The draw order follows the dependencies (`given`, a moving mean's `per`), found from the recipe;
among labels free to go, declaration order decides, so a recipe without dependencies draws
exactly as it always did. A cycle, an unknown parent, a parent of the wrong kind, a case that
names no category of its parent, or bins that miss part of the parent's range is a validation
error naming the field.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np

from synthgen.errors import FieldError
from synthgen.recipe.conditional import Conditional, LabelSpec
from synthgen.recipe.label_stats import Fitted, Grouped, LabelStats, Moments
from synthgen.recipe.labels import (
    LabelValue,
    LinearMean,
    Normal,
    SummaryRow,
    Uniform,
    moment_rows,
)

TableRow = tuple[str, str, str, str]  # (case, category or statistic, asked, drawn)


def leaf(spec: LabelSpec) -> LabelSpec:
    """The first plain case under any conditionals: it decides storage, encoding, checks."""
    while isinstance(spec, Conditional):
        spec = spec.first_case()
    return spec


def family(spec: LabelSpec) -> str:
    plain = leaf(spec)
    return "numeric" if isinstance(plain, (Normal, Uniform)) else plain.dist


class LabelModel:
    def __init__(self, labels: Mapping[str, LabelSpec]):
        self.labels = dict(labels)
        for name, spec in self.labels.items():
            self._check_parents(name, spec, f"labels.{name}")
        self.order = self._draw_order()

    # --- dependencies ---------------------------------------------------------------------

    def _check_parents(self, name: str, spec: LabelSpec, where: str) -> None:
        if isinstance(spec, Conditional):
            self._check_conditional(name, spec, where)
            for path, case in spec.named_cases():
                self._check_parents(name, case, f"{where}.{path}")
        elif isinstance(spec, Normal) and isinstance(spec.mean, LinearMean):
            for parent in spec.mean.per:
                self._parent(name, parent, f"{where}.mean.per.{parent}", "numeric")
            self._check_moving_mass(spec, where)

    def _parent(self, name: str, parent: str, where: str, *kinds: str) -> LabelSpec:
        if parent == name:
            raise FieldError(where, f"'{name}' cannot depend on itself")
        if parent not in self.labels:
            known = ", ".join(n for n in self.labels if n != name) or "none"
            raise FieldError(where, f"'{parent}' is not a label (labels: {known})")
        spec = self.labels[parent]
        if family(spec) not in kinds:
            raise FieldError(
                where, f"'{parent}' is {family(spec)}; it must be {' or '.join(kinds)}"
            )
        return spec

    def _check_conditional(self, name: str, spec: Conditional, where: str) -> None:
        if isinstance(spec.cases, dict):
            parent = self._parent(name, spec.given, f"{where}.given", "categorical")
            categories = list(leaf(parent).encoding().names or ())
            for key in spec.cases:
                if key not in categories:
                    raise FieldError(
                        f"{where}.cases.{key}",
                        f"'{key}' is not a category of {spec.given} ({', '.join(categories)})",
                    )
            missing = [c for c in categories if c not in spec.cases]
            if missing and spec.default is None:
                raise FieldError(
                    f"{where}.cases",
                    f"no case for {spec.given} '{missing[0]}': add it, or a default",
                )
            return
        parent = self._parent(name, spec.given, f"{where}.given", "numeric")
        low, high = parent.bounds()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise FieldError(f"{where}.bins", f"give {spec.given} a min and max to bin it")
        first, last = spec.bins[0][0], spec.bins[-1][1]  # type: ignore[index]
        if first > low or last < high:
            raise FieldError(
                f"{where}.bins",
                f"bins cover [{first:g}, {last:g}] but {spec.given} ranges over [{low:g}, {high:g}]",
            )

    def _check_moving_mass(self, spec: Normal, where: str) -> None:
        """A moving mean must leave [min, max] some mass wherever its parents can be."""
        ranges = [self.labels[p].bounds() for p in spec.mean.per]  # type: ignore[union-attr]
        if not all(math.isfinite(v) for r in ranges for v in r):
            return
        for corner in itertools.product(*ranges):
            given = dict(zip(spec.mean.per, corner))  # type: ignore[union-attr]
            spec.check_mass(spec.mean_at(given), f"{where}.mean")

    def parents(self, name: str) -> tuple[str, ...]:
        return self.labels[name].parents()

    def ancestors(self, name: str) -> set[str]:
        found: set[str] = set()
        todo = list(self.parents(name))
        while todo:
            parent = todo.pop()
            if parent not in found:
                found.add(parent)
                todo.extend(self.parents(parent))
        return found

    def _draw_order(self) -> list[str]:
        """Kahn's algorithm, taking the earliest-declared free label first."""
        waiting = {name: set(self.parents(name)) for name in self.labels}
        order: list[str] = []
        while waiting:
            free = [name for name in self.labels if name in waiting and not waiting[name]]
            if not free:
                start = next(iter(waiting))
                raise FieldError(
                    f"labels.{start}",
                    f"the labels depend on each other in a cycle: {self._cycle(start)}",
                )
            order.append(free[0])
            del waiting[free[0]]
            for parents in waiting.values():
                parents.discard(free[0])
        return order

    def _cycle(self, start: str) -> str:
        path, name = [start], start
        while True:
            name = next(p for p in self.parents(name) if p in self.labels)
            if name in path:
                return " → ".join([*path[path.index(name) :], name])
            path.append(name)

    def dependent(self, name: str) -> bool:
        return bool(self.parents(name))

    # --- drawing ---------------------------------------------------------------------------

    def draw(
        self,
        rng: np.random.Generator,
        fixed: Mapping[str, LabelValue] | None = None,
        narrowed: Mapping[str, LabelSpec] | None = None,
    ) -> dict[str, LabelValue]:
        """One sample's labels, in declaration order. `fixed` values are taken as they are,
        `narrowed` distributions replace the declared ones (a balance cell's bins)."""
        values: dict[str, LabelValue] = {}
        for name in self.order:
            if fixed and name in fixed:
                values[name] = fixed[name]
            else:
                spec = (narrowed or {}).get(name, self.labels[name])
                values[name] = spec.sample(rng, values)
        return {name: values[name] for name in self.labels}

    # --- statistics ------------------------------------------------------------------------

    def new_stats(self) -> dict[str, LabelStats]:
        return {name: new_stats(spec) for name, spec in self.labels.items()}

    def add(self, stats: Mapping[str, LabelStats], labels: Mapping[str, LabelValue]) -> None:
        for name, spec in self.labels.items():
            add_to(spec, stats[name], labels[name], labels)

    def tables(self, stats: Mapping[str, LabelStats]) -> list[tuple[str, list[TableRow]]]:
        """The conditional tables the recipe asked for: per dependent label, asked vs drawn
        per case of its parent (and a moving mean's fitted line)."""
        found = []
        for name, spec in self.labels.items():
            if self.dependent(name):
                found.append((name, table_rows(spec, stats.get(name) or new_stats(spec))))
        return found


def new_stats(spec: LabelSpec) -> LabelStats:
    if not isinstance(spec, Conditional):
        return spec.new_stats()
    first = leaf(spec)
    if isinstance(first, (Normal, Uniform)):
        low = min(_plot_range(case)[0] for _, case in _leaves(spec))
        high = max(_plot_range(case)[1] for _, case in _leaves(spec))
        span = Uniform(dist="uniform", min=low, max=high, dtype=first.dtype)
        marginal = span.new_stats()
    else:
        marginal = first.new_stats()
    return Grouped(spec.given, marginal)  # type: ignore[arg-type]


def _leaves(spec: LabelSpec, path: str = ""):
    if isinstance(spec, Conditional):
        for where, case in spec.named_cases():
            yield from _leaves(case, f"{path}.{where}")
    else:
        yield path, spec


def _plot_range(spec: LabelSpec) -> tuple[float, float]:
    return spec.plot_range()  # type: ignore[union-attr]


def add_to(
    spec: LabelSpec, stats: LabelStats, value: LabelValue, given: Mapping[str, LabelValue]
) -> None:
    if not isinstance(spec, Conditional):
        spec.add_to(stats, value, given)
        return
    grouped: Grouped = stats  # type: ignore[assignment]
    leaf(spec).add_to(grouped.marginal, value)
    key = spec.case_key(given[spec.given])
    case = spec.case(given[spec.given])
    if key not in grouped.groups:
        grouped.groups[key] = new_stats(case)
    add_to(case, grouped.groups[key], value, given)


def summary(spec: LabelSpec, stats: LabelStats) -> list[SummaryRow]:
    """The marginal rows: what was asked (where it does not depend on other labels) vs drawn."""
    if isinstance(spec, Conditional):
        marginal = stats.marginal  # type: ignore[union-attr]
        if isinstance(marginal, Moments):
            return moment_rows(None, spec.bounds(), marginal)
        return [(value, "-", drawn) for value, _, drawn in leaf(spec).summary(marginal)]
    return spec.summary(stats)


def table_rows(spec: LabelSpec, stats: LabelStats, prefix: str = "") -> list[TableRow]:
    if isinstance(spec, Conditional):
        grouped: Grouped = stats  # type: ignore[assignment]
        rows: list[TableRow] = []
        for key, case in zip(spec.case_keys(), [c for _, c in spec.named_cases()]):
            sub = grouped.groups.get(key) or new_stats(case)
            label = (
                f"{prefix}{spec.given} {key}"
                if not isinstance(spec.cases, dict)
                else f"{prefix}{spec.given}={key}"
            )
            rows += table_rows(case, sub, f"{label}, ")
        return rows
    case = prefix.removesuffix(", ") or "all"
    rows = [(case, value, asked, drawn) for value, asked, drawn in spec.summary(stats)]
    if isinstance(stats, Fitted):
        rows += fit_rows(spec, stats, case)  # type: ignore[arg-type]
    return rows


def fit_rows(spec: Normal, stats: Fitted, case: str) -> list[TableRow]:
    """The moving mean's line: asked base and slopes beside least squares on the samples (the
    truncation to [min, max] bends the drawn line where a bound is near)."""
    mean: LinearMean = spec.mean  # type: ignore[assignment]
    solved = stats.fit.solve()
    drawn = [f"{v:.3f}" for v in solved] if solved else ["-"] * (len(mean.per) + 1)
    rows = [(case, "mean: base", f"{mean.base:g}", drawn[0])]
    rows += [
        (case, f"mean: per {name}", f"{slope:g}", drawn[i + 1])
        for i, (name, slope) in enumerate(mean.per.items())
    ]
    return rows
