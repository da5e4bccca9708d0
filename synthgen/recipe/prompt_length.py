"""How long a recipe's prompts can get in the text encoder's tokens, and which labels' text falls
past what it reads: CLIP reads 77 tokens, its start and end tokens among them, and diffusers cuts
the rest without a word, so a label written after the cut never reaches the model.

Torch-free: the caller brings the model's tokenizer as a token-counting function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from string import Formatter

from synthgen.recipe.conditional import LabelSpec

CountTokens = Callable[[str], int]  # a text's tokens, without the start and end tokens


@dataclass(frozen=True)
class PromptFit:
    tokens: int  # of the longest prompt the labels can fill the template with
    budget: int  # of a prompt the text encoder reads
    cut: tuple[str, ...]  # labels whose text can end past the budget, in template order


def prompt_fit(
    template: str, labels: Mapping[str, LabelSpec], count: CountTokens, budget: int
) -> PromptFit:
    """The template filled with every label's widest text, and the labels past `budget`.

    A label is past the cut if any of its places in the template ends past it: text cut in
    the middle tells the model something else.
    """
    prompt, cut = "", []
    for literal, field, spec, _ in Formatter().parse(template):
        prompt += literal
        if field is None:
            continue
        prompt += widest_text(labels[field], spec or "", count)
        if count(prompt) > budget and field not in cut:
            cut.append(field)
    return PromptFit(count(prompt), budget, tuple(cut))


def widest_text(label: LabelSpec, spec: str, count: CountTokens) -> str:
    """The text of the label with the most tokens (then characters) its draws can show."""
    texts = [format(label.prompt_form(value), spec) for value in label.widest_values()]
    return max(texts, key=lambda text: (count(text), len(text)))
