"""Label design: conditional distributions and exact quotas, drawn over thousands of samples
through `synthgen sample`, generated through the real pipeline, and refused when malformed."""

from __future__ import annotations

import copy
import json
import math
from statistics import NormalDist

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT, run_cli, write_recipe

from synthgen.cli import main
from synthgen.plan import Plan
from synthgen.recipe.schema import recipe_from_dict

BINS = [[18, 40], [40, 60], [60, 90]]
EFFUSION = [0.04, 0.10, 0.22]  # per age bin
CARDIOMEGALY = [0.02, 0.05, 0.12]
SBP = {"male": (100.0, 0.5), "female": (88.0, 0.7)}  # base, per year of age

CONDITIONAL = {
    "name": "design",
    "seed": 11,
    "num_samples": 4000,
    "shard_size": 500,
    "splits": {"train": 0.8, "test": 0.2},
    "model": {"base": "tiny"},
    "generation": {"steps": 2, "height": 64, "width": 64, "batch_size": 4},
    "prompt": "cxr age={age} gender={sex} bp={sbp} site={site} showing {findings}",
    "labels": {
        "sex": {"dist": "categorical", "values": {"male": 0.5, "female": 0.5}},
        "age": {"dist": "normal", "mean": 55, "std": 15, "min": 18, "max": 90, "dtype": "int"},
        "sbp": {
            "given": "sex",
            "cases": {
                sex: {
                    "dist": "normal",
                    "mean": {"base": base, "per": {"age": per}},
                    "std": 12,
                    "min": 80,
                    "max": 220,
                    "dtype": "int",
                }  # fmt: skip
                for sex, (base, per) in SBP.items()
            },
        },
        "site": {
            "given": "sex",
            "cases": {"male": {"dist": "categorical", "values": {"a": 0.8, "b": 0.2}}},
            "default": {"dist": "categorical", "values": {"a": 0.3, "b": 0.7}},
        },
        "findings": {
            "given": "age",
            "bins": BINS,
            "cases": [
                {"dist": "multilabel", "values": {"effusion": e, "cardiomegaly": c}}
                for e, c in zip(EFFUSION, CARDIOMEGALY)
            ],
        },
    },
}


def sampled(recipe: dict, tmp_path, n: int) -> list[dict]:
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = CliRunner().invoke(main, ["sample", str(path), "-n", str(n)])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def truncated_mean(mean: float, std: float, low: float, high: float) -> float:
    """Mean of a normal truncated to [low, high] (integers: the half-unit-wider interval)."""
    unit, a, b = NormalDist(), (low - 0.5 - mean) / std, (high + 0.5 - mean) / std
    return mean + std * (unit.pdf(a) - unit.pdf(b)) / (unit.cdf(b) - unit.cdf(a))


def within(drawn: list[float], expected: float, sd: float, z: float = 4.5) -> bool:
    return abs(np.mean(drawn) - expected) <= z * sd / math.sqrt(len(drawn))


def test_conditional_means_and_rates_follow_each_parent_value_and_bin(tmp_path):
    lines = sampled(CONDITIONAL, tmp_path, 4000)
    labels = [line["labels"] for line in lines]
    for sex, (base, per) in SBP.items():
        for low, high in BINS:
            group = [x for x in labels if x["sex"] == sex and low <= x["age"] < high]
            # asked: each sample's truncated-normal mean at its own age, averaged over the group
            expected = np.mean([truncated_mean(base + per * x["age"], 12, 80, 220) for x in group])
            assert within([x["sbp"] for x in group], expected, 12), (sex, low, high)
    for b, (low, high) in enumerate(BINS):
        group = [x for x in labels if low <= x["age"] < high or (b == 2 and x["age"] == 90)]
        for finding, rates in (("effusion", EFFUSION), ("cardiomegaly", CARDIOMEGALY)):
            hits = [finding in x["findings"] for x in group]
            p = rates[b]
            assert within(hits, p, math.sqrt(p * (1 - p))), (finding, low, high, np.mean(hits))
    for sex, p in (("male", 0.8), ("female", 0.3)):  # a case and the default
        hits = [x["site"] == "a" for x in labels if x["sex"] == sex]
        assert within(hits, p, math.sqrt(p * (1 - p))), sex


