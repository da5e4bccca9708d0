"""Recipe schema: every bad recipe is one `error:` line naming the file and field, exit code 2.

Bad recipes are the demo recipe with one thing broken, so each case fails for its own reason.
`validate` runs in-process (click's CliRunner) for every case. One case also runs through the
installed console script, which is what users see (and catches noise printed at import time),
and every case runs through it once more in a thread pool (about a second each).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from synthgen.cli import main
from synthgen.plan import Plan
from synthgen.recipe.schema import load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
SYNTHGEN = ROOT / ".venv" / "bin" / "synthgen"
DEMO_PATH = ROOT / "recipes" / "demo.yaml"
DEMO_TEXT = DEMO_PATH.read_text()
DEMO = yaml.safe_load(DEMO_TEXT)

MakeRecipe = Callable[[Path], Path]


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))  # label order matters: keep it
    return path


def changed(field: str, value: object = None, *, drop: bool = False) -> MakeRecipe:
    """The demo recipe with `field` (a dotted path) set to `value`, or removed."""

    def make(folder: Path) -> Path:
        recipe = copy.deepcopy(DEMO)
        *parents, last = field.split(".")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
        if drop:
            del node[last]
        else:
            node[last] = value
        return write(folder / "bad.yaml", recipe)

    return make


YAML_ERROR_LINE = next(
    n for n, line in enumerate(DEMO_TEXT.splitlines(), 1) if line.startswith("num_samples:")
)


def yaml_syntax_error(folder: Path) -> Path:
    path = folder / "bad.yaml"
    path.write_text(DEMO_TEXT.replace("num_samples: 96", "num_samples: 96: 3"))
    return path


def missing_file(folder: Path) -> Path:
    return folder / "absent.yaml"


NO_MIN = ("labels.age.min", "labels.age.max")

# (how to make the bad recipe, the field path(s) the error line must name; None: the file alone)
BAD_RECIPES = [
    pytest.param(yaml_syntax_error, f"line {YAML_ERROR_LINE}", id="yaml-syntax"),
    pytest.param(missing_file, None, id="file-not-found"),
    pytest.param(changed("colour", "red"), "colour", id="unknown-top-level-key"),
    pytest.param(changed("generation.foo", 1), "generation.foo", id="unknown-nested-key"),
    pytest.param(changed("labels.age.foo", 1), "labels.age.foo", id="unknown-label-key"),
    pytest.param(changed("seed", "abc"), "seed", id="seed-not-int"),
    pytest.param(changed("labels.age.std", "abc"), "labels.age.std", id="std-not-number"),
    pytest.param(changed("generation.height", 65), "generation.height", id="height-not-x8"),
    pytest.param(changed("num_samples", 0), "num_samples", id="num-samples-0"),
    pytest.param(changed("splits", {"train": 0.7, "test": 0.2}), "splits", id="splits-sum"),
    pytest.param(changed("prompt", drop=True), "prompt", id="prompt-missing"),
    pytest.param(changed("name", "demo.v2"), "name", id="name-with-dot"),
    pytest.param(
        changed("model.lora", {"path": "./nope.safetensors"}), "model.lora.path", id="lora-missing"
    ),
    pytest.param(changed("labels.age.std", 0), "labels.age.std", id="std-zero"),
    pytest.param(changed("labels.age.std", -2), "labels.age.std", id="std-negative"),
    pytest.param(changed("labels.age.min", 80), NO_MIN, id="normal-min>max"),
    pytest.param(
        changed("labels.u", {"dist": "uniform", "min": 5, "max": 1}),
        ("labels.u.min", "labels.u.max"),
        id="uniform-min>max",
    ),
    pytest.param(changed("labels.sex.values.male", 0), "labels.sex.values", id="weight-0"),
    pytest.param(changed("labels.sex.values.male", -1), "labels.sex.values", id="weight-negative"),
    pytest.param(
        changed("model.lora", {"path": "./x.safetensors", "alpha": 0}),
        "model.lora.alpha",
        id="lora-alpha-0",
    ),
    pytest.param(
        changed("model.lora", {"path": "./x.safetensors", "alpha": True}),
        "model.lora.alpha",
        id="lora-alpha-bool",
    ),
    pytest.param(changed("prompt", "fundus of {diagnosis}"), "prompt", id="prompt-unknown-label"),
    pytest.param(changed("prompt", "{age.__class__}"), "prompt", id="prompt-attribute"),
    pytest.param(
        changed("prompt", "{sex:.0f} eye"),
        "prompt",
        id="prompt-spec-vs-type",
    ),
    pytest.param(
        changed("labels.u", {"dist": "uniform", "min": 2.2, "max": 2.8, "dtype": "int"}),
        "labels.u",
        id="int-uniform-without-integer",
    ),
]
BAD_BY_ID = {param.id: param.values[0] for param in BAD_RECIPES}


def assert_one_error_line(returncode: int, stderr: str, path: Path, where) -> None:
    assert "Traceback" not in stderr
    assert returncode == 2, f"exit code {returncode}; stderr: {stderr!r}"
    assert len(stderr.splitlines()) == 1 and stderr.endswith("\n"), f"not one line: {stderr!r}"
    line = stderr.rstrip("\n")
    assert line.startswith(f"error: {path}: "), f"the line does not name the file: {line!r}"
    if where is None:
        return
    named = line.removeprefix(f"error: {path}: ").split(": ", 1)[0]
    wanted = (where,) if isinstance(where, str) else where
    assert any(named == w or named.startswith(w + ".") for w in wanted), (
        f"the line names {named!r}, not {' or '.join(wanted)}: {line!r}"
    )


@pytest.mark.parametrize(("make", "where"), BAD_RECIPES)
def test_bad_recipe_is_one_error_line_naming_the_field(make, where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative LoRA paths resolve here, where nothing exists
    path = make(tmp_path)
    result = CliRunner().invoke(main, ["validate", str(path)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"validate raised instead of exiting 2: {result.exception!r}")
    assert_one_error_line(result.exit_code, result.stderr, path, where)
    if make is BAD_BY_ID["lora-missing"]:
        return  # `sample` never loads the model, so it has nothing to say about the LoRA
    sampled = CliRunner().invoke(main, ["sample", str(path), "-n", "200"])
    if sampled.exception is not None and not isinstance(sampled.exception, SystemExit):
        raise AssertionError(f"sample raised instead of exiting 2: {sampled.exception!r}")
    assert_one_error_line(sampled.exit_code, sampled.stderr, path, where)


# --- hashing ---------------------------------------------------------------------------------

REFORMATTED = """\
# the demo recipe, every mapping in another order and style
labels:
  laterality:
    values: {"right": 0.5, left: 0.50}
    dist: categorical
  sex: {values: {male: .5, female: 5e-1}, dist: 'categorical'}
  age: {dtype: int, max: 75, min: 40, std: 11, mean: 52, dist: normal}
  sbp:
    dist: normal  # systolic blood pressure
    mean: 122.0
    std: 15
    min: 85
    max: 200
    dtype: int
