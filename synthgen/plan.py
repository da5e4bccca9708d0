"""The plan: a pure function of the recipe from splits to shards to per-sample specs.

Sample *i* (labels, prompt, seed, split) depends on the recipe seed and *i* alone, never on the
shard size, the worker count or the order in which shards run: that is what makes resume, multi-GPU
and Ray runs agree byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from synthgen.labels import LabelValue, Multilabel, sample_labels
from synthgen.prompts import render_prompt
from synthgen.recipe import Recipe

_LABEL_STREAM, _IMAGE_STREAM = 0, 1


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

    @property
    def name(self) -> str:
        return f"{self.split}-{self.shard:06d}"

    @property
    def size(self) -> int:
        return self.stop - self.start


def _rng(seed: int, index: int, stream: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(seed, spawn_key=(index, stream))


def image_seed(seed: int, index: int) -> int:
    """63-bit seed for sample `index`'s torch.Generator."""
    high, low = _rng(seed, index, _IMAGE_STREAM).generate_state(2, np.uint32)
    return ((int(high) << 32) | int(low)) & (2**63 - 1)


def split_counts(total: int, splits: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding, so the counts add up to `total` exactly."""
    raw = {name: total * share for name, share in splits.items()}
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
    values: dict[str, object] = {}
    for name, value in labels.items():
        spec = recipe.labels[name]
        values[name] = spec.as_text(value) if isinstance(spec, Multilabel) else value
    return values


def sample_key(recipe: Recipe, index: int) -> str:
    return f"{recipe.name}-{index:08d}"


def t2i_spec(recipe: Recipe, index: int, split: str) -> SampleSpec:
    rng = np.random.Generator(np.random.PCG64(_rng(recipe.seed, index, _LABEL_STREAM)))
    labels = sample_labels(recipe.labels, rng)
    return SampleSpec(
        index=index,
        key=sample_key(recipe, index),
        split=split,
        seed=image_seed(recipe.seed, index),
        labels=labels,
        prompt=render_prompt(recipe.prompt, prompt_values(recipe, labels)),
    )


def shard_specs(recipe: Recipe, task: ShardTask) -> list[SampleSpec]:
    return [t2i_spec(recipe, index, task.split) for index in range(task.start, task.stop)]