BALANCED = {
    **copy.deepcopy(CONDITIONAL),
    "name": "balanced",
    "num_samples": None,
    "shard_size": 10,
    "splits": {"train": 0.75, "test": 0.25},
    "balance": {"by": ["sex", "age", "findings"], "bins": {"age": BINS}, "per_cell": 40},
}
BALANCED.pop("num_samples")


def test_balance_gives_exact_counts_in_the_dataset_every_split_and_shard(tmp_path):
    recipe = recipe_from_dict(BALANCED)
    cells = recipe.cells()
    assert len(cells) == 2 * 3 * 3 and all(cell.count == 40 for cell in cells)
    lines = sampled(BALANCED, tmp_path, 720)
    assert recipe.sample_count() == 720
    by_cell: dict[str, list[dict]] = {}
    for line in lines:
        by_cell.setdefault(line["cell"], []).append(line)
    assert {cell: len(rows) for cell, rows in by_cell.items()} == {c.key: 40 for c in cells}
    for line in lines:  # a cell fixes its labels: the sample agrees with its cell
        sex, age, findings = line["cell"].split("; ")
        assert sex == f"sex={line['labels']['sex']}"
        low, high = (float(v) for v in age.removeprefix("age [").rstrip(")]").split(", "))
        assert low <= line["labels"]["age"] <= high
        assert findings == f"findings={', '.join(line['labels']['findings']) or 'no finding'}"
    for split, share in BALANCED["splits"].items():  # 40 per cell: 30 train, 10 test, exactly
        counts = {c.key: sum(1 for x in by_cell[c.key] if x["split"] == split) for c in cells}
        assert set(counts.values()) == {round(40 * share)}, split
    plan = Plan(recipe)
    for task in plan.tasks:  # interleaved: every shard holds its proportional share of each cell
        specs = plan.specs(task)
        for cell in cells:
            share = sum(spec.cell == cell.key for spec in specs)
            assert abs(share - task.size / len(cells)) <= 1, (task.name, cell.key)


def test_balance_by_counts_and_shares(tmp_path):
    counts = copy.deepcopy(BALANCED)
    counts["balance"] = {
        "by": ["sex"],
        "cells": [{"cell": {"sex": "male"}, "count": 30}, {"cell": {"sex": "female"}, "count": 10}],
    }
    lines = sampled(counts, tmp_path, 40)
    assert [x["labels"]["sex"] for x in lines].count("male") == 30 and len(lines) == 40
    shares = copy.deepcopy(counts)
    shares["num_samples"] = 60
    shares["balance"]["cells"] = [
        {"cell": {"sex": "male"}, "share": 0.25}, {"cell": {"sex": "female"}, "share": 0.75},
    ]  # fmt: skip
    lines = sampled(shares, tmp_path, 60)
    assert [x["labels"]["sex"] for x in lines].count("female") == 45 and len(lines) == 60


def test_samples_do_not_depend_on_shard_size(tmp_path):
    def specs(shard_size):
        plan = Plan(recipe_from_dict({**BALANCED, "shard_size": shard_size}))
        return {s.index: s for task in plan.tasks for s in plan.specs(task)}

    assert specs(7) == specs(1000)


def test_balanced_conditional_dataset_is_the_same_with_two_workers(tmp_path):
    small = copy.deepcopy(BALANCED)
    small["balance"] = {"by": ["sex", "age"], "bins": {"age": [[18, 50], [50, 90]]}, "per_cell": 4}
    small["shard_size"] = 3
    path = write_recipe(tmp_path / "small.yaml", small)
    run_cli("generate", str(path), "-o", str(tmp_path / "one"), "--device", "cpu")
    run_cli("generate", str(path), "-o", str(tmp_path / "two"), "--devices", "cpu",
            "--workers-per-device", "2")  # fmt: skip
    for name in sorted(p.name for p in (tmp_path / "one" / "parquet").iterdir()):
        one = pq.read_table(tmp_path / "one" / "parquet" / name).to_pylist()
        two = pq.read_table(tmp_path / "two" / "parquet" / name).to_pylist()
        assert one == two, name
    card = (tmp_path / "one" / "README.md").read_text()
    assert "Balance cells (exact quotas over sex, age)" in card
    assert "| sex=female; age [50, 90] | 4 | 4 |" in card
    assert "`sbp` by its parents:" in card and "| sex=male | mean: per age | 0.5 |" in card
    info = run_cli("info", str(tmp_path / "one")).stdout
    assert "| sex=male; age [18, 50) | 4 | 4 |" in info and "`site` by its parents" in info


