"""Bad command lines and environments: exit code 2 and one line naming the option, variable or
field, never a traceback; each runs the real CLI in a subprocess, as users see it.

click's own option checks (`click.IntRange`) print click's usual three lines instead (a Usage
line, a "Try … --help" line, and the "Error:" line naming the option): `click_refusal` accepts
exactly that shape and nothing more.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import get_args

import pytest
from conftest import LAUNCHER_VARS, i2i_recipe, run_cli, small_recipe, write_recipe

from synthgen.cohort.demo import make_cohort
from synthgen.errors import OptionError
from synthgen.recipe.schedulers import MIN_STEPS
from synthgen.recipe.schema import ModelConfig
from synthgen.render.prompt_tokenizer import byte_level_tokenizer, prompt_tokenizer
from synthgen.run.launch import parse_devices


def clean_env(**variables: str) -> dict[str, str]:
    """This process's environment without any launcher's rank variables, plus `variables`."""
    env = {
        k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")
    }
    return {**env, **variables}


def output_lines(result) -> list[str]:
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines()]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return [line for line in lines if line]


def refusal(*args: str, env: dict[str, str] | None = None) -> str:
    """The one `error:` line a refused command prints, after checking exit code 2."""
    result = run_cli(*args, check=False, env=env or clean_env())
    lines = output_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stdout + result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def click_refusal(*args: str) -> str:
    """click's refusal of an option value: Usage, Try, Error lines and exit 2; the Error line."""
    result = run_cli(*args, check=False, env=clean_env())
    lines = output_lines(result)
    assert result.returncode == 2 and len(lines) == 3, result.stdout + result.stderr
    assert lines[0].startswith("Usage: ") and lines[1].startswith("Try ")
    assert lines[2].startswith("Error: ")
    return lines[2]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    return write_recipe(tmp_path_factory.mktemp("bad-cli") / "unit.yaml", small_recipe())


@pytest.fixture(scope="module")
def i2i(tmp_path_factory) -> Path:
    """An i2i recipe over an 8-row cohort: 8 samples."""
    base = tmp_path_factory.mktemp("bad-cli-i2i")
    cohort = make_cohort(base / "cohort", rows=8)
    return write_recipe(base / "i2i.yaml", i2i_recipe(cohort, base / "linkage.csv"))


# --- 1. options and the launcher's environment ---------------------------------------------------


@pytest.mark.parametrize("devices", ["cuda:0", "0,1", "cuda", "cuda:7"])
def test_cuda_devices_on_a_machine_without_cuda_are_refused_before_any_work(
    recipe, tmp_path, devices
):
    out = tmp_path / "out"
    line = refusal("generate", str(recipe), "-o", str(out), "--devices", devices)
    assert line.startswith("error: --devices: ") and "no CUDA device is available" in line, line
    assert not out.exists()


@pytest.mark.parametrize("devices", ["cuda:x", "gpu", "0,,1", "cuda:-1"])
def test_a_devices_value_of_no_known_form_is_refused(recipe, tmp_path, devices):
    line = refusal("generate", str(recipe), "-o", str(tmp_path / "out"), "--devices", devices)
    assert line.startswith("error: --devices: use all, cpu"), line


def test_a_gpu_index_past_the_machines_count_names_the_count():
    with pytest.raises(OptionError) as refused:
        parse_devices("0,cuda:7", 1, cuda_count=2)
    assert refused.value.where == "--devices"
    assert "cuda:7" in refused.value.message and "2 CUDA devices" in refused.value.message
    assert parse_devices("0,cuda:1", 2, cuda_count=2) == ("cuda:0",) * 2 + ("cuda:1",) * 2


def slurm(task: str, count: str, first: str | None = None) -> dict[str, str]:
    """A SLURM array job's variables."""
    variables = {"SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_COUNT": count}
    return variables if first is None else {**variables, "SLURM_ARRAY_TASK_MIN": first}


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK"),
        ({"RANK": "0", "WORLD_SIZE": "abc"}, "WORLD_SIZE"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE"),
        ({"RANK": "1"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2"}, "RANK"),
        (slurm("x", "2"), "SLURM_ARRAY_TASK_ID"),
        (slurm("1", "two"), "SLURM_ARRAY_TASK_COUNT"),
        (slurm("1", "2", first="1.5"), "SLURM_ARRAY_TASK_MIN"),
        (slurm("7", "2", first="4"), "SLURM_ARRAY_TASK_ID"),  # indices 4 and 5 of --array=4-5
    ],
)
def test_a_bad_launcher_variable_is_named(recipe, tmp_path, variables, named):
    out = tmp_path / "out"
    line = refusal("generate", str(recipe), "-o", str(out), "--devices", "cpu",
                   env=clean_env(**variables))  # fmt: skip
    assert line.startswith(f"error: {named}: "), line
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--rank", "0"), "--world-size"),
        (("--world-size", "2"), "--rank"),
        (("--rank", "2", "--world-size", "2"), "--rank"),
    ],
)
def test_inconsistent_rank_flags_are_named(recipe, tmp_path, flags, named):
    line = refusal("generate", str(recipe), "-o", str(tmp_path / "out"), "--devices", "cpu", *flags)
    assert line.startswith(f"error: {named}: "), line


@pytest.mark.parametrize(
    ("flags", "named"),
    [(("--rank", "-1", "--world-size", "2"), "'--rank'"),
     (("--rank", "0", "--world-size", "0"), "'--world-size'")],
)  # fmt: skip
def test_out_of_range_rank_flags_are_clicks_refusal(recipe, tmp_path, flags, named):
    line = click_refusal("generate", str(recipe), "-o", str(tmp_path / "out"), *flags)
    assert named in line, line


