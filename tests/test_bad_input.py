"""Bad recipes as a careless user writes them: every one is exit code 2 and one line that names
the file and the field (or the YAML line), never a traceback, never a run that does the wrong
thing quietly.

The sweep takes every number in a set of real recipes (the shipped ones, a balanced one with
counts and with shares, a gated one, an i2i one over a demo cohort) and puts in its place NaN,
±inf, a huge value, a boolean and a string, which no number field may take, and a negative and
a zero, which some may: those must be accepted or refused naming the field. It runs the real
`synthgen validate` in-process (click's runner: the same command object the console script
calls) because it is hundreds of cases; the structural faults run as real subprocesses.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import ROOT, run_cli, small_recipe, write_recipe

from synthgen.cli import main
from synthgen.cohort.demo import make_cohort

VALUES: dict[str, Any] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 1e300,
                          "bool": True, "string": "many", "negative": -7, "zero": 0}  # fmt: skip
NEVER_A_NUMBER = ("nan", "inf", "-inf", "huge", "bool", "string")
SEEN: Counter = Counter()  # (kind, outcome) of every case, printed at the end of the sweep


class FourOutputs(torch.nn.Module):
    """Two logits for laterality, one age, one drusen logit: the gated base's checks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, -m, 50 + m, m], 1)


def _recipe_file(name: str) -> dict:
    return yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())


def _gated(model: Path) -> dict:
    recipe = small_recipe()
    recipe["quality"] = {
        "max_attempts": 2, "replacements": 3, "on_fail": "drop", "by": ["sex", "age"],
        "bins": {"age": [[40, 55], [55, 75]]},
        "checks": {"eye": {"model": str(model), "preprocess": {"size": 32},
                           "labels": {"laterality": {"columns": {"right": 0, "left": 1},
                                                     "threshold": 0.5},
                                      "age": {"columns": 2, "tolerance": 30},
                                      "findings": {"columns": {"drusen": 3},
                                                   "threshold": {"drusen": 0.4}}}}},
    }  # fmt: skip
    return recipe


def _balanced(quota: str) -> dict:
    recipe = small_recipe(splits={"train": 0.5, "test": 0.5})
    recipe.pop("num_samples")
    if quota == "count":
        cells = [{"cell": {"sex": "male", "age": [40, 55]}, "count": 6},
                 {"cell": {"sex": "female", "age": [55, 75]}, "count": 4}]  # fmt: skip
    else:
        recipe["num_samples"] = 20
        cells = [{"cell": {"sex": "male", "age": [40, 55]}, "share": 0.5},
                 {"cell": {"sex": "female", "age": [55, 75]}, "share": 0.5}]  # fmt: skip
    recipe["balance"] = {"by": ["sex", "age"], "bins": {"age": [[40, 55], [55, 75]]},
                         "cells": cells}  # fmt: skip
    return recipe


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, dict]:
    """Valid recipes that together hold every number field a recipe has."""
    folder = tmp_path_factory.mktemp("bases")
    model = folder / "four.pt"
    torch.jit.save(torch.jit.script(FourOutputs()), str(model))
    i2i = _recipe_file("demo-i2i")
    i2i["source"]["manifest"] = str(make_cohort(folder / "cohort", rows=4))
    i2i["source"]["max_rows"] = 4
    i2i["privacy"]["linkage"] = str(folder / "linkage.csv")
    i2i["generation"]["repeats"] = 2
    found = {name: _recipe_file(name) for name in ("demo", "cxr-t2i", "hpp-retina-t2i",
                                                   "cxr-balanced-t2i")}  # fmt: skip
    found.update(counts=_balanced("count"), shares=_balanced("share"), gated=_gated(model),
                 i2i=i2i, small=small_recipe())  # fmt: skip
    for name, recipe in found.items():
        result = _validate(folder / f"{name}.yaml", recipe)
        assert result.exit_code == 0, f"base {name} must be valid: {result.output}"
    return found


