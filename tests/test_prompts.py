"""Prompt templates: format fields over label names, nothing more, checked before rendering."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from synthgen.errors import RecipeError
from synthgen.plan import Plan, prompt_values
from synthgen.recipe.prompt_length import prompt_fit
from synthgen.recipe.prompts import render_prompt, template_fields
from synthgen.recipe.schema import recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())


def demo_with(prompt: str, **labels) -> dict:
    recipe = copy.deepcopy(DEMO)
    recipe["prompt"] = prompt
    recipe["labels"].update(labels)
    return recipe


# --- template_fields -------------------------------------------------------------------------


def test_fields_are_the_label_names_in_order():
    assert template_fields("{sex} {age} and {sex} again") == ["sex", "age", "sex"]
    assert template_fields("no fields at all") == []
    assert template_fields("literal {{braces}} stay") == []


@pytest.mark.parametrize("template", ["{sbp:.0f}", "{age:>3}", "{age:03d}", "{sbp:,}", "{x_1:^10}"])
def test_plain_format_specs_are_accepted(template):
    assert len(template_fields(template)) == 1


@pytest.mark.parametrize(
    "template",
    [
        "{age.__class__}",
        "{age.__class__.__init__.__globals__}",
        "{sex[0]}",
        "{age!r}",
        "{age!s}",
        "{age:{x}}",
        "{age:>{width}}",
        "{}",
        "{0}",
        "{age",
        "age}",
        "{not-a-name}",
    ],
)
def test_anything_beyond_a_bare_name_is_refused(template):
    with pytest.raises(ValueError, match="prompt"):
        template_fields(template)


# --- rendering -------------------------------------------------------------------------------


def test_render_fills_fields_and_applies_plain_specs():
    values = {"sbp": 121.6, "age": 7, "sex": "female"}
    assert render_prompt("bp {sbp:.0f}, age {age:03d}, {sex}", values) == "bp 122, age 007, female"
    assert render_prompt("{{literal}} {sex}", values) == "{literal} female"


def test_a_recipe_with_a_format_spec_renders_through_the_plan():
    recipe = recipe_from_dict(demo_with("age {age:>3} sbp {sbp:.1f} {laterality}"))
    spec = Plan(recipe).spec(3)
    labels = spec.labels
    assert spec.prompt == f"age {labels['age']:>3} sbp {labels['sbp']:.1f} {labels['laterality']}"


def test_multilabel_prompt_uses_join_and_none():
    findings = {
        "dist": "multilabel",
        "values": {"atelectasis": 0.5, "effusion": 0.5},
        "none": "no finding",
        "join": " and ",
    }
    recipe = recipe_from_dict(demo_with("chest x-ray demonstrating {findings}", findings=findings))
    shown = prompt_values(recipe, {"findings": ["atelectasis", "effusion"]})
    assert shown == {"findings": "atelectasis and effusion"}
    assert prompt_values(recipe, {"findings": []}) == {"findings": "no finding"}
    plan = Plan(recipe)
    prompts = {plan.spec(i).prompt for i in range(64)}
    assert "chest x-ray demonstrating atelectasis and effusion" in prompts
    assert "chest x-ray demonstrating no finding" in prompts
    assert "chest x-ray demonstrating ['atelectasis']" not in prompts


# --- validation through the recipe -----------------------------------------------------------


def test_a_template_naming_an_unknown_label_is_rejected_at_validation():
    with pytest.raises(RecipeError, match=r"\{diagnosis\}"):
        recipe_from_dict(demo_with("fundus with {diagnosis}"))


@pytest.mark.parametrize("template", ["{age.__class__}", "{sex[0]}", "{age!r}", "{age:{sex}}"])
def test_unsafe_templates_are_rejected_at_validation(template):
    with pytest.raises(RecipeError):
        recipe_from_dict(demo_with(template))


@pytest.mark.parametrize("template", ["{sex:.0f}", "{age:zz}"])
def test_a_format_spec_the_label_cannot_take_is_rejected_at_validation(template):
    with pytest.raises(RecipeError, match="prompt"):
        recipe = recipe_from_dict(demo_with(template))
        Plan(recipe, 0, "train")  # if validation let it through, it must render


# --- prompt_fit: the longest prompt and the labels past the text encoder's cut ----------------


def characters(text: str) -> int:
    """A stand-in tokenizer: one token per character that is not a space."""
    return len(text.replace(" ", ""))


def test_the_longest_prompt_takes_each_labels_widest_text():
    findings = {"dist": "multilabel", "values": {"a": 0.5, "bbb": 0.5, "cc": 0.5},
                "max_labels": 2, "none": "none", "join": "+"}  # fmt: skip
    sbp = {"dist": "uniform", "min": -5, "max": 3, "dtype": "float"}
    recipe = recipe_from_dict(
        demo_with("{laterality} {age:05d} {sbp} {sbp:.1f} {findings}", findings=findings, sbp=sbp)
    )
    fit = prompt_fit(recipe.prompt, recipe.labels, characters, budget=1000)
    # right, 00075, -4.999999999999999 (the widest float repr inside [-5, 3]), -5.0, bbb+cc
    assert fit.tokens == 5 + 5 + 18 + 4 + 6 and fit.cut == ()


def test_labels_whose_text_ends_past_the_budget_are_cut_in_template_order():
    recipe = recipe_from_dict(demo_with("{sex} {laterality} {age} {sex}"))
    # female (6), right (5): 11 tokens; age 75 ends at 13; sex again at 19
    assert prompt_fit(recipe.prompt, recipe.labels, characters, budget=13).cut == ("sex",)
    assert prompt_fit(recipe.prompt, recipe.labels, characters, budget=12).cut == ("age", "sex")
    assert prompt_fit(recipe.prompt, recipe.labels, characters, budget=19).cut == ()


def test_an_open_normal_reaches_four_std_and_a_conditional_every_case():
    age = {"dist": "normal", "mean": 50, "std": 30, "dtype": "int"}  # 50 - 120 = -70
    up_to = {"male": 9, "female": 12345}
    cases = {
        sex: {"dist": "uniform", "min": 0, "max": top, "dtype": "int"} for sex, top in up_to.items()
    }
    sbp = {"given": "sex", "cases": cases}
    recipe = recipe_from_dict(demo_with("{age} {sbp}", age=age, sbp=sbp))
    assert prompt_fit(recipe.prompt, recipe.labels, characters, budget=100).tokens == 3 + 5