output:
  image_format: png
  formats:
    - webdataset
    - parquet
generation:
  batch_size: 8
  width: 64
  height: 64
  guidance_scale: 7.5
  steps: 20
  mode: t2i
prompt: >-
  retina fundoscopy {laterality} eye dilated age={age} gender={sex} bp systolic={sbp}
model: {dtype: auto, scheduler: ddim, base: tiny}
splits:
  train: 0.75
  validation: 0.125
  test: 0.125
shard_size: 32
num_samples: 96
seed: 20261125
license: cc-by-4.0
description: "Demo run of synthgen on the built-in tiny model (random weights, noise images)."
name: demo
"""


def test_sha256_ignores_key_order_comments_and_style(tmp_path):
    reformatted = tmp_path / "reformatted.yaml"
    reformatted.write_text(REFORMATTED)
    demo = load_recipe(DEMO_PATH)
    assert len(demo.sha256()) == 64 and int(demo.sha256(), 16) >= 0
    assert load_recipe(reformatted).sha256() == demo.sha256()
    assert load_recipe(DEMO_PATH).sha256() == demo.sha256()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 20261126),
        ("num_samples", 97),
        ("labels.age.mean", 53),
        ("labels.sex.values.male", 0.6),
        ("prompt", "retina {laterality} {age} {sex} {sbp}"),
        ("generation.steps", 21),
        ("model.scheduler", "euler"),
    ],
)
def test_sha256_changes_when_a_value_changes(field, value, tmp_path):
    demo = load_recipe(DEMO_PATH)
    assert load_recipe(changed(field, value)(tmp_path)).sha256() != demo.sha256()


def test_to_yaml_round_trips_with_the_same_hash():
    demo = load_recipe(DEMO_PATH)
    again = recipe_from_dict(yaml.safe_load(demo.to_yaml()))
    assert again == demo and again.sha256() == demo.sha256()


def reordered(recipe: dict, field: str) -> dict:
    recipe = copy.deepcopy(recipe)
    *parents, last = field.split(".")
    node = recipe
    for part in parents:
        node = node[part]
    node[last] = dict(reversed(node[last].items()))
    return recipe


@pytest.mark.parametrize("field", ["labels", "labels.laterality.values", "splits"])
def test_recipes_with_one_hash_make_the_same_samples(field):
    one = recipe_from_dict(copy.deepcopy(DEMO))
    other = recipe_from_dict(reordered(DEMO, field))

    def samples(recipe):
        plan = Plan(recipe)
        specs = [plan.spec(i) for i in range(recipe.num_samples)]
        return [(s.split, s.labels, s.prompt) for s in specs]

    assert one.sha256() != other.sha256() or samples(one) == samples(other)


# --- the installed console script ------------------------------------------------------------


def test_validate_accepts_the_demo():
    result = CliRunner().invoke(main, ["validate", str(DEMO_PATH)])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    sha = load_recipe(DEMO_PATH).sha256()[:12]
    assert result.stdout.startswith(f"ok: {DEMO_PATH} (demo") and sha in result.stdout


def run_validate(path: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(SYNTHGEN), "validate", str(path)],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module", autouse=True)
def console_run(tmp_path_factory):
    """One real `synthgen validate` of a bad recipe, started before the first test so that its
    interpreter start-up overlaps them (`validate` is torch-free: tests/test_startup.py).
    The full list runs through the console script only with SYNTHGEN_SLOW_TESTS=1 (below)."""
    folder = tmp_path_factory.mktemp("console")
    path = BAD_BY_ID["lora-missing"](folder)
    proc = run_validate(path, folder)
    yield proc, path
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_console_script_bad_recipe_exits_2_with_one_line(console_run):
    # It fails after the LoRA check looked for the file: nothing else may print.
    proc, path = console_run
    out, err = proc.communicate(timeout=120)
    assert out == ""
    assert_one_error_line(proc.returncode, err, path, "model.lora.path")


def test_console_script_every_bad_recipe(tmp_path):
    def run(param) -> str | None:
        folder = tmp_path / param.id
        folder.mkdir()
        path = param.values[0](folder)
        proc = run_validate(path, folder)
        _, err = proc.communicate(timeout=300)
        try:
            assert_one_error_line(proc.returncode, err, path, param.values[1])
        except AssertionError as exc:
            return f"{param.id}: {exc}"
        return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        failures = [f for f in pool.map(run, BAD_RECIPES) if f]
    assert not failures, "\n".join(failures)


def test_schema_command_prints_the_recipe_json_schema():
    schema = json.loads(CliRunner().invoke(main, ["schema"]).output)
    assert schema["additionalProperties"] is False
    assert {"name", "prompt", "labels", "model", "generation", "source"} <= set(
        schema["properties"]
    )
    assert "normal" in json.dumps(schema["$defs"]["Normal"])
