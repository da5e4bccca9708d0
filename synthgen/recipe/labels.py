"""Label kinds: how each is declared, drawn, checked, stored, encoded for training and summarised.

Everything that differs between kinds lives on the kind, so a new distribution is one class here
and no `isinstance` ladder elsewhere. Each draw takes its randomness from the Generator it is
given, so the caller decides what it depends on (the plan seeds one per sample from the recipe
seed and the sample index).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from synthgen.errors import FieldError
from synthgen.recipe.label_stats import Counts, Fitted, LabelStats, Moments, Regression
from synthgen.recipe.numbers import MAX_MAGNITUDE, LabelNumber, Probability, Weight, integer, real

LabelValue = str | int | float | list[str]
# How a label's Parquet column is typed: a class index, a number, text, or a list of texts.
Storage = Literal["class", "int64", "float64", "bool", "string", "list<string>"]
SummaryRow = tuple[str, str, str]  # (category, finding or statistic; asked; drawn)


@dataclass(frozen=True)
class LabelEncoding:
    """How training code turns a label into a target; `manifest.json` records one per label.

    categorical → class index; multilabel → multi-hot over `names`; numeric → the number;
    constant → nothing (there is nothing to learn from it).
    """

    kind: Literal["categorical", "multilabel", "numeric", "constant"]
    names: tuple[str, ...] | None = None
    none: str | None = None

    def target(self, value: Any) -> int | list[float] | float | None:
        if self.kind == "categorical":
            return self.index(value)
        if self.kind == "multilabel":
            hot = [0.0] * len(self.names or ())
            for finding in value:
                hot[self.index(finding)] = 1.0
            return hot
        if self.kind == "numeric":
            return float(value)
        return None

    def from_stored(self, cell: Any) -> Any:
        """The label value from its Parquet cell: a class index becomes its name."""
        if self.kind == "categorical":
            return (self.names or ())[int(cell)]
        if self.kind == "multilabel":
            return [str(finding) for finding in cell]
        return cell

    def index(self, value: str) -> int:
        names = self.names or ()
        if value not in names:
            raise ValueError(f"'{value}' is not one of {', '.join(names)}")
        return names.index(value)

    @property
    def width(self) -> int | None:
        """Output units a model head needs: classes, names, 1 for a number, None for nothing."""
        if self.kind in ("categorical", "multilabel"):
            return len(self.names or ())
        return 1 if self.kind == "numeric" else None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind}
        if self.names is not None:
            data["names"] = list(self.names)
        if self.none is not None:
            data["none"] = self.none
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabelEncoding:
        names = data.get("names")
        return cls(data["kind"], tuple(names) if names is not None else None, data.get("none"))


Given = Mapping[str, "LabelValue"]  # the labels drawn before this one, by name


class _Label(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def parents(self) -> tuple[str, ...]:
        """The labels this one's distribution depends on (drawn before it)."""
        return ()

    def prompt_form(self, value: LabelValue) -> object:
        """The value as a prompt template shows it."""
        return value

    def to_stored(self, value: LabelValue) -> object:
        """The Parquet cell of a value (a categorical is stored as its class index; its
        `LabelEncoding.from_stored` reads it back)."""
        return value

    def caption(self, value: LabelValue) -> str:
        """The value as a preview caption shows it."""
        return f"{value:.4g}" if isinstance(value, float) else str(value)


