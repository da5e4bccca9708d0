"""Label distributions: declare, sample from a numpy Generator, describe, and check values.

Each draw takes its randomness from the Generator it is given, so the caller decides what the
draw depends on (the plan seeds one Generator per sample from the recipe seed and sample index).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from synthgen.errors import FieldError

LabelValue = str | int | float | list[str]
LABEL_KINDS = ("categorical", "uniform", "normal", "constant", "multilabel")


class _Label(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def prompt_form(self, value: LabelValue) -> object:
        """The value as a prompt template shows it."""
        return value

    def from_stored(self, value: object) -> object:
        """The label value from its Parquet cell (a categorical is stored as its class index)."""
        return value


class Categorical(_Label):
    dist: Literal["categorical"]
    values: dict[str, float]

    @model_validator(mode="after")
    def _positive_weights(self) -> Categorical:
        if not self.values:
            raise FieldError("values", "values must name at least one category")
        for value, weight in self.values.items():
            if not weight > 0:
                raise FieldError(
                    f"values.{value}", f"weight of '{value}' is {weight}; weights must be positive"
                )
        return self

    def probabilities(self) -> dict[str, float]:
        total = sum(self.values.values())
        return {value: weight / total for value, weight in self.values.items()}

    def sample(self, rng: np.random.Generator) -> str:
        names = list(self.values)
        return names[int(rng.choice(len(names), p=list(self.probabilities().values())))]

    def describe(self) -> str:
        return ", ".join(f"{v}: {p:.3g}" for v, p in self.probabilities().items())

    def from_stored(self, value: object) -> str:
        return list(self.values)[int(value)]  # type: ignore[call-overload]

    def check(self, value: object) -> str:
        if str(value) not in self.values:
            raise ValueError(f"'{value}' is not one of {', '.join(self.values)}")
        return str(value)


class _Numeric(_Label):
    dtype: Literal["int", "float"] = "float"

    def _cast(self, x: float) -> int | float:
        return int(round(x)) if self.dtype == "int" else float(x)

    def _bounds(self) -> tuple[float, float]:
        raise NotImplementedError

    def sampling_bounds(self) -> tuple[float, float]:
        """The interval the sampler draws from: for integers, half a unit wider on each side,
        so rounding keeps every bound value in with its proper share of mass."""
        low, high = self._bounds()
        if self.dtype == "int":
            low = math.ceil(low) - 0.5 if math.isfinite(low) else low
            high = math.floor(high) + 0.5 if math.isfinite(high) else high
        return low, high

    def _check_integer_room(self) -> None:
        low, high = self._bounds()
        if self.dtype == "int" and math.isfinite(low) and math.isfinite(high):
            if math.ceil(low) > math.floor(high):
                raise FieldError("min", f"no integer lies in [{low:g}, {high:g}]")

    def check(self, value: object) -> int | float:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"'{value}' is not a number") from None
        low, high = self._bounds()
        if math.isnan(number) or not low <= number <= high:
            raise ValueError(f"{value} is outside [{low:g}, {high:g}]")
        return self._cast(number)


class Uniform(_Numeric):
    dist: Literal["uniform"]
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if self.min > self.max:
            raise FieldError("min", f"min ({self.min:g}) is greater than max ({self.max:g})")
        self._check_integer_room()
        return self

    def _bounds(self) -> tuple[float, float]:
        return self.min, self.max

    def sample(self, rng: np.random.Generator) -> int | float:
        if self.dtype == "int":
            return int(rng.integers(math.ceil(self.min), math.floor(self.max) + 1))
        return float(rng.uniform(self.min, self.max))

    def describe(self) -> str:
        return f"uniform on [{self.min:g}, {self.max:g}] ({self.dtype})"


class Normal(_Numeric):
    dist: Literal["normal"]
    mean: float
    std: float
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _valid(self) -> Normal:
        if not self.std > 0:
            raise FieldError("std", f"std is {self.std:g}; it must be greater than 0")
        low, high = self._bounds()
        if low > high:
            raise FieldError("min", f"min ({low:g}) is greater than max ({high:g})")
        self._check_integer_room()
        low, high = self.sampling_bounds()  # for integers, the mass that rounds into [min, max]
        dist = NormalDist(self.mean, self.std)
        if dist.cdf(high) - dist.cdf(low) < 1e-9:
            raise FieldError("max", "[min, max] holds no probability mass of this normal")
        return self

    def _bounds(self) -> tuple[float, float]:
        low = -math.inf if self.min is None else self.min
        high = math.inf if self.max is None else self.max
        return low, high

    def sample(self, rng: np.random.Generator) -> int | float:
        # Exact truncation by inverse CDF: clipping would pile probability mass on the bounds.
        dist = NormalDist(self.mean, self.std)
        low, high = self.sampling_bounds()
        u = float(rng.uniform(dist.cdf(low), dist.cdf(high)))
        x = min(max(dist.inv_cdf(min(max(u, 1e-300), 1 - 1e-16)), low), high)
        if self.dtype == "int":
            return int(min(max(round(x), low + 0.5), high - 0.5))
        return float(x)

    def describe(self) -> str:
        low, high = self._bounds()
        bounds = (
            f", truncated to [{low:g}, {high:g}]" if (self.min, self.max) != (None, None) else ""
        )
        return f"normal(mean={self.mean:g}, std={self.std:g}){bounds} ({self.dtype})"


class Constant(_Label):
    dist: Literal["constant"]
    value: int | float | str

    def sample(self, rng: np.random.Generator) -> int | float | str:
        return self.value

    def describe(self) -> str:
        return f"always {self.value}"

    def check(self, value: object) -> int | float | str:
        if str(value) != str(self.value):
            raise ValueError(f"'{value}' differs from the constant {self.value}")
        return self.value


class Multilabel(_Label):
    dist: Literal["multilabel"]
    values: dict[str, float]
    none: str = "no finding"
    max_labels: int | None = Field(None, ge=1)
    join: str = ", "

    @model_validator(mode="after")
    def _probabilities(self) -> Multilabel:
        if not self.values:
            raise FieldError("values", "values must name at least one finding")
        for value, p in self.values.items():
            if not 0 < p <= 1:
                raise FieldError(
                    f"values.{value}", f"probability of '{value}' is {p}; it must be in (0, 1]"
                )
        if self.none in self.values:
            raise FieldError("none", f"none value '{self.none}' is also listed in values")
        return self

    def sample(self, rng: np.random.Generator) -> list[str]:
        names = list(self.values)
        hits = rng.random(len(names)) < np.array([self.values[n] for n in names])
        drawn = [n for n, hit in zip(names, hits) if hit]
        if self.max_labels is not None and len(drawn) > self.max_labels:
            keep = sorted(rng.choice(len(drawn), self.max_labels, replace=False))
            drawn = [drawn[i] for i in keep]
        return drawn

    def as_text(self, drawn: list[str]) -> str:
        return self.join.join(drawn) if drawn else self.none

    def prompt_form(self, value: LabelValue) -> object:
        return self.as_text(value)  # type: ignore[arg-type]

    def describe(self) -> str:
        rates = ", ".join(f"{v}: {p:.3g}" for v, p in self.values.items())
        cap = f", at most {self.max_labels}" if self.max_labels else ""
        return f"independent findings ({rates}){cap}; '{self.none}' when none"

    def check(self, value: object) -> list[str]:
        if isinstance(value, str):
            parts = [] if value.strip() == self.none else value.split(self.join.strip() or ",")
            value = [p.strip() for p in parts if p.strip()]
        drawn = list(value)  # type: ignore[call-overload]
        for finding in drawn:
            if finding not in self.values:
                raise ValueError(f"'{finding}' is not one of {', '.join(self.values)}")
        return drawn


LabelSpec = Annotated[
    Categorical | Uniform | Normal | Constant | Multilabel, Field(discriminator="dist")
]


def sample_labels(labels: dict[str, LabelSpec], rng: np.random.Generator) -> dict[str, LabelValue]:
    """Draw every label in declaration order from one Generator."""
    return {name: spec.sample(rng) for name, spec in labels.items()}
