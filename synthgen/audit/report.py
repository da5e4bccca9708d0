"""Audit report files: report.json, report.csv, report.md, tradeoff.png and the contact sheets.

Everything written here names synthetic keys, ranks and similarities only, never a source or
patient id. The contact sheets do show real source images: they stay under the cohort's
governance even when the rest of the report is shared.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from synthgen.audit.groups import ALL_STRENGTHS
from synthgen.audit.stream import ImageLike, load_image
from synthgen.preview.plots import figure_png, new_figure
from synthgen.preview.sheet import BACKGROUND, PAD, contact_sheet, png_bytes

NOTES = [
    "Re-identification is measured with the named embedder as the attacker's matcher. Generic "
    "embedders (pixels, ImageNet backbones) give a lower bound on risk: a re-identification "
    "network trained on the cohort is a stronger attacker.",
    "The paper's matcher is not published: these numbers claim no parity with the paper's.",
    "A rate no better than chance means this attack failed, not that the data is private.",
    "Chance is k/N over source images (image level) or patients (patient level); risk is "
    "(rate - chance) / (1 - chance). A patient-level hit is any image of the same patient.",
    "pairs.png and memorisation.png show real source images: share them only as the cohort allows.",
]
PAIR_THUMB = 128  # pixels a side of each half of a contact-sheet pair
DISTRIBUTION_METRICS = ("fid", "kid", "precision", "recall", "density", "coverage")


@dataclass
class Pair:
    """One contact-sheet panel: synthetic beside a real image, captioned without ids."""

    synthetic: ImageLike
    real: ImageLike
    caption: str


def _clean(value: Any) -> Any:
    """JSON without NaN or infinity (written as null), tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    if hasattr(value, "item"):  # numpy scalars
        return _clean(value.item())
    return value


def write_report(report: dict, report_dir: Path, pairs: list[Pair], memorised: list[Pair]) -> dict:
    """Write every report file into `report_dir`; return report.json's content."""
    report_dir.mkdir(parents=True, exist_ok=True)
    files = ["report.json", "report.csv", "report.md", "tradeoff.png"]
    sheets = [
        ("pairs.png", pairs, "Most re-identifiable pairs (synthetic | source)"),
        ("memorisation.png", memorised, "Closest T2I pairs (synthetic | training)"),
    ]
    for name, shown, title in sheets:
        if shown:
            _pair_sheet(shown, report_dir / name, title)
            files.append(name)
    report["files"] = files
    clean = _clean(report)
    (report_dir / "report.json").write_text(json.dumps(clean, indent=2) + "\n")
    _write_csv(clean, report_dir / "report.csv")
    (report_dir / "report.md").write_text(_markdown(clean))
    _tradeoff(clean, report_dir / "tradeoff.png")
    return clean


def card_section(report: dict) -> str:
    """The audit's table for the dataset card's privacy section: per group, top-1
    re-identification of the true source (image) and patient beside chance. No ids."""
    settings = report["settings"]
    lines = [
        f"Audit (`synthgen audit`, embedder `{settings['embedder']}`, {settings['date'][:10]}): "
        "top-1 re-identification of the true source (image) and patient, with 95% intervals, "
        "beside chance. The embedder gives a lower bound on risk; a stronger attacker may do better.",
        "",
        *_table_head("group", "n", "image top-1", "patient top-1", "chance (image)"),
    ]
    for group in report["groups"]:
        top1 = {
            level: _get(group, "reidentification", level, "top1") or {}
            for level in ("image", "patient")
        }
        if top1["image"].get("value") is None:
            continue
        cells = [
            f"{top1[level]['value']:.3f} [{top1[level]['ci95'][0]:.3f}, {top1[level]['ci95'][1]:.3f}]"
            for level in ("image", "patient")
        ]
        lines.append(
            f"| {group['name']} | {group['n_synthetic']} | {cells[0]} | {cells[1]} | "
            f"{top1['image']['chance']:.4f} |"
        )
    return "\n".join(lines)


def _get(entry: dict, *path: str) -> Any:
    for key in path:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry


def utility_axis(group: dict) -> tuple[str, float | None]:
    """The utility plotted against risk: the first label's agreement, else SSIM."""
    labels = _get(group, "label_utility", "labels") or {}
    for name, metrics in labels.items():
        for metric in ("label_vs_predicted_on_synthetic", "auc_on_synthetic"):
            if metric in metrics:
                return f"{name}: {metric.replace('_', ' ')}", metrics[metric]["value"]
    return "SSIM to source", _get(group, "fidelity", "ssim", "value")