class Categorical(_Label):
    dist: Literal["categorical"]
    values: dict[str, Weight]

    storage: ClassVar[Storage] = "class"

    @model_validator(mode="after")
    def _some_category(self) -> Categorical:
        if not self.values:
            raise FieldError("values", "values must name at least one category")
        return self

    def probabilities(self) -> dict[str, float]:
        total = sum(self.values.values())
        return {value: weight / total for value, weight in self.values.items()}

    def sample(self, rng: np.random.Generator, given: Given | None = None) -> str:
        names = list(self.values)
        return names[int(rng.choice(len(names), p=list(self.probabilities().values())))]

    def describe(self) -> str:
        return ", ".join(f"{v}: {p:.3g}" for v, p in self.probabilities().items())

    def widest_values(self) -> list[LabelValue]:
        """Values among which is the one with the longest prompt text (for the token limit)."""
        return list(self.values)

    def check(self, value: object) -> str:
        # Messages here never quote the value: it is a cohort cell, and may be anything.
        if str(value) not in self.values:
            raise ValueError(f"not one of the declared categories ({', '.join(self.values)})")
        return str(value)

    def to_stored(self, value: LabelValue) -> int:
        return list(self.values).index(value)  # type: ignore[arg-type]

    def encoding(self) -> LabelEncoding:
        return LabelEncoding("categorical", tuple(self.values))

    def new_stats(self) -> Counts:
        return Counts()

    def add_to(self, stats: LabelStats, value: LabelValue, given: Given | None = None) -> None:
        stats.add(str(value))  # type: ignore[arg-type]

    def asked_shares(self) -> dict[str, float]:
        return self.probabilities()

    def summary(self, stats: LabelStats) -> list[SummaryRow]:
        return [(v, f"{p:.3f}", f"{stats.share(v):.3f}") for v, p in self.probabilities().items()]  # type: ignore[union-attr]


# A plain decimal number as a cohort table writes one: no `_`, no `inf`/`nan`, no hex.
_PLAIN_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


class _Numeric(_Label):
    dtype: Literal["int", "float"] = "float"

    @property
    def storage(self) -> Storage:  # type: ignore[override]
        return "int64" if self.dtype == "int" else "float64"

    def _cast(self, x: float) -> int | float:
        return int(round(x)) if self.dtype == "int" else float(x)

    def bounds(self) -> tuple[float, float]:
        """The declared [min, max] (infinite where a normal leaves a side open)."""
        raise NotImplementedError

    def sampling_bounds(self) -> tuple[float, float]:
        """The interval the sampler draws from: for integers, half a unit wider on each side,
        so rounding keeps every bound value in with its proper share of mass."""
        low, high = self.bounds()
        if self.dtype == "int":
            low = math.ceil(low) - 0.5 if math.isfinite(low) else low
            high = math.floor(high) + 0.5 if math.isfinite(high) else high
        return low, high

    def _check_integer_room(self) -> None:
        low, high = self.bounds()
        if self.dtype == "int" and math.isfinite(low) and math.isfinite(high):
            if math.ceil(low) > math.floor(high):
                raise FieldError("min", f"no integer lies in [{low:g}, {high:g}]")

    def check(self, value: object) -> int | float:
        """A plain decimal number (`45`, `-1.5`, `1e3`) inside the bounds; nothing is coerced.

        `float()` alone would take `4_5` as 45, `inf`, `nan` and padded text; an int label
        takes a whole number only (`45` or `45.0`): a fraction is refused, never rounded.
        """
        text = str(value).strip()
        number = float(text) if _PLAIN_NUMBER.fullmatch(text) else math.nan
        if not math.isfinite(number):
            raise ValueError("not a plain number")
        if self.dtype == "int" and not number.is_integer():
            raise ValueError("not a whole number (the label is an int)")
        low, high = self.bounds()
        if not low <= number <= high:
            raise ValueError(f"outside [{low:g}, {high:g}]")
        return self._cast(number)

    def encoding(self) -> LabelEncoding:
        return LabelEncoding("numeric")

    def widest_values(self) -> list[LabelValue]:
        """The ends of the range (a normal's open side: mean ± 4 std, where nearly all its mass
        is) and, for floats, the numbers just inside them: their repr has the most digits."""
        low, high = self.plot_range()
        if self.dtype == "int":
            return [math.ceil(low), math.floor(high)]
        return [low, high, math.nextafter(low, high), math.nextafter(high, low)]

    def within(self, low: float, high: float) -> _Numeric:
        """This distribution restricted to [low, high]: a balance cell's bin (inclusive)."""
        floor, ceiling = self.bounds()
        return self.model_copy(update={"min": max(floor, low), "max": min(ceiling, high)})

    def moments(self) -> tuple[float, float]:
        """Mean and standard deviation of what a correct sampler yields."""
        raise NotImplementedError

    def density(self, x: np.ndarray) -> np.ndarray:
        """The density the sampler draws from (integers: the continuous law before rounding)."""
        raise NotImplementedError

    def plot_range(self) -> tuple[float, float]:
        """Where the mass is: the bounds, or mean ± 4 std where a normal is open."""
        return self.bounds()

    def histogram_edges(self) -> list[float]:
        """Fixed bin edges, from the declaration alone, so shards' histograms add up."""
        low, high = self.plot_range()
        if self.dtype == "int":
            low, high = math.floor(low), math.ceil(high)
            step = max(1, math.ceil((high - low + 1) / 40))
            return [low - 0.5 + step * i for i in range(math.ceil((high - low + 1) / step) + 1)]
        if high <= low:
            high = low + 1
        return [low + (high - low) * i / 40 for i in range(41)]

    def new_stats(self) -> Moments:
        return Moments(self.histogram_edges())

    def add_to(self, stats: LabelStats, value: LabelValue, given: Given | None = None) -> None:
        stats.add(value)  # type: ignore[arg-type]

    def summary(self, stats: LabelStats) -> list[SummaryRow]:
        return moment_rows(self.moments(), self.bounds(), stats)  # type: ignore[arg-type]


