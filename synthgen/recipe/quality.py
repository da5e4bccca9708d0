"""The recipe's `quality:` section: named checks, each a model and the labels it checks, with the
rule that makes an image pass, and what to do with a sample whose every attempt fails.

    quality:
      max_attempts: 4              # images rendered per sample before on_fail decides
      on_fail: drop                # drop (not in the dataset) | keep (quality_passed false) | fail
      checks:
        xray:
          model: models/xrv-all.pt                 # TorchScript / exported program, or ARCH@WEIGHTS
          preprocess: {size: 224, grayscale: true, normalise: xrv}
          labels:
            findings: {columns: {effusion: 3, cardiomegaly: 10}, threshold: 0.5}
            age: {column: 18, tolerance: 16}
            sex: {columns: {male: 19, female: 20}, threshold: 0.8}

A categorical label passes when the predicted class is the one asked for (or, with `threshold`,
when the asked class's probability is at least that); a numeric label when |predicted − asked| ≤
`tolerance`; a multilabel finding by finding: predicted present (probability ≥ its threshold)
exactly when asked. Without `columns`, a check's labels take consecutive output columns in the
order listed (a categorical one per class, a multilabel one per finding, a number one), and the
model must have exactly that many outputs; with them, every label says where its outputs are.

Everything here is pure: the rules judge numbers; loading and running models is synthgen.render.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from synthgen.errors import FieldError
from synthgen.recipe.conditional import LabelSpec, bin_label, check_bins
from synthgen.recipe.joint import family, leaf
from synthgen.recipe.labels import LabelValue
from synthgen.recipe.numbers import MAX_MAGNITUDE, Flag, LabelNumber, Probability, integer, real

MODEL_PREFIXES = ("torchscript:", "torchvision:", "timm:", "xrv:")
# What a named architecture expects when the recipe does not say (a program file: unit, RGB).
KNOWN_PREPROCESS = {
    "torchvision:": {"size": 224, "grayscale": False, "normalise": "imagenet"},
    "timm:": {"size": 224, "grayscale": False, "normalise": "imagenet"},
    "xrv:": {"size": 224, "grayscale": True, "normalise": "xrv"},
}
Column = integer(ge=0, le=1_000_000)  # an index into a model's output vector
COLUMN_PREFIX = "quality_"  # every per-sample column and tar JSON key the gate adds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Preprocess(_Strict):
    """What the model is fed: a size × size image (bilinear, antialiased), one channel (luma) or
    three, as float in [0, 1] (`unit`), ImageNet-standardised, or TorchXRayVision's [-1024, 1024]."""

    size: integer(ge=8, le=4096) = 224
    grayscale: Flag = False
    normalise: Literal["unit", "imagenet", "xrv"] = "unit"


class LabelRule(_Strict):
    """How one label is read from a model's outputs and when it passes; which fields apply
    depends on the label's kind (checked against the recipe's labels)."""

    columns: Column | dict[str, Column] | None = None  # numeric: one; else class/finding -> column
    tolerance: real(ge=0, le=MAX_MAGNITUDE) | None = None  # numeric
    threshold: Probability | dict[str, Probability] | None = (
        None  # categorical: p(asked); multilabel: present
    )
    activation: Literal["softmax", "sigmoid", "none"] | None = None  # default by kind


class CheckConfig(_Strict):
    model: str
    preprocess: Preprocess | None = None  # default: what a named model expects, else Preprocess()
    labels: dict[str, LabelRule]

    def resolved_preprocess(self) -> Preprocess:
        if self.preprocess is not None:
            return self.preprocess
        for prefix, known in KNOWN_PREPROCESS.items():
            if self.model.startswith(prefix):
                return Preprocess(**known)
        return Preprocess()