def _write_csv(report: dict, path: Path) -> None:
    rows = []
    for group in report["groups"]:
        row: dict[str, Any] = {
            "mode": group["mode"],
            "strength": group["strength"],
            "group": group["name"],
            "n_synthetic": group["n_synthetic"],
        }
        for level in ("image", "patient"):
            summary = _get(group, "reidentification", level) or {}
            for k in ("top1", "top5"):
                rate = summary.get(k) or {}
                row[f"{level}_{k}"] = rate.get("value")
                row[f"{level}_{k}_ci_low"] = (rate.get("ci95") or [None])[0]
                row[f"{level}_{k}_ci_high"] = (rate.get("ci95") or [None, None])[1]
                row[f"{level}_{k}_chance"] = rate.get("chance")
                row[f"{level}_{k}_risk"] = rate.get("risk")
            row[f"{level}_mean_rank"] = _get(summary, "mean_rank", "value")
            row[f"{level}_verification_auc"] = _get(summary, "verification_auc", "value")
        for name in ("psnr_db", "ssim", "lpips"):
            row[name] = _get(group, "fidelity", name, "value")
        for name in DISTRIBUTION_METRICS:
            row[name] = _get(group, "distribution", name, "value")
        label, value = utility_axis(group)
        row["utility"], row["utility_metric"] = value, label
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(estimate: dict | None, digits: int = 3) -> str:
    if not estimate or estimate.get("value") is None:
        return "–"
    low, high = estimate.get("ci95") or (None, None)
    interval = (
        f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None and high is not None else ""
    )
    return f"{estimate['value']:.{digits}f}{interval}"


def _heading(title: str) -> list[str]:
    return ["", f"## {title}", ""]