def moment_rows(
    asked: tuple[float, float] | None, bounds: tuple[float, float], drawn: Moments
) -> list[SummaryRow]:
    low, high = bounds
    mean, std = (f"{v:.2f}" for v in asked) if asked else ("-", "-")
    return [
        ("mean", mean, f"{drawn.mean:.2f}"),
        ("std", std, f"{drawn.std:.2f}"),
        ("min", f"{low:g}", f"{drawn.low if drawn.n else math.nan:g}"),
        ("max", f"{high:g}", f"{drawn.high if drawn.n else math.nan:g}"),
    ]


class Uniform(_Numeric):
    dist: Literal["uniform"]
    min: LabelNumber
    max: LabelNumber

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if self.min > self.max:
            raise FieldError("min", f"min ({self.min:g}) is greater than max ({self.max:g})")
        self._check_integer_room()
        return self

    def bounds(self) -> tuple[float, float]:
        return self.min, self.max

    def sample(self, rng: np.random.Generator, given: Given | None = None) -> int | float:
        if self.dtype == "int":
            return int(rng.integers(math.ceil(self.min), math.floor(self.max) + 1))
        return float(rng.uniform(self.min, self.max))

    def describe(self) -> str:
        return f"uniform on [{self.min:g}, {self.max:g}] ({self.dtype})"

    def moments(self) -> tuple[float, float]:
        return (self.min + self.max) / 2, (self.max - self.min) / math.sqrt(12)

    def density(self, x: np.ndarray, given: Given | None = None) -> np.ndarray:
        low, high = self.sampling_bounds()
        if high <= low:
            return np.zeros_like(x)
        return np.where((x >= low) & (x <= high), 1.0 / (high - low), 0.0)


