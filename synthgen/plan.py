"""The plan: a pure function of the recipe from splits to shards to per-sample specs.

Sample *i* (labels, prompt, seed, split, balance cell) depends on the recipe seed and *i* alone,
never on `num_samples`, the shard size, the worker count or the order in which shards run: that
is what makes resume, multi-GPU and Ray runs agree byte for byte, and what lets a corpus grow —
raising `num_samples` appends samples and leaves the committed ones as they are.

T2I samples are dealt to splits (and to balance cells) by an even interleaving of integer
weights (`Interleave`), so every prefix of the index sequence holds each split and each cell in
proportion, within one sample. With `balance`, indices come in rounds of one period of the cell
pattern (one sample per cell when the quotas are equal); whole rounds go to a split, so every
split holds exactly the same count of every cell.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np

from synthgen.cohort.rows import Cohort
from synthgen.errors import RecipeError
from synthgen.recipe.balance import Cell
from synthgen.recipe.joint import LabelModel
from synthgen.recipe.labels import LabelValue
from synthgen.recipe.prompts import render_prompt
from synthgen.recipe.schema import Recipe

_LABEL_STREAM, _IMAGE_STREAM, _COHORT_STREAM, _PART_STREAM = 0, 1, 2, 3
PLAN_VERSION = 2  # 1: contiguous split ranges (synthgen 0.1); 2: interleaved, extendable


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
    cell: str | None = None  # the balance cell, e.g. "sex=female; age [40, 60)"


@dataclass(frozen=True)
class ShardTask:
    """A shard: the samples of one split (and strength) with ranks [start, stop) in that
    group's index order."""

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


class Interleave:
    """Deal 0, 1, 2, … to groups with integer weights, evenly: group 0 takes every index where
    ⌈(i+1)·w0/W⌉ steps up (Bresenham, so it takes index 0), the others share the rest the same
    way, recursively. Among the first n indices group k holds its proportional share within one,
    and exactly that share when n is a multiple of the weights' total; `group`, `member` and
    `count` are exact integer arithmetic in O(groups)."""

    def __init__(self, weights: Sequence[int]):
        if not weights or min(weights) < 1:
            raise ValueError("weights must be positive integers")
        self.weights = [int(w) for w in weights]
        totals = [sum(self.weights[k:]) for k in range(len(self.weights))]
        self._levels = list(zip(self.weights, totals))  # (weight, it plus every later weight)

    def group(self, index: int) -> tuple[int, int]:
        """(group, rank of `index` within it)."""
        for k, (weight, total) in enumerate(self._levels):
            taken = _ceil_div((index + 1) * weight, total)
            if taken > _ceil_div(index * weight, total):
                return k, taken - 1
            index -= taken  # its rank among the indices the groups after k share
        raise AssertionError("unreachable: the last group takes every index left")

    def member(self, group: int, rank: int) -> int:
        """The index holding `rank` in `group` (inverse of `group`)."""
        weight, total = self._levels[group]
        index = rank * total // weight
        for weight, total in reversed(self._levels[:group]):
            index = _rest_member(weight, total, index)
        return index

    def count(self, group: int, n: int) -> int:
        """How many of the first `n` indices go to `group`."""
        for k, (weight, total) in enumerate(self._levels):
            taken = _ceil_div(n * weight, total)
            if k == group:
                return taken
            n -= taken
        return 0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _rest_member(weight: int, total: int, rank: int) -> int:
    """The index that is number `rank` among those a level's group leaves to the later ones."""
    left = lambda m: m - _ceil_div(m * weight, total)  # noqa: E731 - left among the first m
    m = (rank + 1) * total // (total - weight)
    while left(m) < rank + 1:
        m += 1
    while m > 1 and left(m - 1) >= rank + 1:
        m -= 1
    return m - 1