def _table_head(*columns: str) -> list[str]:
    """A Markdown table's header row and its rule."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _markdown(report: dict) -> str:
    settings = report["settings"]
    lines = ["# Privacy–utility audit", ""]
    lines += [f"- **{key}**: {value}" for key, value in settings.items() if key != "label_heads"]
    lines += _heading("Read this first") + [f"- {note}" for note in report["notes"]]
    if report["warnings"]:
        lines += _heading("Warnings") + [f"- ⚠ {message}" for message in report["warnings"]]
    groups = report["groups"]
    i2i = [group for group in groups if group.get("reidentification")]
    if i2i:
        lines += _md_reidentification(i2i) + _md_fidelity(i2i) + _md_labels(i2i)
    lines += _md_distribution([group for group in groups if group.get("distribution")])
    if report.get("memorisation"):
        lines += _md_memorisation(report["memorisation"])
    lines += _heading("Files") + [f"- `{name}`" for name in report["files"]]
    return "\n".join(lines) + "\n"


def _md_reidentification(groups: list[dict]) -> list[str]:
    lines = _heading("Re-identification (95% Wilson intervals; chance beside each rate)")
    lines += _table_head(
        "group", "level", "N", "top-1", "chance", "risk", "top-5", "chance", "risk", "mean rank",
        "AUC",
    )  # fmt: skip
    for group in groups:
        for level in ("image", "patient"):
            summary = group["reidentification"][level]
            top1, top5 = summary["top1"], summary["top5"]
            lines.append(
                f"| {group['name']} | {level} | {group['n_synthetic']} | {_fmt(top1)} | "
                f"{top1['chance']:.4f} | {top1['risk']:.3f} | {_fmt(top5)} | "
                f"{top5['chance']:.4f} | {top5['risk']:.3f} | {_fmt(summary['mean_rank'], 1)} | "
                f"{_fmt(summary['verification_auc'])} |"
            )
    return lines


def _md_fidelity(groups: list[dict]) -> list[str]:
    lines = _heading("Fidelity to the source") + _table_head("group", "PSNR dB", "SSIM", "LPIPS")
    lpips_reason = None
    for group in groups:
        fidelity = group["fidelity"]
        lpips = fidelity["lpips"]
        lpips_reason = lpips.get("reason") if lpips.get("computed") is False else None
        lines.append(
            f"| {group['name']} | {_fmt(fidelity['psnr_db'], 2)} | {_fmt(fidelity['ssim'])} "
            f"| {_fmt(lpips) if lpips_reason is None else 'not computed'} |"
        )
    lines += ["", f"Compared {groups[0]['fidelity']['resize']}."]
    if lpips_reason:
        lines.append(f"LPIPS not computed: {lpips_reason}.")
    return lines


def _md_labels(groups: list[dict]) -> list[str]:
    lines = _heading("Label utility")
    first = groups[0]["label_utility"]
    if not first["computed"]:
        return lines + [f"Not computed: {first['reason']}."]
    for group in groups:
        for label, metrics in group["label_utility"]["labels"].items():
            cells = "; ".join(
                f"{name.replace('_', ' ')} {_fmt(est)}" for name, est in metrics.items()
            )
            lines.append(f"- {group['name']}, **{label}**: {cells}")
    return lines


def _md_distribution(groups: list[dict]) -> list[str]:
    if not groups:
        return []
    lines = _heading("Distribution fidelity against all sources (features: the audit embedder)")
    lines += _table_head("group", "FID", "KID", "precision", "recall", "density", "coverage")
    for group in groups:
        dist = group["distribution"]
        if not dist["computed"]:
            lines.append(f"| {group['name']} | {dist['reason']} | | | | | |")
            continue
        cells = " | ".join(
            _fmt(dist[name], 4 if name == "kid" else 3) for name in DISTRIBUTION_METRICS
        )
        lines.append(f"| {group['name']} | {cells} |")
    return lines


def _md_memorisation(memorisation: dict) -> list[str]:
    lines = _heading("Memorisation (text-to-image)")
    lines.append(
        f"- nearest training similarity: {_fmt(memorisation['nearest_training_similarity'])}"
    )
    if "threshold" in memorisation:
        threshold = memorisation["threshold"]
        lines.append(
            f"- threshold {threshold['value']:.4f} (quantile {threshold['quantile']} of "
            f"{threshold['n_reference']} real-vs-real different-patient neighbours); "
            f"share above: {_fmt(memorisation['above_threshold'])}"
        )
    versus = memorisation["closer_to_training_than_holdout"]
    versus_text = _fmt(versus) if versus.get("computed", True) else versus["reason"]
    lines.append(f"- share closer to training than holdout (0.5 = none): {versus_text}")
    lines += ["", *_table_head("closest synthetic", "similarity", "above threshold")]
    lines += [
        f"| {c['key']} | {c['similarity']:.4f} | {c['above']} |" for c in memorisation["closest"]
    ]
    return lines


def _tradeoff(report: dict, path: Path) -> None:
    """tradeoff.png: top-1 re-identification against utility, one point per strength."""
    groups = [
        g for g in report["groups"] if g.get("reidentification") and g["name"] != ALL_STRENGTHS
    ]
    fig = new_figure(6.4, 4.8, dpi=120)
    ax = fig.add_subplot()
    for level, marker in (("image", "o"), ("patient", "s")):
        _plot_level(ax, groups, level, marker)
    ax.set_xlabel(utility_axis(groups[-1])[0] if groups else "utility")
    ax.set_ylabel("top-1 re-identification rate")
    ax.set_ylim(-0.02, 1.1)
    ax.set_title(
        f"Privacy–utility tradeoff (embedder: {report['settings']['embedder']})", fontsize=10
    )
    if groups:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no image-to-image groups", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    path.write_bytes(figure_png(fig))


def _plot_level(ax, groups: list[dict], level: str, marker: str) -> None:
    """One level's rates with their intervals, each labelled by strength, and its chance line."""
    xs, ys, lows, highs, names = [], [], [], [], []
    for group in groups:
        _, x = utility_axis(group)
        rate = group["reidentification"][level]["top1"]
        if x is None or rate["value"] is None:
            continue
        xs.append(x)
        ys.append(rate["value"])
        lows.append(rate["value"] - rate["ci95"][0])
        highs.append(rate["ci95"][1] - rate["value"])
        names.append("" if group["strength"] is None else f"s={group['strength']:g}")
    if not xs:
        return
    ax.errorbar(xs, ys, yerr=[lows, highs], marker=marker, capsize=3, label=f"top-1, {level} level")
    for x, y, name in zip(xs, ys, names, strict=True):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    summary = groups[0]["reidentification"][level]
    ax.axhline(
        summary["top1"]["chance"],
        linestyle="--" if level == "image" else ":",
        color="grey",
        label=f"chance, {level} level (1/{summary['gallery_size']})",
    )


def _pair_sheet(pairs: list[Pair], path: Path, title: str, thumb: int = PAIR_THUMB) -> None:
    """The preview's contact sheet with one tile a pair, captioned with keys and ranks only."""
    items = [(_pair_tile(pair, thumb), pair.caption.splitlines()) for pair in pairs]
    sheet = contact_sheet(items, columns=4, thumb=(2 * thumb + PAD, thumb), title=title)
    path.write_bytes(png_bytes(sheet))


def _pair_tile(pair: Pair, thumb: int) -> Image.Image:
    """The synthetic image beside the real one, each fit into a `thumb` square."""
    tile = Image.new("RGB", (2 * thumb + PAD, thumb), BACKGROUND)
    for n, image in enumerate((pair.synthetic, pair.real)):
        half = load_image(image, "a contact-sheet image").convert("RGB")
        tile.paste(ImageOps.contain(half, (thumb, thumb)), (n * (thumb + PAD), 0))
    return tile