def bad(change, **top) -> dict:
    recipe = copy.deepcopy(CONDITIONAL)
    change(recipe["labels"])
    recipe.update(top)
    return recipe


def sex_given_site(labels: dict) -> None:
    """sex given site while site is given sex: a cycle."""
    sexes = {"dist": "categorical", "values": {"male": 1, "female": 1}}
    labels["sex"] = {"given": "site", "cases": {"a": sexes, "b": sexes}}


MALFORMED = {
    "cycle": (bad(sex_given_site), "cycle"),
    "unknown-parent": (
        bad(lambda labels: labels["sbp"].update(given="weight")),
        "labels.sbp.given",
    ),
    "unknown-slope-parent": (
        bad(lambda labels: labels["sbp"]["cases"]["male"]["mean"].update(per={"bmi": 1})),
        "labels.sbp.cases.male.mean.per.bmi",
    ),
    "missing-case": (bad(lambda labels: labels["sbp"]["cases"].pop("female")), "labels.sbp.cases"),
    "case-not-a-category": (
        bad(lambda labels: labels["site"]["cases"].update(other=labels["site"]["default"])),
        "labels.site.cases.other",
    ),
    "bins-overlap": (
        bad(lambda labels: labels["findings"].update(bins=[[18, 45], [40, 60], [60, 90]])),
        "labels.findings.bins.1",
    ),
    "bins-gap": (
        bad(lambda labels: labels["findings"].update(bins=[[18, 40], [41, 60], [60, 90]])),
        "labels.findings.bins.1",
    ),
    "bins-short": (
        bad(lambda labels: labels["findings"].update(bins=[[18, 40], [40, 60], [60, 80]])),
        "labels.findings.bins",
    ),
    "cases-of-two-kinds": (
        bad(lambda labels: labels["site"].update(default={"dist": "constant", "value": "a"})),
        "labels.site.default",
    ),
    "quotas-over-num-samples": (
        {**BALANCED, "num_samples": 100},
        "balance.per_cell",
    ),
    "unbalanced-parent": (
        {**BALANCED, "balance": {"by": ["findings"], "per_cell": 5}},
        "balance.by",
    ),
    "numeric-without-bins": (
        {**BALANCED, "balance": {"by": ["sex", "age"], "per_cell": 5}},
        "balance.bins.age",
    ),
    "share-cells-without-num-samples": (
        {
            **BALANCED,
            "balance": {
                "by": ["sex"],
                "cells": [
                    {"cell": {"sex": "male"}, "share": 0.5},
                    {"cell": {"sex": "female"}, "share": 0.5},
                ],
            },
        },
        "balance.cells",
    ),  # fmt: skip
    "balance-with-labels-from": (
        {
            **BALANCED,
            "labels_from": {"table": "t.csv", "columns": {k: k for k in CONDITIONAL["labels"]}},
        },
        "balance",
    ),  # fmt: skip
    "split-without-a-round": (
        {**BALANCED, "balance": {"by": ["sex"], "per_cell": 1}},
        "balance",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_label_designs_exit_2_naming_the_field(tmp_path, case):
    recipe, field = MALFORMED[case]
    path = write_recipe(tmp_path / "bad.yaml", recipe)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, (case, result.output)
    assert "Traceback" not in result.output
    line = result.output.strip()
    assert "\n" not in line and field in line, (case, line)


def test_schema_describes_conditional_labels_and_balance():
    schema = json.loads(run_cli("schema").stdout)
    assert {"Conditional", "BalanceConfig", "LinearMean", "CellQuota"} <= set(schema["$defs"])


@pytest.mark.parametrize("name", ["hpp-retina-t2i", "cxr-t2i", "cxr-balanced-t2i"])
def test_shipped_recipes_use_the_label_design(name):
    recipe = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    loaded = recipe_from_dict(recipe)
    dependent = [n for n, spec in loaded.labels.items() if spec.parents()]
    assert dependent, name
    if name == "cxr-balanced-t2i":
        assert loaded.balance is not None and set(loaded.balance.by) >= {"sex", "age", "findings"}