@pytest.mark.parametrize(
    ("flags", "named"),
    [(("-n", "-5"), "'--num'"), (("-n", "0"), "'--num'"), (("--start", "-3"), "'--start'")],
)
def test_sample_refuses_a_count_or_start_below_its_range(recipe, flags, named):
    assert named in click_refusal("sample", str(recipe), *flags)


def test_sample_refuses_a_start_past_the_end_of_an_i2i_cohort(i2i):
    line = refusal("sample", str(i2i), "--start", "8")
    assert line.startswith("error: --start: ") and "8 samples" in line, line
    last = run_cli("sample", str(i2i), "--start", "7", "-n", "5")
    assert len(last.stdout.splitlines()) == 1  # a count past the end stops at the end


# --- 2. scheduler limits -------------------------------------------------------------------------


def test_every_scheduler_a_recipe_may_name_has_a_minimum():
    assert set(MIN_STEPS) == set(get_args(ModelConfig.model_fields["scheduler"].annotation))


@pytest.mark.parametrize("scheduler", sorted(MIN_STEPS))
def test_steps_below_a_schedulers_minimum_are_refused_at_validation(tmp_path, scheduler):
    least = MIN_STEPS[scheduler]
    recipe = small_recipe(model={"base": "tiny", "scheduler": scheduler})
    recipe["generation"]["steps"] = least - 1
    line = refusal("validate", str(write_recipe(tmp_path / "few.yaml", recipe)))
    assert "generation.steps" in line, line
    if least > 1:  # below 1 the field's own bound speaks first
        assert f"scheduler {scheduler} needs at least {least} steps" in line, line


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", sorted(MIN_STEPS))
def test_a_scheduler_renders_at_its_minimum_steps(tmp_path, scheduler):
    recipe = small_recipe(
        model={"base": "tiny", "scheduler": scheduler}, num_samples=1, splits={"train": 1.0}
    )
    recipe["generation"].update(steps=MIN_STEPS[scheduler], height=64, width=64)
    path = write_recipe(tmp_path / "least.yaml", recipe)
    result = run_cli("generate", str(path), "-o", str(tmp_path / "out"), "--devices", "cpu",
                     env=clean_env())  # fmt: skip
    assert "wrote 1 samples" in result.stdout, result.stderr


@pytest.mark.slow
def test_i2i_renders_one_denoising_step_at_pndms_minimum(tmp_path):
    """img2img runs int(steps × strength) of the scheduler's steps: 1 of pndm's 4 is enough."""
    recipe = i2i_recipe(make_cohort(tmp_path / "cohort", rows=1), tmp_path / "linkage.csv",
                        steps=MIN_STEPS["pndm"], strength=0.25)  # fmt: skip
    recipe["model"]["scheduler"] = "pndm"
    path = write_recipe(tmp_path / "i2i.yaml", recipe)
    result = run_cli("generate", str(path), "-o", str(tmp_path / "out"), "--devices", "cpu",
                     env=clean_env())  # fmt: skip
    assert "wrote 1 samples" in result.stdout, result.stderr


# --- 3. prompts longer than the text encoder reads -----------------------------------------------

LONG_VIEW = "a" * 50  # the tiny model's byte-level tokenizer: one token per letter
PAST_CUT = re.compile(r"labels past the cut: (.+)$")


def long_prompt_recipe() -> dict:
    """50 + 6 (female) + 4 (aged) + 2 (age) = 62 tokens fit the 75 the encoder reads after its
    start token; "showing" and the widest findings ("drusen, hemorrhage") pass 75."""
    recipe = small_recipe(prompt="{view} {sex} aged {age} showing {findings} {laterality}")
    recipe["labels"] = {"view": {"dist": "categorical", "values": {LONG_VIEW: 0.1, "pa": 0.9}},
                        **recipe["labels"]}  # fmt: skip
    return recipe


@pytest.mark.parametrize("command", ["validate", "sample"])
def test_labels_a_long_prompt_can_push_past_the_cut_are_named(tmp_path, command):
    path = write_recipe(tmp_path / "long.yaml", long_prompt_recipe())
    result = run_cli(command, str(path))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: prompt")]
    assert len(warnings) == 1, result.stderr
    assert PAST_CUT.search(warnings[0]).group(1) == "findings, laterality", warnings[0]


@pytest.mark.parametrize("command", ["validate", "sample"])
def test_a_short_prompt_gets_no_warning(recipe, command):
    result = run_cli(command, str(recipe))
    assert "warning" not in result.stderr, result.stderr


def test_the_tokenizer_is_a_local_pipelines_own_and_never_an_empty_stand_in(tmp_path):
    """Given a folder without a tokenizer's files, CLIPTokenizer makes an empty one (2 tokens,
    no length) instead of failing: such a model is left unchecked."""
    byte_level_tokenizer()[0].save_pretrained(tmp_path / "pipe" / "tokenizer")
    found = prompt_tokenizer(ModelConfig(base=str(tmp_path / "pipe")))
    assert found is not None and found.model_max_length == 77 and found.vocab_size == 514
    (tmp_path / "bare").mkdir()
    assert prompt_tokenizer(ModelConfig(base=str(tmp_path / "bare"))) is None
    assert prompt_tokenizer(ModelConfig(base="nobody/not-in-the-cache")) is None


def test_validate_says_when_the_prompt_length_could_not_be_checked(tmp_path):
    recipe = small_recipe(model={"base": "nobody/not-in-the-cache"})
    result = run_cli("validate", str(write_recipe(tmp_path / "hub.yaml", recipe)))
    assert "prompt: not checked against the text encoder's limit" in result.stdout, result.stdout
