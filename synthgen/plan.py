"""The plan: a pure function of the recipe from splits to shards to per-sample specs.

Sample *i* (labels, prompt, seed, split) depends on the recipe seed and *i* alone, never on the
shard size, the worker count or the order in which shards run: that is what makes resume, multi-GPU
and Ray runs agree byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from synthgen.cohort.rows import Cohort
from synthgen.recipe.labels import LabelValue, sample_labels
from synthgen.recipe.prompts import render_prompt
from synthgen.recipe.schema import Recipe

_LABEL_STREAM, _IMAGE_STREAM, _COHORT_STREAM = 0, 1, 2


def strength_tag(strength: float) -> str:
    """`s0500` for strength 0.5: sortable, and free of dots (file and config names)."""
    return f"s{round(strength * 1000):04d}"


@dataclass(frozen=True)
class SampleSpec:
    index: int
    key: str
    split: str
    seed: int
    labels: dict[str, LabelValue]
    prompt: str
    source_row: int | None = field(default=None, repr=False)
    strength: float | None = None


@dataclass(frozen=True)
class ShardTask:
    """A shard: the samples of one split with global indices in [start, stop)."""

    split: str
    shard: int
    start: int
    stop: int
    strength: float | None = None  # i2i: every sample of a shard shares one strength

    @property
    def name(self) -> str:
        if self.strength is None:
            return f"{self.split}-{self.shard:06d}"
        return f"{self.split}-{strength_tag(self.strength)}-{self.shard:06d}"

    @property
    def size(self) -> int:
        return self.stop - self.start


def _rng(seed: int, index: int, stream: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(seed, spawn_key=(index, stream))


def image_seed(seed: int, index: int, stream: int = _IMAGE_STREAM) -> int:
    """63-bit seed for sample `index`'s torch.Generator."""
    high, low = _rng(seed, index, stream).generate_state(2, np.uint32)
    return ((int(high) << 32) | int(low)) & (2**63 - 1)


