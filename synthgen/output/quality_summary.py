"""The quality gate's tables, for the card and `synthgen info`: acceptance per check and label,
per label cell, the attempts histogram and where the seconds went. Text only."""

from __future__ import annotations

from synthgen.recipe.quality_stats import QualityTally, Rate
from synthgen.recipe.schema import Recipe


def _rate(rate: Rate | None) -> str:
    return "-" if rate is None or not rate.images else f"{rate.share:.3f}"


def acceptance_markdown(recipe: Recipe, tally: QualityTally) -> str:
    """Per check and label, per cell and per attempts count: rates over rendered images."""
    checks = list(recipe.quality.checks) if recipe.quality else []
    rows = ["| check | label | images | passed | pass rate |", "|---|---|---|---|---|"]
    for check in checks:
        for name in [check, *(f"{check}.{label}" for label in recipe.quality.checks[check].labels)]:
            rate = tally.checks.get(name, Rate())
            label = name.partition(".")[2] or "all labels"
            rows.append(f"| {check} | {label} | {rate.images} | {rate.passed} | {_rate(rate)} |")
    cells = [
        "| cell | samples | images | accepted | acceptance | dropped | "
        + " | ".join(f"{c} pass rate" for c in checks) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(checks),
    ]  # fmt: skip
    for key, cell in sorted(tally.cells.items()):
        acceptance = _rate(Rate(cell.images, cell.accepted))
        per_check = " | ".join(_rate(cell.checks.get(c)) for c in checks)
        cells.append(f"| {key} | {cell.samples} | {cell.images} | {cell.accepted} | "
                     f"{acceptance} | {cell.dropped} | {per_check} |")  # fmt: skip
    histogram = ["| attempts | samples |", "|---|---|"]
    histogram += [f"| {n} | {count} |" for n, count in sorted(tally.attempts.items())]
    return "\n\n".join(["\n".join(rows), "\n".join(cells), "\n".join(histogram)])


def quality_markdown(recipe: Recipe, tally: QualityTally, seconds: dict[str, float]) -> str:
    """The card's and `info`'s quality section."""
    quality = recipe.quality
    limit = f"at most {quality.max_attempts} attempts" if quality else "attempts"
    replaced = (
        f", {len(tally.replaced)} replaced by a new draw of their cell" if tally.replaced else ""
    )
    accepted = _rate(Rate(tally.images, tally.accepted))
    spent = seconds.get("render", 0.0) + seconds.get("gate", 0.0)
    rejected = seconds.get("rejected", 0.0)
    share = f" ({rejected / spent:.1%} of the rendering and judging)" if spent else ""
    lines = [
        f"{tally.samples} samples, {limit} each (on_fail: {quality.on_fail if quality else '-'}): "
        f"{tally.images} images rendered, {tally.accepted} accepted (acceptance {accepted}); "
        f"{tally.kept_failing} kept failing (`quality_passed: false`), {len(tally.dropped)} "
        f"dropped (their keys are in `manifest.json`){replaced}.",
        "",
        f"Seconds (measured, summed over workers): rendering {seconds.get('render', 0.0):.1f}, "
        f"the checks {seconds.get('gate', 0.0):.1f}, spent on rejected images "
        f"{rejected:.1f}{share}.",
        "",
        acceptance_markdown(recipe, tally),
    ]
    return "\n".join(lines)
