"""The plan: splits, shards and per-sample specs are a pure function of the recipe and the index."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT, sample_in_background, sample_lines

from synthgen.cli import main
from synthgen.plan import (
    image_seed,
    plan_shards,
    sample_key,
    split_counts,
    split_of,
    t2i_spec,
)
from synthgen.recipe.schema import Recipe, recipe_from_dict
from synthgen.run.planning import build_plan

DEMO_PATH = ROOT / "recipes" / "demo.yaml"
DEMO = yaml.safe_load(DEMO_PATH.read_text())


def demo(**changes) -> Recipe:
    recipe = copy.deepcopy(DEMO)
    recipe["labels"]["findings"] = {
        "dist": "multilabel",
        "values": {"drusen": 0.3, "hemorrhage": 0.2},
        "max_labels": 1,
    }
    recipe["prompt"] += " with {findings}"
    recipe.update(changes)
    return recipe_from_dict(recipe)


# --- splits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "splits", "expected"),
    [
        (96, {"train": 0.75, "validation": 0.125, "test": 0.125}, [72, 12, 12]),
        (3, {"a": 0.55, "b": 0.45}, [2, 1]),  # remainders .65 and .35: a gets the spare
        (10, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, [4, 3, 3]),  # ties go in declared order
        (7, {"a": 0.1, "b": 0.2, "c": 0.7}, [1, 1, 5]),  # .7 .4 .9: the two largest win
        (1, {"train": 0.5, "test": 0.5}, [1, 0]),
    ],
)
def test_split_counts_by_largest_remainder(total, splits, expected):
    assert list(split_counts(total, splits).values()) == expected


def test_split_counts_always_add_up_and_round_by_largest_remainder():
    rng = np.random.default_rng(0)
    for _ in range(300):
        shares = rng.dirichlet(np.ones(rng.integers(1, 6)))
        shares[-1] = 1 - shares[:-1].sum()
        splits = {f"s{i}": float(share) for i, share in enumerate(shares)}
        total = int(rng.integers(1, 100_000))
        counts = split_counts(total, splits)
        assert sum(counts.values()) == total
        raw = {name: total * share for name, share in splits.items()}
        assert all(abs(counts[name] - raw[name]) < 1 for name in splits)
        rounded_up = [raw[n] - math.floor(raw[n]) for n in splits if counts[n] > math.floor(raw[n])]
        kept_down = [raw[n] - math.floor(raw[n]) for n in splits if counts[n] == math.floor(raw[n])]
        if rounded_up and kept_down:
            assert min(rounded_up) >= max(kept_down) - 1e-9


@pytest.mark.parametrize(
    ("num_samples", "splits"),
    [
        (2_000_000, {"train": 0.5, "test": 0.5000009}),  # plans 2,000,002 samples
        (100_000_000, {"train": 0.6, "test": 0.3999991}),  # plans 99,999,912 samples
    ],
)
def test_split_counts_add_up_for_shares_the_recipe_accepts(num_samples, splits):
    recipe = demo(num_samples=num_samples, splits=splits, shard_size=10_000_000)
    assert sum(split_counts(recipe.num_samples, recipe.splits).values()) == num_samples
    assert sum(task.size for task in plan_shards(recipe)) == num_samples


# --- shards ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shard_size", [1, 7, 32, 96, 1000])
@pytest.mark.parametrize("num_samples", [1, 96, 101])
def test_plan_covers_every_index_once_in_shards_of_at_most_shard_size(num_samples, shard_size):
    recipe = demo(num_samples=num_samples, shard_size=shard_size)
    tasks = plan_shards(recipe)
    covered = [i for task in tasks for i in range(task.start, task.stop)]
    assert sorted(covered) == list(range(num_samples))
    assert all(1 <= task.size <= shard_size for task in tasks)
    assert len({task.name for task in tasks}) == len(tasks)
    counts = split_counts(num_samples, recipe.splits)
    for split, count in counts.items():
        mine = [task for task in tasks if task.split == split]
        assert sum(task.size for task in mine) == count
        assert [task.shard for task in mine] == list(range(len(mine)))
        assert all(split_of(recipe, i) == split for t in mine for i in range(t.start, t.stop))
    assert sum(counts.values()) == num_samples


def test_plan_total_overrides_num_samples():
    tasks = plan_shards(demo(), total=10)
    assert sorted(i for t in tasks for i in range(t.start, t.stop)) == list(range(10))


def test_shard_size_changes_no_sample():
    def by_index(shard_size: int) -> dict:
        plan = build_plan(demo(shard_size=shard_size))
        return {s.index: s for task in plan.tasks for s in plan.specs(task)}

    small, large = by_index(5), by_index(1000)
    assert small.keys() == large.keys() == set(range(96))
    assert small == large  # split, seed, labels and prompt, sample by sample


# --- determinism -----------------------------------------------------------------------------


def test_a_sample_depends_on_seed_and_index_alone():
    recipe = demo()
    forward = [t2i_spec(recipe, i, "train") for i in range(40)]
    backward = [t2i_spec(recipe, i, "train") for i in reversed(range(40))][::-1]
    assert forward == backward
    # the same index in a much longer run, or in another split, draws the same labels
    longer = demo(num_samples=1_000_000, shard_size=7)
    assert [t2i_spec(longer, i, "test").labels for i in range(40)] == [s.labels for s in forward]
    assert len({s.seed for s in forward}) == 40
    assert all(0 <= s.seed < 2**63 for s in forward)


def test_a_different_seed_changes_labels_and_image_seeds():
    one, other = demo(seed=1), demo(seed=2)
    labels_one = [t2i_spec(one, i, "train").labels for i in range(40)]
    labels_other = [t2i_spec(other, i, "train").labels for i in range(40)]
    differing = sum(a != b for a, b in zip(labels_one, labels_other))
    assert differing >= 30  # ages alone differ by chance only ~3% of the time
    assert image_seed(1, 0) != image_seed(2, 0) and image_seed(1, 0) != image_seed(1, 1)


def test_keys_are_name_dash_eight_digits_without_a_dot():
    recipe = demo(name="hpp-retina_v2")
    assert sample_key(recipe, 0) == "hpp-retina_v2-00000000"
    assert sample_key(recipe, 12_345) == "hpp-retina_v2-00012345"
    keys = [t2i_spec(recipe, i, "train").key for i in range(50)]
    assert len(set(keys)) == 50
    assert all(re.fullmatch(r"hpp-retina_v2-\d{8}", key) and "." not in key for key in keys)


# --- the real CLI: `synthgen sample --start` -------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def window_proc():
    """`synthgen sample --start 90 -n 20` of the demo recipe (96 samples) through the console
    script, started before the module's first test so it runs alongside them."""
    with sample_in_background(str(DEMO_PATH), "--start", "90", "-n", "20") as proc:
        yield proc