def share_weights(shares: Sequence[float]) -> list[int]:
    """Integer weights in the proportions of `shares` (decimal shares exactly)."""
    fractions = [Fraction(str(share)).limit_denominator(10**6) for share in shares]
    scale = math.lcm(*(f.denominator for f in fractions))
    return [int(f * scale) for f in fractions]


class T2ILayout:
    """Which split and which balance cell each index belongs to, and back."""

    def __init__(self, recipe: Recipe):
        self.split_names = list(recipe.splits)
        self.splits = Interleave(share_weights(list(recipe.splits.values())))
        self.cells: list[Cell] = recipe.cells()
        counts = [cell.count for cell in self.cells] or [1]
        unit = math.gcd(*counts)
        self.rounds_needed = (
            unit if self.cells else None
        )  # balanced: the quotas are this many rounds
        self.pattern = Interleave([c // unit for c in counts])
        self.period = sum(c // unit for c in counts)

    def split_of(self, index: int) -> tuple[str, int]:
        """(split, rank of `index` in it)."""
        round_, position = divmod(index, self.period)
        split, rank = self.splits.group(round_)
        return self.split_names[split], rank * self.period + position

    def cell_of(self, index: int) -> Cell | None:
        if not self.cells:
            return None
        return self.cells[self.pattern.group(index % self.period)[0]]

    def index(self, split: str, rank: int) -> int:
        round_rank, position = divmod(rank, self.period)
        return (
            self.splits.member(self.split_names.index(split), round_rank) * self.period + position
        )

    def split_count(self, split: str, total: int) -> int:
        """Samples of `split` among the first `total` indices."""
        rounds = self.splits.count(self.split_names.index(split), total // self.period)
        return rounds * self.period


def _rng(seed: int, index: int, stream: int, draw: int = 0) -> np.random.SeedSequence:
    # draw 0 keeps the two-part key every sample had before the quality gate existed
    key = (index, stream) if draw == 0 else (index, stream, draw)
    return np.random.SeedSequence(seed, spawn_key=key)


def _seed63(sequence: np.random.SeedSequence) -> int:
    high, low = sequence.generate_state(2, np.uint32)
    return ((int(high) << 32) | int(low)) & (2**63 - 1)


def image_seed(seed: int, index: int, stream: int = _IMAGE_STREAM) -> int:
    """63-bit seed for sample `index`'s torch.Generator."""
    return _seed63(_rng(seed, index, stream))


def attempt_seed(seed: int, index: int, attempt: int) -> int:
    """The seed of a quality gate's attempt `attempt` (≥ 1) at sample `index`; attempt 0 is the
    sample's own seed, so an image the gate accepts at once is the image an ungated run makes."""
    return _seed63(_rng(seed, index, _IMAGE_STREAM, attempt))


def split_counts(total: int, splits: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding, so the counts add up to `total` exactly (i2i patients)."""
    whole = sum(splits.values())  # validated to be 1 within rounding
    raw = {name: total * share / whole for name, share in splits.items()}
    counts = {name: math.floor(value) for name, value in raw.items()}
    leftover = total - sum(counts.values())
    by_remainder = sorted(splits, key=lambda name: counts[name] - raw[name])
    for name in by_remainder[:leftover]:
        counts[name] += 1
    return counts


def prompt_values(recipe: Recipe, labels: dict[str, LabelValue]) -> dict[str, object]:
    """Labels in the form the prompt shows them: multilabel findings joined, or the none value."""
    return {name: recipe.labels[name].prompt_form(value) for name, value in labels.items()}


def sample_key(recipe: Recipe, index: int) -> str:
    return f"{recipe.name}-{index:08d}"


def t2i_spec(
    recipe: Recipe,
    index: int,
    layout: T2ILayout,
    model: LabelModel,
    table: list[dict] | None = None,
    draw: int = 0,
) -> SampleSpec:
    """Sample `index` of a T2I run; with `table`, its labels are one resampled row of it.
    `draw` > 0: a quality gate's replacement, its labels drawn again (in the same cell)."""
    rng = np.random.Generator(np.random.PCG64(_rng(recipe.seed, index, _LABEL_STREAM, draw)))
    cell = layout.cell_of(index)
    if table:
        labels = dict(table[int(rng.integers(len(table)))])
    elif cell is not None:
        labels = model.draw(rng, fixed=cell.fixed, narrowed=cell.narrowed)
    else:
        labels = model.draw(rng)
    return SampleSpec(
        index=index,
        key=sample_key(recipe, index),
        split=layout.split_of(index)[0],
        seed=image_seed(recipe.seed, index),
        labels=labels,
        prompt=render_prompt(recipe.prompt, prompt_values(recipe, labels)),
        cell=cell.key if cell is not None else None,
    )


@dataclass(frozen=True)
class _I2ISample:
    row: int
    strength: float
    seed: int
    split: str


Block = tuple[float, int, int]  # (strength, repeat, cohort part): those rows once, split by split


class I2ILayout:
    """Which cohort row, strength and noise each i2i index is, laid out block by block.

    Patients are dealt to splits after a seeded shuffle, so keys reveal nothing of the cohort's
    order and a patient's images share a split. The manifest's rows come in parts: the rows an
    earlier run of the corpus planned (`parts`, their last row numbers) and those added after
    them. A block is one (strength, repeat) pass over one part's rows; the blocks an earlier run
    planned keep their place and new ones (a strength appended, a higher `repeats`, new rows)
    come after them, so a sweep or a cohort grows without renumbering a sample.
    """

    def __init__(
        self,
        recipe: Recipe,
        cohort: Cohort,
        earlier: Sequence[Block] = (),
        parts: Sequence[int] = (),
    ):
        last = max((row.row for row in cohort.rows), default=0)
        last = max(last, max((s.row for s in cohort.skipped), default=0))
        if parts and last < parts[-1]:
            raise RecipeError(
                f"OUT was planned over {parts[-1]} cohort rows and the manifest now has "
                f"{last}: a cohort can grow, not shrink (or pass --overwrite)",
                where="source.manifest",
            )
        self.parts = [*parts, last] if not parts or last > parts[-1] else list(parts)
        by_part = self._deal(recipe, cohort)
        wanted = [
            (s, r, p)
            for p in range(len(self.parts))
            for s in recipe.generation.strengths()
            for r in range(recipe.generation.repeats)
        ]
        earlier = [tuple(block) for block in earlier]
        gone = [block for block in earlier if block not in wanted]
        if gone:
            raise RecipeError(
                f"OUT holds samples at strength {gone[0][0]:g} (repeat {gone[0][1]}) that this "
                "recipe no longer asks for: a sweep can grow, not shrink (or pass --overwrite)",
                where="generation.strength",
            )
        self.blocks = earlier + [b for b in wanted if b not in earlier]
        self.samples: list[_I2ISample] = []
        self.groups: dict[tuple[str, float | None], list[int]] = {}
        for strength, repeat, part in self.blocks:
            for split, rows in by_part[part].items():
                group = self.groups.setdefault((split, strength), [])
                for row, position in rows:
                    # The same noise at every strength: a sweep then varies strength alone.
                    noise = image_seed(recipe.seed, position * 1000 + repeat, _COHORT_STREAM)
                    group.append(len(self.samples))
                    self.samples.append(_I2ISample(row.row, strength, noise, split))

    def _deal(self, recipe: Recipe, cohort: Cohort) -> list[dict[str, list]]:
        """Per part, per split: (row, position) in order. A patient keeps the split its first
        part gave it; a part's new patients are shuffled and dealt among themselves."""
        split_of: dict[str, str] = {}
        dealt, positions = [], 0
        for number, high in enumerate(self.parts):
            low = self.parts[number - 1] if number else 0
            rows = [row for row in cohort.rows if low < row.row <= high]
            new = [p for p in dict.fromkeys(row.patient_id for row in rows) if p not in split_of]
            key = (0, _COHORT_STREAM) if number == 0 else (number, _PART_STREAM)
            shuffle = np.random.Generator(np.random.PCG64(_rng(recipe.seed, *key)))
            order = [new[i] for i in shuffle.permutation(len(new))]
            start = 0
            for split, count in split_counts(len(order), recipe.splits).items():
                split_of.update((patient, split) for patient in order[start : start + count])
                start += count
            rank = {patient: i for i, patient in enumerate(order)}
            part: dict[str, list] = {split: [] for split in recipe.splits}
            for row in sorted(rows, key=lambda r: (rank.get(r.patient_id, -1), r.row)):
                part[split_of[row.patient_id]].append(row)
            placed = {split: [] for split in recipe.splits}
            for split, members in part.items():
                for row in members:
                    placed[split].append((row, positions))
                    positions += 1
            dealt.append(placed)
        return dealt


def shard_tasks(
    groups: dict[tuple[str, float | None], int], previous: Sequence[ShardTask], shard_size: int
) -> list[ShardTask]:
    """The earlier shards as they were, then new shards over each group's samples past them."""
    tasks = list(previous)
    for (split, strength), count in groups.items():
        kept = [t for t in previous if (t.split, t.strength) == (split, strength)]
        covered = max((t.stop for t in kept), default=0)
        if count < covered:
            raise RecipeError(
                f"OUT holds {covered} {split} samples and this recipe asks for {count}: a "
                "corpus can grow, not shrink (pass --overwrite to start again)",
                where="num_samples",
            )
        number = max((t.shard for t in kept), default=-1) + 1
        for shard, first in enumerate(range(covered, count, shard_size), number):
            tasks.append(ShardTask(split, shard, first, min(first + shard_size, count), strength))
    return tasks


class Plan:
    """The shards of a run and the spec of every sample in them.

    T2I needs the recipe alone (plus the rows of `labels_from`, if any); I2I also needs the cohort
    rows. `previous`: the shards an earlier run of the same corpus planned (from its run record,
    with its i2i `blocks`); they are kept as they are and the new samples go into shards after
    them, so raising `num_samples` (or adding strengths or repeats) renders only what is new.
    """

    def __init__(
        self,
        recipe: Recipe,
        cohort: Cohort | None = None,
        table: list[dict] | None = None,
        previous: Sequence[ShardTask] = (),
        blocks: Sequence[Block] = (),
        parts: Sequence[int] = (),
    ):
        self.recipe = recipe
        self.table = table
        self.cohort = cohort
        self.model = LabelModel(recipe.labels)
        if recipe.generation.mode == "i2i":
            if cohort is None:
                raise ValueError("an i2i plan needs the cohort")
            self.layout, self.i2i = None, I2ILayout(recipe, cohort, blocks, parts)
            sizes = {group: len(indices) for group, indices in self.i2i.groups.items()}
        else:
            self.layout, self.i2i = T2ILayout(recipe), None
            total = recipe.sample_count()
            if self.layout.rounds_needed is not None:
                self._check_balanced_splits(self.layout)
            sizes = {(s, None): self.layout.split_count(s, total) for s in recipe.splits}
            if not all(sizes.values()):
                self._refuse_empty_split(self.layout, sizes, total)
        self.tasks = shard_tasks(sizes, previous, recipe.shard_size)

    @property
    def total(self) -> int:
        return sum(task.size for task in self.tasks)

    @property
    def blocks(self) -> list[Block]:
        return list(self.i2i.blocks) if self.i2i is not None else []

    @property
    def parts(self) -> list[int]:
        return list(self.i2i.parts) if self.i2i is not None else []

    def split_warnings(self) -> list[str]:
        """A split asked for that a small cohort leaves without a patient (patients, not images,
        are dealt: a patient's images share one split). Said, not refused: a trial on a few
        rows is meant to run; t2i refuses an empty split, as more samples always fill it."""
        if self.i2i is None:
            return []
        filled = {split for (split, _), indices in self.i2i.groups.items() if indices}
        empty = [split for split in self.recipe.splits if split not in filled]
        if not empty:
            return []
        rows = self.cohort.by_row
        patients = len({rows[sample.row].patient_id for sample in self.i2i.samples})
        return [
            f"splits: the cohort's {patients} patients leave split '{split}' without a patient, "
            f"so OUT has no '{split}' split; give it a larger share or add patients"
            for split in empty
        ]

    def layout_sha256(self, size: int | None = None) -> str | None:
        """Digest of which row, strength, split and noise the first `size` i2i indices are (all
        by default): a grown sweep must keep it. Row numbers and seeds only: no id, no path."""
        if self.i2i is None:
            return None
        samples = self.i2i.samples[: len(self.i2i.samples) if size is None else size]
        layout = [(s.row, s.strength, s.split, s.seed) for s in samples]
        return hashlib.sha256(json.dumps(layout).encode()).hexdigest()

    def indices(self, task: ShardTask) -> list[int]:
        if self.layout is not None:
            return [self.layout.index(task.split, rank) for rank in range(task.start, task.stop)]
        return self.i2i.groups[(task.split, task.strength)][task.start : task.stop]

    def specs(self, task: ShardTask) -> list[SampleSpec]:
        return [self.spec(index) for index in self.indices(task)]

    def spec(self, index: int) -> SampleSpec:
        """Sample `index` alone (what `synthgen sample` prints), without building its shard."""
        if self.layout is not None:
            return t2i_spec(self.recipe, index, self.layout, self.model, self.table)
        sample = self.i2i.samples[index]
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

    def attempt(self, spec: SampleSpec, attempt: int) -> SampleSpec:
        """What a quality gate renders for `spec` at attempt `attempt`: a new seed, a pure
        function of (recipe seed, index, attempt); with balance quotas and `on_fail: drop`,
        each run of max_attempts failures replaces the sample by a new draw of its cell."""
        if attempt == 0:
            return spec
        quality = self.recipe.quality
        draw = attempt // quality.max_attempts if quality is not None else 0
        if draw and self.layout is not None and self.layout.cells and quality.on_fail == "drop":
            spec = t2i_spec(self.recipe, spec.index, self.layout, self.model, self.table, draw)
        return replace(spec, seed=attempt_seed(self.recipe.seed, spec.index, attempt))

    def _refuse_empty_split(self, layout: T2ILayout, sizes: dict, total: int) -> None:
        """A split left empty would make the card's `load_dataset` configs fail later."""
        empty = next(split for (split, _), size in sizes.items() if size == 0)
        low, high = total, sum(layout.splits.weights) * layout.period  # all full at `high`
        while high - low > 1:  # the fewest samples that fill every split (counts only grow)
            middle = (low + high) // 2
            filled = all(layout.split_count(s, middle) for s in self.recipe.splits)
            low, high = (low, middle) if filled else (middle, high)
        raise RecipeError(
            f"{total} samples leave split '{empty}' empty: raise num_samples to at least {high} "
            "or drop the split",
            where="num_samples",
        )

    def _check_balanced_splits(self, layout: T2ILayout) -> None:
        """Every split must get at least one whole round of the cell pattern."""
        rounds = layout.rounds_needed
        for split in self.recipe.splits:
            if layout.split_count(split, rounds * layout.period) == 0:
                raise RecipeError(
                    f"split '{split}' would hold no sample: a balanced dataset is split by whole "
                    f"rounds of its {layout.period}-sample cell pattern and has {rounds} of them; "
                    "raise the quotas or give the split a larger share",
                    where="balance",
                )

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
            for index, sample in enumerate(self.i2i.samples)
        ]
