"""Conditional labels: one distribution per value of a label drawn before (or per bin of it).

    sbp:
      given: sex                       # a categorical parent: a case per category
      cases:
        male:   {dist: normal, mean: {base: 96, per: {age: 0.55}}, std: 15, min: 85, max: 200}
        female: {dist: normal, mean: {base: 84, per: {age: 0.75}}, std: 16, min: 85, max: 200}
    findings:
      given: age                       # a numeric parent: a case per bin, [low, high)
      bins: [[18, 40], [40, 60], [60, 90]]
      cases: [{dist: multilabel, ...}, {dist: multilabel, ...}, {dist: multilabel, ...}]

Every case is a label of the same family (same storage, encoding and categories), so the label
has one column type whatever case drew it; a case may itself be conditional (a second parent).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Tag, model_validator

from synthgen.errors import FieldError
from synthgen.recipe.labels import (
    Categorical,
    Constant,
    Given,
    LabelEncoding,
    LabelValue,
    Multilabel,
    Normal,
    Storage,
    Uniform,
)
from synthgen.recipe.numbers import LabelNumber


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    given: str
    bins: list[tuple[LabelNumber, LabelNumber]] | None = None
    cases: dict[str, LabelSpec] | list[LabelSpec]
    default: LabelSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Conditional:
        if isinstance(self.cases, dict):
            if self.bins is not None:
                raise FieldError("bins", "bins go with a list of cases, one per bin")
            if not self.cases and self.default is None:
                raise FieldError("cases", "needs at least one case or a default")
        else:
            if self.bins is None:
                raise FieldError(
                    "bins", "a list of cases needs bins: [[low, high], ...], one per case"
                )
            if self.default is not None:
                raise FieldError("default", "binned cases cover the parent's range: no default")
            if len(self.cases) != len(self.bins):
                raise FieldError(
                    "cases", f"{len(self.cases)} cases for {len(self.bins)} bins: give one per bin"
                )
            check_bins(self.bins, "bins", contiguous=True)
        first = self.first_case()
        for where, case in self.named_cases():
            if case.storage != first.storage or case.encoding() != first.encoding():
                raise FieldError(
                    where, "every case must be the same kind of label, with the same categories"
                )
        return self

    # --- structure ---------------------------------------------------------------------------

    def named_cases(self) -> list[tuple[str, LabelSpec]]:
        """(field path, case) of every case and the default, for messages."""
        if isinstance(self.cases, dict):
            named = [(f"cases.{key}", case) for key, case in self.cases.items()]
        else:
            named = [(f"cases.{i}", case) for i, case in enumerate(self.cases)]
        return named + ([("default", self.default)] if self.default is not None else [])

    def first_case(self) -> LabelSpec:
        return self.named_cases()[0][1]

    def parents(self) -> tuple[str, ...]:
        found = [self.given]
        for _, case in self.named_cases():
            found += [p for p in case.parents() if p not in found]
        return tuple(found)

    def case_keys(self) -> list[str]:
        """The keys a summary groups by: categories named, or bin labels."""
        if isinstance(self.cases, dict):
            return list(self.cases) + (["default"] if self.default is not None else [])
        return [
            bin_label(low, high, i == len(self.bins) - 1) for i, (low, high) in enumerate(self.bins)
        ]

    def case_key(self, parent_value: LabelValue) -> str:
        if isinstance(self.cases, dict):
            return str(parent_value) if str(parent_value) in self.cases else "default"
        return self.case_keys()[self._bin(float(parent_value))]  # type: ignore[arg-type]

    def case(self, parent_value: LabelValue) -> LabelSpec:
        if isinstance(self.cases, dict):
            return self.cases.get(str(parent_value), self.default)  # type: ignore[return-value]
        return self.cases[self._bin(float(parent_value))]  # type: ignore[arg-type]

    def _bin(self, x: float) -> int:
        for i, (low, high) in enumerate(self.bins or ()):
            if low <= x < high or (i == len(self.bins) - 1 and x == high):
                return i
        raise ValueError(f"{x:g} is in no bin of {self.given}")

    # --- what a label kind does ---------------------------------------------------------------

    def sample(self, rng: np.random.Generator, given: Given | None = None) -> LabelValue:
        return self.case((given or {})[self.given]).sample(rng, given)

    def describe(self) -> str:
        parts = [f"{key}: {case.describe()}" for key, case in zip(self.case_keys(), self._cases())]
        return f"given {self.given}: " + "; ".join(parts)

    def _cases(self) -> list[LabelSpec]:
        return [case for _, case in self.named_cases()]

    @property
    def storage(self) -> Storage:
        return self.first_case().storage

    def encoding(self) -> LabelEncoding:
        return self.first_case().encoding()

    def check(self, value: object) -> LabelValue:
        return self.first_case().check(value)

    def prompt_form(self, value: LabelValue) -> object:
        return self.first_case().prompt_form(value)

    def widest_values(self) -> list[LabelValue]:
        return [value for case in self._cases() for value in case.widest_values()]

    def to_stored(self, value: LabelValue) -> object:
        return self.first_case().to_stored(value)

    def caption(self, value: LabelValue) -> str:
        return self.first_case().caption(value)

    def within(self, low: float, high: float) -> Conditional:
        """Every case restricted to [low, high] (a balance cell's bin)."""
        if isinstance(self.cases, dict):
            cases: Any = {key: case.within(low, high) for key, case in self.cases.items()}
        else:
            cases = [case.within(low, high) for case in self.cases]
        default = self.default.within(low, high) if self.default is not None else None
        return self.model_copy(update={"cases": cases, "default": default})

    def bounds(self) -> tuple[float, float]:
        """The span of the cases' bounds (numeric cases)."""
        spans = [case.bounds() for case in self._cases()]
        return min(s[0] for s in spans), max(s[1] for s in spans)


def bin_label(low: float, high: float, last: bool) -> str:
    return f"[{low:g}, {high:g}{']' if last else ')'}"


def check_bins(bins: Sequence[tuple[float, float]], where: str, *, contiguous: bool) -> None:
    """Bins [low, high) in increasing order, none overlapping the one before; `contiguous`:
    no gap either (a conditional's cases cover the parent's range). The edges are finite
    already (`LabelNumber`)."""
    for i, (low, high) in enumerate(bins):
        if not low < high:
            raise FieldError(f"{where}.{i}", f"bin [{low:g}, {high:g}] must have low < high")
        if i and low < bins[i - 1][1]:
            raise FieldError(f"{where}.{i}", f"bin [{low:g}, {high:g}] overlaps the one before it")
        if i and contiguous and low > bins[i - 1][1]:
            raise FieldError(
                f"{where}.{i}", f"bins leave a gap between {bins[i - 1][1]:g} and {low:g}"
            )


def _kind(value: Any) -> str | None:
    """Which label kind a recipe entry is: `given` makes it conditional, else its `dist`."""
    if isinstance(value, dict):
        return "conditional" if "given" in value else value.get("dist")
    return "conditional" if isinstance(value, Conditional) else getattr(value, "dist", None)


LabelSpec = Annotated[
    Annotated[Categorical, Tag("categorical")]
    | Annotated[Uniform, Tag("uniform")]
    | Annotated[Normal, Tag("normal")]
    | Annotated[Constant, Tag("constant")]
    | Annotated[Multilabel, Tag("multilabel")]
    | Annotated[Conditional, Tag("conditional")],
    Discriminator(_kind),
]
Conditional.model_rebuild()