def split_counts(total: int, splits: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding, so the counts add up to `total` exactly."""
    whole = sum(splits.values())  # validated to be 1 within rounding
    raw = {name: total * share / whole for name, share in splits.items()}
    counts = {name: math.floor(value) for name, value in raw.items()}
    leftover = total - sum(counts.values())
    by_remainder = sorted(splits, key=lambda name: counts[name] - raw[name])
    for name in by_remainder[:leftover]:
        counts[name] += 1
    return counts


def split_ranges(total: int, splits: dict[str, float]) -> dict[str, tuple[int, int]]:
    ranges, start = {}, 0
    for name, count in split_counts(total, splits).items():
        ranges[name] = (start, start + count)
        start += count
    return ranges


def split_of(recipe: Recipe, index: int, total: int | None = None) -> str:
    total = recipe.num_samples if total is None else total
    for split, (start, stop) in split_ranges(total, recipe.splits).items():
        if start <= index < stop:
            return split
    return list(recipe.splits)[-1]


def plan_shards(recipe: Recipe, total: int | None = None) -> list[ShardTask]:
    """Every shard of the run, split by split; `total` defaults to the recipe's sample count."""
    total = recipe.num_samples if total is None else total
    tasks = []
    for split, (start, stop) in split_ranges(total, recipe.splits).items():
        for shard, first in enumerate(range(start, stop, recipe.shard_size)):
            tasks.append(ShardTask(split, shard, first, min(first + recipe.shard_size, stop)))
    return tasks


def prompt_values(recipe: Recipe, labels: dict[str, LabelValue]) -> dict[str, object]:
    """Labels in the form the prompt shows them: multilabel findings joined, or the none value."""
    return {name: recipe.labels[name].prompt_form(value) for name, value in labels.items()}


def sample_key(recipe: Recipe, index: int) -> str:
    return f"{recipe.name}-{index:08d}"


def t2i_spec(recipe: Recipe, index: int, split: str, table: list[dict] | None = None) -> SampleSpec:
    """Sample `index` of a T2I run; with `table`, its labels are one resampled row of it."""
    rng = np.random.Generator(np.random.PCG64(_rng(recipe.seed, index, _LABEL_STREAM)))
    if table:
        labels = dict(table[int(rng.integers(len(table)))])
    else:
        labels = sample_labels(recipe.labels, rng)
    return SampleSpec(
        index=index,
        key=sample_key(recipe, index),
        split=split,
        seed=image_seed(recipe.seed, index),
        labels=labels,
        prompt=render_prompt(recipe.prompt, prompt_values(recipe, labels)),
    )


@dataclass(frozen=True)
class _I2ISample:
    row: int
    strength: float
    seed: int
    split: str


class Plan:
    """The shards of a run and the spec of every sample in them.

    T2I needs the recipe alone (plus the rows of `labels_from`, if any); I2I also needs the cohort
    rows. I2I keys are numbered after a seeded shuffle of the patients, so a key reveals nothing
    about the cohort's order, and every image of one patient lands in one split.
    """

    def __init__(
        self, recipe: Recipe, cohort: Cohort | None = None, table: list[dict] | None = None
    ):
        self.recipe = recipe
        self.table = table
        self.cohort = cohort
        self._i2i: list[_I2ISample] = []
        if recipe.generation.mode == "i2i":
            if cohort is None:
                raise ValueError("an i2i plan needs the cohort")
            self.tasks = self._plan_i2i(cohort)
        else:
            self.tasks = plan_shards(recipe)

    @property
    def total(self) -> int:
        return sum(task.size for task in self.tasks)

    def specs(self, task: ShardTask) -> list[SampleSpec]:
        if self.recipe.generation.mode == "t2i":
            return [
                t2i_spec(self.recipe, i, task.split, self.table)
                for i in range(task.start, task.stop)
            ]
        return [self.spec(index) for index in range(task.start, task.stop)]

    def spec(self, index: int) -> SampleSpec:
        """Sample `index` alone (what `synthgen sample` prints), without building its shard."""
        if self.recipe.generation.mode == "t2i":
            return t2i_spec(self.recipe, index, split_of(self.recipe, index), self.table)
        sample = self._i2i[index]
        labels = self.cohort.by_row[sample.row].labels
        return SampleSpec(
            index=index,
            key=sample_key(self.recipe, index),
            split=sample.split,
            seed=sample.seed,
            labels=labels,
            prompt=render_prompt(self.recipe.prompt, prompt_values(self.recipe, labels)),
            source_row=sample.row,
            strength=sample.strength,
        )

    def _plan_i2i(self, cohort: Cohort) -> list[ShardTask]:
        recipe = self.recipe
        patients = list(dict.fromkeys(row.patient_id for row in cohort.rows))
        shuffle = np.random.Generator(np.random.PCG64(_rng(recipe.seed, 0, _COHORT_STREAM)))
        order = [patients[i] for i in shuffle.permutation(len(patients))]
        rows_of: dict[str, list] = {}
        for row in cohort.rows:
            rows_of.setdefault(row.patient_id, []).append(row)
        by_split, start = {}, 0
        for split, count in split_counts(len(order), recipe.splits).items():
            by_split[split] = [row for p in order[start : start + count] for row in rows_of[p]]
            start += count
        position = {
            row.row: i for i, row in enumerate(r for rows in by_split.values() for r in rows)
        }
        tasks: list[ShardTask] = []
        for strength in recipe.generation.strengths():
            for split, rows in by_split.items():
                first = len(self._i2i)
                for row in rows:
                    for repeat in range(recipe.generation.repeats):
                        # The same noise at every strength: a sweep then varies strength alone.
                        draw = position[row.row] * 1000 + repeat
                        noise = image_seed(recipe.seed, draw, _COHORT_STREAM)
                        self._i2i.append(_I2ISample(row.row, strength, noise, split))
                last = len(self._i2i)
                for shard, begin in enumerate(range(first, last, recipe.shard_size)):
                    stop = min(begin + recipe.shard_size, last)
                    tasks.append(ShardTask(split, shard, begin, stop, strength))
        return tasks

    def linkage(self) -> list[dict]:
        """key → source id rows for the separate linkage table (never written into OUT)."""
        rows = self.cohort.by_row
        return [
            {
                "key": sample_key(self.recipe, index),
                "source_id": rows[sample.row].source_id,
                "patient_id": rows[sample.row].patient_id,
                "source_row": sample.row,
                "strength": sample.strength,
            }
            for index, sample in enumerate(self._i2i)
        ]