class QualityConfig(_Strict):
    checks: dict[str, CheckConfig]
    max_attempts: integer(ge=1, le=1000) = 3
    on_fail: Literal["drop", "keep", "fail"] = "drop"
    # With balance quotas and on_fail drop: how many times a sample whose attempts all failed is
    # replaced by a new draw of its cell (another max_attempts each) before its shard fails.
    replacements: integer(ge=0, le=1000) = 5
    by: list[str] | None = None  # acceptance table cells; default: the balance's, else checked
    bins: dict[str, list[tuple[LabelNumber, LabelNumber]]] = {}  # numeric labels in `by`

    def attempt_limit(self, balanced: bool) -> int:
        """Attempts a sample may use in all (a balanced drop replaces instead of dropping)."""
        if balanced and self.on_fail == "drop":
            return self.max_attempts * (self.replacements + 1)
        return self.max_attempts

    def resolve_paths(self, absolute: Callable[[str], str]) -> QualityConfig:
        """Every check's model file (or WEIGHTS of ARCH@WEIGHTS) through `absolute`."""
        checks = {
            name: check.model_copy(update={"model": _map_model_path(check.model, absolute)})
            for name, check in self.checks.items()
        }
        return self.model_copy(update={"checks": checks})


def _map_model_path(model: str, absolute: Callable[[str], str]) -> str:
    for prefix in ("torchvision:", "timm:", "xrv:"):
        if model.startswith(prefix):
            arch, at, weights = model.removeprefix(prefix).partition("@")
            return f"{prefix}{arch}@{absolute(weights)}" if at and weights else model
    if model.startswith("torchscript:"):
        return "torchscript:" + absolute(model.removeprefix("torchscript:"))
    return absolute(model)


# --- rules bound to the recipe's labels -----------------------------------------------------------


@dataclass(frozen=True)
class LabelVerdict:
    """One label of one image: what the model said and whether that passes."""

    predicted: str | float | list[str]  # class, number, or the checked findings found present
    probability: float | list[float] | None  # p(asked class); per checked finding; None: numeric
    passed: bool


@dataclass(frozen=True)
class BoundRule:
    """A label rule resolved against its label: the output columns it reads, and how it judges."""

    label: str
    kind: str  # categorical | numeric | multilabel
    names: tuple[str, ...]  # classes or checked findings, in column order; () for a number
    columns: tuple[int, ...]
    activation: str
    thresholds: tuple[float, ...] | None  # categorical: (t,) or None (argmax); multilabel: per name
    tolerance: float | None

    def judge(self, outputs: np.ndarray, asked: Sequence[LabelValue]) -> list[LabelVerdict]:
        """Verdicts for a batch: `outputs` (B, W) float64 model outputs, `asked` the B values."""
        raw = outputs[:, list(self.columns)]
        if self.kind == "numeric":
            return [
                LabelVerdict(float(p), None, abs(float(p) - float(a)) <= self.tolerance)  # type: ignore[arg-type, operator]
                for p, a in zip(raw[:, 0], asked)
            ]
        if self.kind == "categorical":
            probs = _softmax(raw) if self.activation == "softmax" else raw
            verdicts = []
            for row, value in zip(probs, asked):
                predicted = self.names[int(np.argmax(row))]
                p = float(row[self.names.index(str(value))])
                ok = predicted == value if self.thresholds is None else p >= self.thresholds[0]
                verdicts.append(LabelVerdict(predicted, p, bool(ok)))
            return verdicts
        probs = 1 / (1 + np.exp(-raw)) if self.activation == "sigmoid" else raw
        verdicts = []
        for row, value in zip(probs, asked):
            present = [float(p) >= t for p, t in zip(row, self.thresholds)]  # type: ignore[arg-type]
            wanted = set(value)  # type: ignore[arg-type]
            ok = all(hit == (name in wanted) for name, hit in zip(self.names, present))
            found = [name for name, hit in zip(self.names, present) if hit]
            verdicts.append(LabelVerdict(found, [float(p) for p in row], ok))
        return verdicts


def _softmax(raw: np.ndarray) -> np.ndarray:
    shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class BoundCheck:
    name: str
    model: str
    preprocess: Preprocess
    rules: tuple[BoundRule, ...]
    width: int  # outputs the model needs: exactly this many when `exact`, else at least
    exact: bool

    def width_problem(self, width: int) -> str | None:
        """Why a model with `width` outputs cannot serve this check (None when it can)."""
        if self.exact and width != self.width:
            labels = ", ".join(f"{r.label} {len(r.columns)}" for r in self.rules)
            return (
                f"the model has {width} outputs, but its labels take {self.width} ({labels}); "
                "give each label its `columns` if the model has others"
            )
        if not self.exact and width < self.width:
            return f"the model has {width} outputs, but the columns go up to {self.width - 1}"
        return None