def _numbers(data: Any, path: tuple = ()) -> Iterator[tuple]:
    """The path of every number (not a boolean) in the recipe's data."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _numbers(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _numbers(value, (*path, i))
    elif isinstance(data, int | float) and not isinstance(data, bool):
        yield path


def _set(data: dict, path: tuple, value: Any) -> dict:
    changed = copy.deepcopy(data)
    node = changed
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return changed


def _validate(path: Path, recipe: dict):
    write_recipe(path, recipe)
    return CliRunner().invoke(main, ["validate", str(path)])


def _error_where(output: str, file: Path) -> tuple[str, list[str]]:
    """(the field the one error line names, every line of the output)."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    prefix = f"error: {file}: "
    assert errors[0].startswith(prefix), errors[0]
    return errors[0][len(prefix) :].split(": ")[0], lines


def _cases(bases: dict[str, dict]) -> list[tuple[str, tuple]]:
    """(base, path) of each number field once: a field two bases share is tried in the first."""
    seen, cases = set(), []
    for name, recipe in bases.items():
        for path in _numbers(recipe):
            shape = tuple("#" if isinstance(p, int) else p for p in path)
            if shape not in seen:
                seen.add(shape)
                cases.append((name, path))
    return cases


def _related(where: str, path: tuple) -> bool:
    """A field a valid-typed value can contradict: a sibling (min against max) or what holds
    it (a moving mean whose slope leaves [min, max] no mass), within the same section."""
    parent = ".".join(str(p) for p in path[:-1])
    field = ".".join(str(p) for p in path)
    return where.startswith(parent) or (where.count(".") >= 1 and field.startswith(where + "."))


def test_every_number_field_refuses_what_is_not_a_number_in_range(bases, tmp_path):
    cases = _cases(bases)
    assert len(cases) > 60, "the bases hold the recipe's number fields"
    fields_named = 0
    for name, path in cases:
        # a balance cell's bin is one value, [low, high]: the message names the pair
        named = path[:-1] if "cell" in path and isinstance(path[-1], int) else path
        field = ".".join(str(p) for p in named)
        for kind, value in VALUES.items():
            if kind == "string" and path[-1] == "value" and path[0] == "labels":
                continue  # a constant label may be a text
            file = tmp_path / f"{name}-{kind}.yaml"
            result = _validate(file, _set(bases[name], path, value))
            case = f"{name}: {field} = {kind}"
            assert result.exception is None or isinstance(result.exception, SystemExit), (
                f"{case}: {result.exception!r}"
            )
            assert "Traceback" not in result.output, case
            if kind in NEVER_A_NUMBER:
                assert result.exit_code == 2, f"{case} was accepted"
            else:
                assert result.exit_code in (0, 2), case
            if result.exit_code == 2:
                where, lines = _error_where(result.output, file)
                assert where == field or (kind not in NEVER_A_NUMBER and _related(where, path)), (
                    f"{case}: the message names {where}: {lines}"
                )
                fields_named += where == field
            SEEN[(kind, result.exit_code)] += 1
    print(f"\n{len(cases)} number fields × {len(VALUES)} values: {dict(SEEN)}")
    assert fields_named >= len(cases) * len(NEVER_A_NUMBER) - len(cases)


def _text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


BASE = """name: bad
num_samples: 12
shard_size: 4
splits: {train: 0.75, test: 0.25}
model: {base: tiny}
generation: {steps: 2, height: 64, width: 64}
prompt: "a {sex} eye, age {age}"
labels:
  sex: {dist: categorical, values: {male: 0.5, female: 0.5}}
  age: {dist: uniform, min: 20, max: 80, dtype: int}
"""

