"""The plan: splits, shards and per-sample specs are a pure function of the recipe and the index."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT, sample_in_background, sample_lines

from synthgen.cli import main
from synthgen.errors import RecipeError
from synthgen.plan import Interleave, Plan, T2ILayout, image_seed, sample_key
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


def test_interleave_deals_every_index_once_evenly_and_inverts():
    rng = np.random.default_rng(0)
    for _ in range(200):
        weights = [int(w) for w in rng.integers(1, 12, rng.integers(1, 6))]
        deal = Interleave(weights)
        n = int(rng.integers(1, 300))
        ranks = [0] * len(weights)
        for index in range(n):
            group, rank = deal.group(index)
            assert rank == ranks[group] and deal.member(group, rank) == index
            ranks[group] += 1
            for k in range(len(weights)):  # every prefix holds each group in proportion
                assert deal.count(k, index + 1) == ranks[k]
                assert abs(ranks[k] - (index + 1) * weights[k] / sum(weights)) < len(weights)
        periods = n // sum(weights)
        for k, weight in enumerate(weights):  # exact at every whole period
            assert deal.count(k, periods * sum(weights)) == periods * weight


@pytest.mark.parametrize(
    ("total", "splits", "expected"),
    [
        (96, {"train": 0.75, "validation": 0.125, "test": 0.125}, [72, 12, 12]),
        (20, {"train": 0.8, "test": 0.2}, [16, 4]),
        (10, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, [4, 3, 3]),  # earlier splits round up
        (1, {"train": 0.5, "test": 0.5}, [1, 0]),
    ],
)
def test_split_counts_are_the_shares_of_every_prefix(total, splits, expected):
    layout = T2ILayout(demo(num_samples=total, splits=splits))
    assert [layout.split_count(split, total) for split in splits] == expected


@pytest.mark.parametrize(
    ("num_samples", "splits"),
    [
        (2_000_000, {"train": 0.5, "test": 0.5000009}),
        (100_000_000, {"train": 0.6, "test": 0.3999991}),
    ],
)
def test_split_counts_add_up_for_shares_the_recipe_accepts(num_samples, splits):
    recipe = demo(num_samples=num_samples, splits=splits, shard_size=10_000_000)
    layout = T2ILayout(recipe)
    assert sum(layout.split_count(split, num_samples) for split in splits) == num_samples
    assert Plan(recipe).total == num_samples


# --- shards ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shard_size", [1, 7, 32, 96, 1000])
@pytest.mark.parametrize("num_samples", [8, 96, 101])  # 8: the fewest that fill 6:1:1 splits
def test_plan_covers_every_index_once_in_shards_of_at_most_shard_size(num_samples, shard_size):
    plan = Plan(demo(num_samples=num_samples, shard_size=shard_size))
    covered = [i for task in plan.tasks for i in plan.indices(task)]
    assert sorted(covered) == list(range(num_samples))
    assert all(1 <= task.size <= shard_size for task in plan.tasks)
    assert len({task.name for task in plan.tasks}) == len(plan.tasks)
    for split in plan.recipe.splits:
        mine = [task for task in plan.tasks if task.split == split]
        assert [task.shard for task in mine] == list(range(len(mine)))
        indices = [i for task in mine for i in plan.indices(task)]
        assert indices == sorted(indices)  # a split's samples in index order
        assert all(plan.spec(i).split == split for i in indices)


def test_shard_size_changes_no_sample():
    def by_index(shard_size: int) -> dict:
        plan = build_plan(demo(shard_size=shard_size))
        return {s.index: s for task in plan.tasks for s in plan.specs(task)}

    small, large = by_index(5), by_index(1000)
    assert small.keys() == large.keys() == set(range(96))
    assert small == large  # split, seed, labels and prompt, sample by sample


def test_a_larger_corpus_keeps_every_sample_and_shard_of_the_smaller():
    small = Plan(demo(num_samples=40, shard_size=8))
    grown = Plan(demo(num_samples=80, shard_size=8), previous=small.tasks)
    fresh = Plan(demo(num_samples=80, shard_size=8))
    assert grown.tasks[: len(small.tasks)] == small.tasks  # committed shards stay as they are
    new = grown.tasks[len(small.tasks) :]
    assert sum(task.size for task in new) == 40
    old = {i for task in small.tasks for i in small.indices(task)}
    added = [i for task in new for i in grown.indices(task)]
    assert old == set(range(40)) and sorted(added) == list(range(40, 80))
    specs = lambda plan: {s.index: s for t in plan.tasks for s in plan.specs(t)}  # noqa: E731
    assert specs(grown) == specs(fresh)  # the same 80 samples as a fresh run, split and all
    with pytest.raises(RecipeError, match="grow, not shrink"):
        Plan(demo(num_samples=20, shard_size=8), previous=small.tasks)


# --- determinism -----------------------------------------------------------------------------


def spec_of(recipe: Recipe, index: int):
    return Plan(recipe).spec(index)


def test_a_sample_depends_on_seed_and_index_alone():
    recipe = demo()
    plan = Plan(recipe)
    forward = [plan.spec(i) for i in range(40)]
    backward = [plan.spec(i) for i in reversed(range(40))][::-1]
    assert forward == backward
    # the same index in a much longer run draws the same labels and lands in the same split
    longer = Plan(demo(num_samples=1_000_000, shard_size=70))
    assert [longer.spec(i) for i in range(40)] == forward
    assert len({s.seed for s in forward}) == 40
    assert all(0 <= s.seed < 2**63 for s in forward)


def test_a_different_seed_changes_labels_and_image_seeds():
    one, other = demo(seed=1), demo(seed=2)
    labels_one = [spec_of(one, i).labels for i in range(40)]
    labels_other = [spec_of(other, i).labels for i in range(40)]
    differing = sum(a != b for a, b in zip(labels_one, labels_other))
    assert differing >= 30  # ages alone differ by chance only ~3% of the time
    assert image_seed(1, 0) != image_seed(2, 0) and image_seed(1, 0) != image_seed(1, 1)


def test_keys_are_name_dash_eight_digits_without_a_dot():
    recipe = demo(name="hpp-retina_v2")
    assert sample_key(recipe, 0) == "hpp-retina_v2-00000000"
    assert sample_key(recipe, 12_345) == "hpp-retina_v2-00012345"
    keys = [spec_of(recipe, i).key for i in range(50)]
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
    plan = Plan(recipe_from_dict(copy.deepcopy(DEMO)))
    for line in longer[:96]:
        spec = plan.spec(line["index"])
        assert (spec.key, spec.labels, spec.prompt, spec.split) == (
            line["key"], line["labels"], line["prompt"], line["split"]
        )  # fmt: skip


def test_cli_sample_start_gives_the_same_lines_and_the_plans_split(sample_runs):
    longer, window = sample_runs
    assert window == longer[90:110]
    plan = Plan(recipe_from_dict(copy.deepcopy(DEMO)))
    assert [line["split"] for line in longer[:96]] == [plan.spec(i).split for i in range(96)]