def bind_checks(quality: QualityConfig, labels: Mapping[str, LabelSpec]) -> list[BoundCheck]:
    """Every check bound to the recipe's labels; FieldError under `quality.` when one does not
    fit (an unknown label, a rule of another kind, columns that miss a class)."""
    if not quality.checks:
        raise FieldError("quality.checks", "name at least one check")
    for name in labels:
        if name.startswith(COLUMN_PREFIX):
            raise FieldError(
                f"labels.{name}", f"label names starting '{COLUMN_PREFIX}' are the gate's columns"
            )
    bound, stems = [], set()  # quality_CHECK_LABEL: one column name per check and label
    for check_name, check in quality.checks.items():
        where = f"quality.checks.{check_name}"
        if not re.fullmatch(r"[a-z][a-z0-9_]*", check_name):
            raise FieldError(where, "a check's name must be lowercase letters, digits and _")
        if not check.labels:
            raise FieldError(f"{where}.labels", "a check must check at least one label")
        explicit = [rule.columns is not None for rule in check.labels.values()]
        if any(explicit) and not all(explicit):
            raise FieldError(
                f"{where}.labels", "give every label its columns, or none (consecutive columns)"
            )
        rules, start = [], 0
        for label, rule in check.labels.items():
            if f"{check_name}_{label}" in stems:
                raise FieldError(
                    f"{where}.labels.{label}", "its columns would share another's name"
                )
            stems.add(f"{check_name}_{label}")
            bound_rule = _bind_rule(label, rule, labels, f"{where}.labels.{label}", start)
            start += len(bound_rule.columns)
            rules.append(bound_rule)
        exact = not any(explicit)
        width = start if exact else max(c for r in rules for c in r.columns) + 1
        bound.append(
            BoundCheck(
                check_name, check.model, check.resolved_preprocess(), tuple(rules), width, exact
            )  # fmt: skip
        )
    return bound


def _bind_rule(
    label: str, rule: LabelRule, labels: Mapping[str, LabelSpec], where: str, start: int
) -> BoundRule:
    if label not in labels:
        raise FieldError(where, f"'{label}' is not a label (labels: {', '.join(labels) or 'none'})")
    kind = family(labels[label])
    if kind == "constant":
        raise FieldError(where, f"'{label}' is a constant: there is nothing to check")
    if kind == "numeric":
        return _bind_numeric(label, rule, where, start)
    names = tuple(leaf(labels[label]).encoding().names or ())  # type: ignore[union-attr]
    if rule.tolerance is not None:
        raise FieldError(
            f"{where}.tolerance", f"tolerance is for numeric labels; '{label}' is {kind}"
        )
    columns, names = _named_columns(rule, names, kind, where, start)
    default = "softmax" if kind == "categorical" else "sigmoid"
    activation = rule.activation or default
    if activation not in (default, "none"):
        raise FieldError(f"{where}.activation", f"a {kind} label takes {default} or none")
    return BoundRule(label, kind, names, columns, activation,
                     _thresholds(rule, names, kind, where), None)  # fmt: skip


def _bind_numeric(label: str, rule: LabelRule, where: str, start: int) -> BoundRule:
    if rule.tolerance is None:
        raise FieldError(f"{where}.tolerance", f"numeric label '{label}' needs a tolerance")
    for field in ("threshold", "activation"):
        if getattr(rule, field) is not None:
            raise FieldError(f"{where}.{field}", f"a numeric label takes a tolerance, not {field}")
    column = start if rule.columns is None else rule.columns
    if not isinstance(column, int):
        raise FieldError(f"{where}.columns", "a numeric label reads one column: a number ≥ 0")
    return BoundRule(label, "numeric", (), (column,), "none", None, rule.tolerance)