# (what is wrong, the recipe's text, the field or line the message must name, words it says)
STRUCTURAL = [
    ("a top-level key twice", BASE + "num_samples: 40\n", "line 11", "appears twice"),
    ("a label twice", BASE + "  sex: {dist: constant, value: x}\n", "line 11", "'sex' appears twice"),
    ("a category twice", BASE.replace("female: 0.5", "female: 0.5, male: 0.2"), "line 9",
     "'male' appears twice"),
    ("yes for a number", BASE.replace("num_samples: 12", "num_samples: yes"), "num_samples",
     "integer"),
    ("true for a number", BASE.replace("num_samples: 12", "num_samples: true"), "num_samples",
     "boolean"),
    ("true for steps", BASE.replace("steps: 2", "steps: true"), "generation.steps", "boolean"),
    ("true for a constant", BASE + "  site: {dist: constant, value: true}\n", "labels.site.value",
     "boolean"),
    ("a sexagesimal 1:30", BASE.replace("steps: 2", "steps: 1:30"), "generation.steps", "integer"),
    ("20,000 levels of nesting", BASE + "description: " + "[" * 20000 + "]" * 20000 + "\n",
     "line 11", "nested more than 64"),
    ("a split named all", BASE.replace("test: 0.25", "all: 0.25"), "splits", "reserved"),
    ("fewer samples than splits", BASE.replace("num_samples: 12", "num_samples: 1"),
     "num_samples", "leave split 'test' empty: raise num_samples to at least 4"),
    ("a format width of 2e9", BASE.replace("{age}", "{age:2000000000}"), "prompt",
     "width or precision over 100"),
    ("num_samples 1e30", BASE.replace("num_samples: 12", "num_samples: 1e30"), "num_samples",
     "integer"),
    ("num_samples 10^12", BASE.replace("num_samples: 12", "num_samples: 1000000000000"),
     "num_samples", "less than or equal to 100000000"),
    ("10^8 shards", BASE.replace("num_samples: 12", "num_samples: 100000000").replace(
        "shard_size: 4", "shard_size: 1"), "shard_size", "at most 100000"),
    ("a uniform int range of 1e30", BASE.replace("min: 20", "min: -1e30"), "labels.age.min",
     "greater than or equal to -1000000000000000"),
    ("a weight of 1e308", BASE.replace("male: 0.5,", "male: 1e308,"), "labels.sex.values.male",
     "less than or equal to 1000000000000000"),
    ("guidance_scale .inf", BASE.replace("steps: 2", "steps: 2, guidance_scale: .inf"),
     "generation.guidance_scale", "finite"),
    ("balance quotas past 10^8", BASE.replace("num_samples: 12\n", "").replace(
        "labels:", "balance: {by: [sex], per_cell: 90000000}\nlabels:"), "balance.per_cell",
     "at most 100000000"),
]  # fmt: skip
LORA = "{base: tiny, lora: {path: ./l.safetensors, scale: %s}}"
STRUCTURAL += [(f"lora.scale {value}", BASE.replace("{base: tiny}", LORA % value),
                "model.lora.scale", "finite") for value in (".nan", ".inf")]  # fmt: skip


@pytest.mark.parametrize("fault, text, where, words", STRUCTURAL, ids=[s[0] for s in STRUCTURAL])
def test_structural_faults_are_one_line_naming_where(tmp_path, fault, text, where, words):
    path = _text(tmp_path, text)
    result = run_cli("validate", str(path), check=False, timeout=120)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}: {where}: "), lines[0]
    assert words in lines[0], lines[0]


def test_yaml_means_what_it_says(tmp_path):
    """YAML 1.2 scalars: `yes` and `no` are texts (category names), `012` is twelve, `1e3` a
    number; the recipe hash sees the values, so both spellings of a value hash alike."""
    text = BASE.replace("{male: 0.5, female: 0.5}", "{yes: 0.5, no: 0.5}").replace(
        "{sex}", "{sex}{age:03d}"
    )
    plain = _text(tmp_path, text.replace("min: 20", "min: 12"))
    result = run_cli("sample", str(plain), "-n", "12", check=False)
    assert result.returncode == 0, result.stderr
    assert {line.split('"sex": "')[1][:2] for line in result.stdout.splitlines()} <= {"ye", "no"}
    octal = tmp_path / "octal.yaml"
    octal.write_text(text.replace("min: 20", "min: 012").replace("max: 80", "max: 8e1"))
    sha = [
        run_cli("validate", str(path)).stdout.split("sha256 ")[1][:12] for path in (plain, octal)
    ]
    assert sha[0] == sha[1]


GENERATE_TOO = [
    s
    for s in STRUCTURAL
    if s[0]
    in ("guidance_scale .inf", "lora.scale .nan", "fewer samples than splits", "10^8 shards")
]


@pytest.mark.parametrize(
    "fault, text, where, words", GENERATE_TOO, ids=[s[0] for s in GENERATE_TOO]
)
def test_generate_refuses_them_before_it_writes_anything(tmp_path, fault, text, where, words):
    """The faults that used to run (black images, an empty split, shard tasks filling memory)
    stop `generate` too, before OUT exists."""
    out = tmp_path / "out"
    result = run_cli("generate", str(_text(tmp_path, text)), "-o", str(out), check=False,
                     timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{where}: " in result.stderr and words in result.stderr
    assert not out.exists()
