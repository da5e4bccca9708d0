"""Label summaries: what the recipe asked for beside what the shards hold, from merged statistics:
the marginal of every label, the conditional tables of dependent labels, the balance cells."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from synthgen.recipe.joint import LabelModel, summary
from synthgen.recipe.label_stats import LabelStats
from synthgen.recipe.schema import Recipe


@dataclass(frozen=True)
class LabelRow:
    label: str
    value: str  # category, finding or statistic
    asked: str
    drawn: str


def label_rows(recipe: Recipe, stats: Mapping[str, LabelStats]) -> list[LabelRow]:
    """One row per category, finding or statistic of every label."""
    model = LabelModel(recipe.labels)
    fresh = model.new_stats()
    return [
        LabelRow(name, *row)
        for name, spec in recipe.labels.items()
        for row in summary(spec, stats.get(name) or fresh[name])
    ]


def markdown_table(rows: list[LabelRow]) -> str:
    lines = ["| label | value | asked | drawn |", "|---|---|---|---|"]
    lines += [f"| {r.label} | {r.value} | {r.asked} | {r.drawn} |" for r in rows]
    return "\n".join(lines)


def conditional_markdown(recipe: Recipe, stats: Mapping[str, LabelStats]) -> str:
    """Per dependent label: asked vs drawn in each case of its parents ('' when none)."""
    blocks = []
    balanced = set(recipe.balance.by) if recipe.balance else set()
    for name, rows in LabelModel(recipe.labels).tables(stats):
        if name in balanced:  # its values come from the cells, shown below
            continue
        lines = [f"`{name}` by its parents:", "", "| case | value | asked | drawn |",
                 "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {case} | {value} | {asked} | {drawn} |" for case, value, asked, drawn in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def cells_markdown(recipe: Recipe, drawn: Mapping[str, int]) -> str:
    """The balance cells: asked count vs drawn count ('' without a balance)."""
    cells = recipe.cells()
    if not cells:
        return ""
    lines = ["| cell | asked | drawn |", "|---|---|---|"]
    lines += [f"| {cell.key} | {cell.count} | {drawn.get(cell.key, 0)} |" for cell in cells]
    return "\n".join(lines)


def labels_markdown(
    recipe: Recipe, stats: Mapping[str, LabelStats], cells: Mapping[str, int]
) -> str:
    """The card's and `info`'s label section: marginals, then conditionals and cells if any."""
    parts = [markdown_table(label_rows(recipe, stats))]
    conditional = conditional_markdown(recipe, stats)
    if conditional:
        parts.append("Conditional labels, asked vs drawn in each case:\n\n" + conditional)
    balance = cells_markdown(recipe, cells)
    if balance:
        parts.append(
            f"Balance cells (exact quotas over {', '.join(recipe.balance.by)}):\n\n{balance}"
        )
    return "\n\n".join(parts)