def _named_columns(
    rule: LabelRule, names: tuple[str, ...], kind: str, where: str, start: int
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    if rule.columns is None:
        return tuple(range(start, start + len(names))), names
    if not isinstance(rule.columns, dict):
        raise FieldError(f"{where}.columns", f"a {kind} label maps each value to its column")
    for name in rule.columns:
        if name not in names:
            raise FieldError(
                f"{where}.columns.{name}", f"'{name}' is not one of {', '.join(names)}"
            )
    if kind == "categorical":
        missing = [name for name in names if name not in rule.columns]
        if missing:
            raise FieldError(f"{where}.columns", f"class '{missing[0]}' has no column")
    if len(set(rule.columns.values())) != len(rule.columns):
        raise FieldError(f"{where}.columns", "two values share a column")
    checked = tuple(name for name in names if name in rule.columns)  # the label's order
    return tuple(rule.columns[name] for name in checked), checked


def _thresholds(
    rule: LabelRule, names: tuple[str, ...], kind: str, where: str
) -> tuple[float, ...] | None:
    value = rule.threshold
    if kind == "categorical":
        if isinstance(value, dict):
            raise FieldError(f"{where}.threshold", "a categorical label takes one threshold")
        if value is None:
            return None
        return (value,)
    if isinstance(value, dict):
        for name in value:
            if name not in names:
                raise FieldError(f"{where}.threshold.{name}", f"'{name}' is not a checked finding")
        values = tuple(value.get(name, 0.5) for name in names)
    else:
        values = (0.5 if value is None else value,) * len(names)
    return values


# --- acceptance-table cells ------------------------------------------------------------------------


@dataclass(frozen=True)
class Grouping:
    """Which acceptance-table cell a sample's asked labels fall in: its categorical and
    multilabel values and its numeric labels' bins, keyed as balance cells are
    ("sex=female; age [40, 60); findings=effusion"), so a balanced recipe's cells line up."""

    labels: tuple[str, ...]
    specs: tuple[LabelSpec, ...]
    bins: tuple[tuple[tuple[float, float], ...] | None, ...]

    def cell(self, values: Mapping[str, LabelValue]) -> str:
        if not self.labels:
            return "all"
        parts = []
        for name, spec, bins in zip(self.labels, self.specs, self.bins):
            value = values[name]
            if bins is not None:
                parts.append(f"{name} {_bin_of(float(value), bins)}")  # type: ignore[arg-type]
            elif family(spec) == "multilabel":
                parts.append(f"{name}={leaf(spec).as_text(list(value))}")  # type: ignore[union-attr, arg-type]
            else:
                parts.append(f"{name}={value}")
        return "; ".join(parts)


def _bin_of(value: float, bins: tuple[tuple[float, float], ...]) -> str:
    for i, (low, high) in enumerate(bins):
        last = i == len(bins) - 1
        if low <= value < high or (last and value == high):
            return bin_label(low, high, last)
    return "outside the bins"


def grouping(
    quality: QualityConfig,
    labels: Mapping[str, LabelSpec],
    balance_by: Sequence[str] = (),
    balance_bins: Mapping[str, Sequence[tuple[float, float]]] | None = None,
) -> Grouping:
    """The cells of the acceptance table: `quality.by`, else the balance's labels, else every
    checked categorical and multilabel label."""
    bins = {**(balance_bins or {}), **quality.bins}
    if quality.by is not None:
        names, where = list(quality.by), "quality.by"
    elif balance_by:
        names, where = list(balance_by), "balance.by"
    else:
        checked = dict.fromkeys(label for c in quality.checks.values() for label in c.labels)
        names = [n for n in checked if n in labels and family(labels[n]) != "numeric"]
        where = "quality.by"
    for name, edges in quality.bins.items():
        if name not in names:
            raise FieldError(f"quality.bins.{name}", f"'{name}' is not in {where}")
        check_bins(edges, f"quality.bins.{name}", contiguous=False)
    specs, cuts = [], []
    for name in names:
        if name not in labels:
            raise FieldError(where, f"'{name}' is not a label")
        kind = family(labels[name])
        if kind == "numeric" and name not in bins:
            raise FieldError(
                f"quality.bins.{name}", f"numeric '{name}' needs bins: [[low, high], ...]"
            )
        specs.append(labels[name])
        cuts.append(
            tuple((float(lo), float(hi)) for lo, hi in bins[name]) if kind == "numeric" else None
        )
    return Grouping(tuple(names), tuple(specs), tuple(cuts))