@pytest.fixture(scope="module")
def sample_runs(window_proc) -> tuple[list[dict], list[dict]]:
    """The longer run, `sample -n 200`, goes through the same command in-process."""
    longer = CliRunner().invoke(main, ["sample", str(DEMO_PATH), "-n", "200"])
    assert longer.exit_code == 0, longer.output
    window = sample_lines(window_proc)
    return [json.loads(line) for line in longer.stdout.splitlines()], window


def test_cli_sample_start_gives_the_labels_of_the_longer_run(sample_runs):
    longer, window = sample_runs
    assert [line["index"] for line in window] == list(range(90, 110))
    for line in window:
        same = longer[line["index"]]
        assert (line["key"], line["labels"], line["prompt"]) == (
            same["key"],
            same["labels"],
            same["prompt"],
        )
    recipe = recipe_from_dict(copy.deepcopy(DEMO))
    for line in longer[:96]:
        spec = t2i_spec(recipe, line["index"], line["split"])
        assert (spec.key, spec.labels, spec.prompt) == (line["key"], line["labels"], line["prompt"])


def test_cli_sample_start_gives_the_same_lines_and_the_plans_split(sample_runs):
    longer, window = sample_runs
    assert window == longer[90:110]
    recipe = recipe_from_dict(copy.deepcopy(DEMO))
    assert [line["split"] for line in longer[:96]] == [split_of(recipe, i) for i in range(96)]