class LinearMean(BaseModel):
    """A mean that moves with labels drawn before it: `base + Σ per[label] × value`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: LabelNumber
    per: dict[str, LabelNumber]

    @model_validator(mode="after")
    def _names_a_label(self) -> LinearMean:
        if not self.per:
            raise FieldError("per", "per must name at least one label and its slope")
        return self

    def at(self, given: Given) -> float:
        return self.base + sum(slope * float(given[name]) for name, slope in self.per.items())  # type: ignore[arg-type]

    def describe(self) -> str:
        return f"{self.base:g}" + "".join(f" {k:+g}×{name}" for name, k in self.per.items())


class Normal(_Numeric):
    dist: Literal["normal"]
    mean: LabelNumber | LinearMean
    std: real(gt=0, le=MAX_MAGNITUDE)
    min: LabelNumber | None = None
    max: LabelNumber | None = None

    @model_validator(mode="after")
    def _valid(self) -> Normal:
        low, high = self.bounds()
        if low > high:
            raise FieldError("min", f"min ({low:g}) is greater than max ({high:g})")
        self._check_integer_room()
        if isinstance(self.mean, float):  # a moving mean is checked against its parents' range
            self.check_mass(self.mean, "max")
        return self

    def check_mass(self, mean: float, field: str) -> None:
        """[min, max] must hold some mass of the normal at `mean` (integers: what rounds in)."""
        low, high = self.sampling_bounds()
        dist = NormalDist(mean, self.std)
        if dist.cdf(high) - dist.cdf(low) < 1e-9:
            raise FieldError(field, f"[min, max] holds no probability mass at mean {mean:g}")

    def parents(self) -> tuple[str, ...]:
        return tuple(self.mean.per) if isinstance(self.mean, LinearMean) else ()

    def mean_at(self, given: Given | None) -> float:
        return self.mean.at(given or {}) if isinstance(self.mean, LinearMean) else self.mean

    def bounds(self) -> tuple[float, float]:
        low = -math.inf if self.min is None else self.min
        high = math.inf if self.max is None else self.max
        return low, high

    def sample(self, rng: np.random.Generator, given: Given | None = None) -> int | float:
        # Exact truncation by inverse CDF: clipping would pile probability mass on the bounds.
        dist = NormalDist(self.mean_at(given), self.std)
        low, high = self.sampling_bounds()
        u = float(rng.uniform(dist.cdf(low), dist.cdf(high)))
        x = min(max(dist.inv_cdf(min(max(u, 1e-300), 1 - 1e-16)), low), high)
        if self.dtype == "int":
            return int(min(max(round(x), low + 0.5), high - 0.5))
        return float(x)

    def describe(self) -> str:
        low, high = self.bounds()
        bounds = (
            f", truncated to [{low:g}, {high:g}]" if (self.min, self.max) != (None, None) else ""
        )
        mean = self.mean.describe() if isinstance(self.mean, LinearMean) else f"{self.mean:g}"
        return f"normal(mean={mean}, std={self.std:g}){bounds} ({self.dtype})"

    def moments(self, given: Given | None = None) -> tuple[float, float]:
        """Mean and std of the normal truncated to [min, max] (at the parents' values `given`)."""
        unit = NormalDist()
        low, high = self.bounds()
        mean = self.mean_at(given)
        a, b = (low - mean) / self.std, (high - mean) / self.std
        mass = unit.cdf(b) - unit.cdf(a)
        pdf_a = unit.pdf(a) if math.isfinite(a) else 0.0
        pdf_b = unit.pdf(b) if math.isfinite(b) else 0.0
        shift = (pdf_a - pdf_b) / mass
        term_a = a * pdf_a if math.isfinite(a) else 0.0
        term_b = b * pdf_b if math.isfinite(b) else 0.0
        variance = 1 + (term_a - term_b) / mass - shift**2
        return mean + self.std * shift, self.std * math.sqrt(variance)

    def density(self, x: np.ndarray, given: Given | None = None) -> np.ndarray:
        low, high = self.sampling_bounds()
        dist = NormalDist(self.mean_at(given), self.std)
        mass = dist.cdf(high) - dist.cdf(low)
        inside = (x >= low) & (x <= high)
        return np.array([dist.pdf(v) / mass if ok else 0.0 for v, ok in zip(x, inside)])

    def new_stats(self) -> Moments | Fitted:  # type: ignore[override]
        if isinstance(self.mean, LinearMean):
            return Fitted(Moments(self.histogram_edges()), Regression(list(self.mean.per)))
        return Moments(self.histogram_edges())

    def add_to(self, stats: LabelStats, value: LabelValue, given: Given | None = None) -> None:
        if isinstance(stats, Fitted):
            stats.marginal.add(value)  # type: ignore[arg-type]
            stats.fit.add(float(value), [float(given[p]) for p in stats.fit.names])  # type: ignore[arg-type, index]
        else:
            stats.add(value)  # type: ignore[union-attr]

    def summary(self, stats: LabelStats) -> list[SummaryRow]:
        if not isinstance(stats, Fitted):
            return super().summary(stats)
        # A moving mean's marginal depends on its parents' law: drawn only (the fit is shown
        # in the conditional table).
        return [(value, "-" if value in ("mean", "std") else asked, drawn)
                for value, asked, drawn in moment_rows(None, self.bounds(), stats.marginal)]  # fmt: skip

    def plot_range(self) -> tuple[float, float]:
        low, high = self.bounds()
        if isinstance(self.mean, LinearMean):  # a moving mean: the bounds, where declared
            if math.isfinite(low) and math.isfinite(high):
                return low, high
            return max(low, self.mean.base - 4 * self.std), min(high, self.mean.base + 4 * self.std)
        return max(low, self.mean - 4 * self.std), min(high, self.mean + 4 * self.std)


class Constant(_Label):
    dist: Literal["constant"]
    value: integer(ge=-(10**15), le=10**15) | LabelNumber | str

    def sample(self, rng: np.random.Generator, given: Given | None = None) -> int | float | str:
        return self.value

    def describe(self) -> str:
        return f"always {self.value}"

    def widest_values(self) -> list[LabelValue]:
        return [self.value]

    def check(self, value: object) -> int | float | str:
        if str(value) != str(self.value):
            raise ValueError(f"differs from the declared constant {self.value}")
        return self.value

    @property
    def storage(self) -> Storage:  # type: ignore[override]
        return {int: "int64", float: "float64"}.get(type(self.value), "string")  # type: ignore[return-value]

    def encoding(self) -> LabelEncoding:
        return LabelEncoding("constant")

    def new_stats(self) -> Counts:
        return Counts()

    def add_to(self, stats: LabelStats, value: LabelValue, given: Given | None = None) -> None:
        stats.add(str(value))  # type: ignore[arg-type]

    def asked_shares(self) -> dict[str, float]:
        return {str(self.value): 1.0}

    def summary(self, stats: LabelStats) -> list[SummaryRow]:
        share = stats.share(str(self.value))  # type: ignore[union-attr]
        return [(str(self.value), "1.000", f"{share:.3f}")]


class Multilabel(_Label):
    dist: Literal["multilabel"]
    values: dict[str, Probability]
    none: str = "no finding"
    max_labels: integer(ge=1, le=10_000) | None = None
    join: str = ", "

    storage: ClassVar[Storage] = "list<string>"

    @model_validator(mode="after")
    def _probabilities(self) -> Multilabel:
        if not self.values:
            raise FieldError("values", "values must name at least one finding")
        if self.none in self.values:
            raise FieldError("none", f"none value '{self.none}' is also listed in values")
        return self

    def sample(self, rng: np.random.Generator, given: Given | None = None) -> list[str]:
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

    def caption(self, value: LabelValue) -> str:
        return value if isinstance(value, str) else self.as_text([str(f) for f in value])

    def widest_values(self) -> list[LabelValue]:
        """No finding, and the most a draw can hold: all, or the `max_labels` longest names."""
        names = list(self.values)
        if self.max_labels is not None:
            longest = sorted(names, key=len, reverse=True)[: self.max_labels]
            names = [name for name in names if name in longest]  # a draw keeps declared order
        return [[], names]

    def describe(self) -> str:
        rates = ", ".join(f"{v}: {p:.3g}" for v, p in self.values.items())
        cap = f", at most {self.max_labels}" if self.max_labels else ""
        return f"independent findings ({rates}){cap}; '{self.none}' when none"

    def check(self, value: object) -> list[str]:
        if isinstance(value, str):
            parts = [] if value.strip() == self.none else value.split(self.join.strip() or ",")
            value = [p.strip() for p in parts if p.strip()]
        drawn = list(value)  # type: ignore[call-overload]
        if any(finding not in self.values for finding in drawn):
            raise ValueError(f"names a finding that is not declared ({', '.join(self.values)})")
        return drawn

    def encoding(self) -> LabelEncoding:
        return LabelEncoding("multilabel", tuple(self.values), self.none)

    def new_stats(self) -> Counts:
        return Counts()

    def add_to(self, stats: LabelStats, value: LabelValue, given: Given | None = None) -> None:
        stats.add(*(value or [self.none]))  # type: ignore[arg-type]

    def asked_shares(self) -> dict[str, float]:
        # Findings are independent draws, so "none" has probability prod(1 - p); a cap never
        # empties a draw.
        none = float(np.prod([1 - p for p in self.values.values()]))
        return {**self.values, self.none: none}

    def summary(self, stats: LabelStats) -> list[SummaryRow]:
        rows = [(v, f"{p:.3f}", f"{stats.share(v):.3f}") for v, p in self.values.items()]  # type: ignore[union-attr]
        return [*rows, (self.none, "-", f"{stats.share(self.none):.3f}")]  # type: ignore[union-attr]
