"""The `synthgen` command: parse, call, print. User mistakes exit 2 with one line."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from synthgen import __version__
from synthgen.errors import OptionError, SynthgenError


def user_errors(command):
    """Turn a SynthgenError into `error: FILE: FIELD: message` and exit code 2, no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SynthgenError as exc:
            if exc.file is None and not isinstance(exc, OptionError) and kwargs.get("recipe"):
                exc.file = str(kwargs["recipe"])
            click.echo(f"error: {exc.describe()}", err=True)
            sys.exit(2)

    return wrapper


def run() -> None:
    """The console script: `main`, leaving at once on a user error.

    Native threads that torch or torchmetrics started can abort the interpreter's teardown
    ("terminate called…", SIGABRT) and hide exit code 2, so that exit skips the teardown.
    """
    try:
        main()
    except SystemExit as exc:
        if exc.code == 2:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        raise


@click.group()
@click.version_option(__version__, prog_name="synthgen")
def main() -> None:
    """Build synthetic medical-image datasets from a YAML recipe."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@user_errors
def validate(recipe: Path) -> None:
    """Check RECIPE (and its cohort: columns, labels, every image) without rendering anything."""
    # start-up time: each command imports only what it runs
    from synthgen.output.sizes import estimate
    from synthgen.recipe.schema import load_recipe
    from synthgen.render.lora.fit import inspect_lora
    from synthgen.render.model_files import check_model_reference
    from synthgen.run.planning import build_plan

    loaded = load_recipe(recipe)
    check_model_reference(loaded.model, file=str(recipe))
    lora_lines, lora_warnings = inspect_lora(loaded.model)
    for line in lora_lines:
        click.echo(f"lora: {line}")
    for warning in lora_warnings:
        click.echo(f"warning: {warning}", err=True)
    for line in check_quality_models(loaded):
        click.echo(f"quality: {line}")
    fit = prompt_fit_of(loaded)
    if fit is None:
        click.echo("prompt: not checked against the text encoder's limit (no tokenizer here)")
    warn_if_cut(fit)
    plan = build_plan(loaded, check_images=True)
    for warning in plan.split_warnings():
        click.echo(f"warning: {warning}", err=True)
    detail = f"{plan.total} samples in {len(plan.tasks)} shards"
    if plan.cohort is not None:
        detail += f" from {len(plan.cohort.rows)} cohort rows"
        for skipped in plan.cohort.skipped:
            click.echo(f"skip: row {skipped.row}: {skipped.reason}", err=True)
        if plan.cohort.skipped:
            detail += f", {len(plan.cohort.skipped)} rows skipped"
    click.echo(f"ok: {recipe} ({loaded.name}: {detail}; sha256 {loaded.sha256()[:12]})")
    click.echo(f"size: {estimate(loaded, plan.total).describe()}")


def check_quality_models(recipe) -> list[str]:
    """Load every quality check's model once on the CPU, so a model that cannot load or whose
    outputs do not fit its labels is exit 2 naming the field before anything renders."""
    if recipe.quality is None:
        return []
    from synthgen.render.gate import Gate  # torch: only a recipe with a quality gate needs it

    return [
        f"{c.check.name}: {c.check.model}: {c.check.width} outputs read for "
        f"{', '.join(r.label for r in c.check.rules)} (sha256 {c.network.weights_sha256[:12]})"
        for c in Gate.load(recipe, "cpu").checks
    ]


def prompt_fit_of(recipe):
    """How the recipe's longest prompt fits the text encoder; None if the model's tokenizer is
    not on this machine (a Hub model not downloaded yet)."""
    # start-up time: each command imports only what it runs
    from synthgen.recipe.prompt_length import prompt_fit
    from synthgen.render.prompt_tokenizer import token_counter

    counter = token_counter(recipe.model)
    return None if counter is None else prompt_fit(recipe.prompt, recipe.labels, *counter)


def warn_if_cut(fit) -> None:
    """A warning, not an error: a cut is diffusers' normal behaviour and may be meant (text at
    the end that can go), and whether it can be checked depends on the machine's cache."""
    if fit is not None and fit.cut:
        click.echo(
            f"warning: prompt: can be {fit.tokens} tokens, but the text encoder reads {fit.budget}"
            f" and diffusers drops the rest; labels past the cut: {', '.join(fit.cut)}",
            err=True,
        )


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-n", "--num", "count", default=10, show_default=True, type=click.IntRange(min=1),
    help="How many samples.",
)  # fmt: skip
@click.option(
    "--start", default=0, show_default=True, type=click.IntRange(min=0),
    help="Index of the first sample.",
)  # fmt: skip
@user_errors
def sample(recipe: Path, count: int, start: int) -> None:
    """Print samples' keys, labels and prompts as JSON lines, without rendering."""
    # start-up time: each command imports only what it runs
    from synthgen.recipe.schema import load_recipe
    from synthgen.run.planning import build_plan

    loaded = load_recipe(recipe)
    warn_if_cut(prompt_fit_of(loaded))
    plan = build_plan(loaded, check_images=False)
    indices = sample_indices(loaded.generation.mode, plan.total, start, count)
    for spec in (plan.spec(index) for index in indices):
        line = {"index": spec.index, "key": spec.key, "split": spec.split, "labels": spec.labels,
                "prompt": spec.prompt}  # fmt: skip
        if spec.strength is not None:
            line["strength"] = spec.strength
        if spec.cell is not None:
            line["cell"] = spec.cell
        click.echo(json.dumps(line))


def sample_indices(mode: str, total: int, start: int, count: int) -> range:
    """What `sample` prints: a t2i corpus has every index; a cohort's samples end at `total`."""
    if mode == "t2i":
        return range(start, start + count)
    if start >= total:
        raise OptionError(f"is past the end: the cohort makes {total} samples", where="--start")
    return range(start, min(start + count, total))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, help="Output directory or fsspec URL (s3://…).")
@click.option(
    "--num-samples",
    type=click.IntRange(min=1),
    help="Trial run: this many samples (t2i) or the first N cohort rows (i2i).",
)
@click.option(
    "--devices",
    "--device",
    "devices",
    default=None,
    help="all | 0,1,3 | cpu | cuda:1 (default: all GPUs, else cpu).",
)
@click.option("--workers-per-device", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--address", default=None, help="Ray cluster address (auto, ray://…).")
@click.option(
    "--rank", type=click.IntRange(min=0), default=None,
    help="This process's rank (else RANK or SLURM).",
)  # fmt: skip
@click.option("--world-size", type=click.IntRange(min=1), default=None, help="Number of ranks.")
@click.option("--max-retries", default=2, show_default=True, type=click.IntRange(min=0))
@click.option("--overwrite", is_flag=True, help="Replace another recipe's data in OUT.")
@click.option(
    "--verify",
    is_flag=True,
    help="Resuming: re-hash every committed shard (default: check their names and sizes).",
)
@user_errors
def generate(recipe, out, num_samples, devices, workers_per_device, executor, address, rank,
             world_size, max_retries, overwrite, verify):  # fmt: skip
    """Render RECIPE into OUT; resumes a partial run of the same recipe."""
    # start-up time: each command imports only what it runs
    from synthgen.recipe.schema import load_recipe
    from synthgen.render.lora.fit import inspect_lora
    from synthgen.render.model_files import check_model_reference
    from synthgen.run.generate import generate as run
    from synthgen.run.launch import resolve_execution

    execution = resolve_execution(
        out, devices, workers_per_device, executor, address, rank, world_size, max_retries
    )
    loaded = load_recipe(recipe, num_samples=num_samples)
    check_model_reference(loaded.model, file=str(recipe))
    for warning in inspect_lora(loaded.model)[1]:
        click.echo(f"warning: {warning}", err=True)
    check_quality_models(loaded)
    result = run(loaded, out, execution, overwrite=overwrite, verify=verify)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if result.already_complete:
        click.echo(
            f"{out} is already complete for this recipe ({result.total} samples): nothing to do"
        )
        return
    if result.resumed_shards:
        click.echo(f"resumed: {result.resumed_shards} shards were already committed", err=True)
    if result.skipped_rows:
        click.echo(
            f"skipped {result.skipped_rows} unusable cohort rows (see manifest.json)", err=True
        )
    rate = result.rendered / max(result.seconds, 1e-9)
    click.echo(f"rendered {result.rendered} samples in {result.seconds:.1f} s ({rate:.2f} img/s)")
    if result.failed:
        click.echo(f"error: {len(result.failed)} shards failed:", err=True)
        for name, error in sorted(result.failed.items()):
            click.echo(f"  {name}: {error}", err=True)
        sys.exit(1)
    if result.finalized:
        click.echo(f"wrote {result.total} samples to {out}")
    else:
        click.echo(
            "this rank is done; the last rank to finish (or `synthgen finalize`) writes the manifest"
        )


@main.command()
@click.argument("out")
@user_errors
def finalize(out: str) -> None:
    """Write OUT's manifest and dataset card again from its committed shards."""
    # start-up time: each command imports only what it runs
    from synthgen.run.finalize import finalize_alone

    manifest = finalize_alone(out)
    click.echo(f"finalized {out}: {manifest.num_samples} samples")


@main.command()
@click.argument("out")
@click.option(
    "--plots",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write labels-NAME.png (asked vs drawn) for every label into this folder.",
)
@user_errors
def info(out: str, plots: Path | None) -> None:
    """Counts, completeness and label summaries of a generated dataset."""
    # start-up time: each command imports only what it runs
    from synthgen.output.label_summary import labels_markdown
    from synthgen.output.manifest import (
        label_encodings,
        merged_cells,
        merged_label_stats,
        merged_quality,
    )
    from synthgen.output.outdir import MANIFEST, OutDir
    from synthgen.output.quality_summary import quality_markdown
    from synthgen.output.read import ShardReader
    from synthgen.preview.plots import label_plots

    outdir = OutDir(out)
    recipe = outdir.recipe()
    run_record = outdir.run_record()
    if run_record is None:
        raise SynthgenError("no run record: this is not a synthgen output directory", file=out)
    tasks = run_record.tasks
    records = outdir.committed_records()
    done = [records[t.name] for t in tasks if t.name in records]
    complete = outdir.exists(MANIFEST) and len(done) == len(tasks)
    click.echo(f"{recipe.name}: {'complete' if complete else 'INCOMPLETE'}")
    click.echo(f"shards: {len(done)} of {len(tasks)} committed")
    for split in recipe.splits:
        count = sum(r.count for r in done if r.split == split)
        click.echo(f"  {split}: {count} samples")
    if recipe.labels and done:
        stats = merged_label_stats(recipe, done, ShardReader(outdir, label_encodings(recipe)))
        click.echo(labels_markdown(recipe, stats, merged_cells(done)))
        if plots is not None:
            names = label_plots(recipe, stats, OutDir(str(plots)))
            click.echo(f"wrote {len(names)} label plots to {plots}")
    quality = merged_quality(done)
    if quality is not None:
        click.echo("quality gate:")
        click.echo(quality_markdown(recipe, quality.tally, quality.seconds))


@main.command()
@click.argument("source")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Image file to write (PNG).",
)
@click.option(
    "-n",
    "--num",
    "count",
    type=click.IntRange(min=1),
    default=None,
    help="How many images [default: 8 rendered from a recipe, 16 sampled from OUT].",
)
@click.option("--seed", default=0, show_default=True, help="Which committed samples (OUT only).")
@click.option("--columns", default=4, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--device", default=None, help="Recipe only: cpu | cuda | cuda:N [default: cuda if any]."
)
@user_errors
def preview(source: str, output: Path, count: int | None, seed: int, columns: int,
            device: str | None) -> None:  # fmt: skip
    """Contact sheet of SOURCE (a recipe: renders a few; an OUT: samples committed images)."""
    # start-up time: each command imports only what it runs
    from synthgen.run.preview import make_preview, save_sheet

    sheet = make_preview(source, n=count, seed=seed, device=device, columns=columns)
    save_sheet(sheet, output)
    click.echo(f"wrote {output} ({sheet.width}x{sheet.height})")


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--repo-id", required=True, help="ORG/NAME of the dataset repo on the Hub.")
@click.option("--private", is_flag=True, help="Create the repo private (refuses a public one).")
@click.option("--revision", default=None, help="Branch to push to (created if needed).")
@click.option("--token-from-env", is_flag=True, help="Read the token from HF_TOKEN.")
@click.option("--dry-run", is_flag=True, help="List the files that would be sent, send nothing.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60,
    show_default=True,
    help="Seconds a connection may stall before the push gives up.",
)
@user_errors
def push(out: Path, repo_id: str, private: bool, revision: str | None, token_from_env: bool,
         dry_run: bool, timeout: float) -> None:  # fmt: skip
    """Upload a complete OUT to the Hugging Face Hub as a dataset repo."""
    # start-up time: each command imports only what it runs
    from synthgen.output.hub import bound_hub_timeouts, files_to_upload, push_dataset
    from synthgen.output.hub import token_from_env as env_token  # the option has its name

    if dry_run:
        for path in files_to_upload(out):
            click.echo(path)
        return
    token = env_token() if token_from_env else None
    bound_hub_timeouts(timeout)
    url = push_dataset(out, repo_id, private=private, revision=revision, token=token)
    click.echo(f"pushed {out} to {url}")


@main.command()
def schema() -> None:
    """Print the recipe JSON Schema (for editor completion and CI checks of recipe repos)."""
    # start-up time: each command imports only what it runs
    from synthgen.recipe.schema import Recipe

    click.echo(json.dumps(Recipe.model_json_schema(), indent=2))


@main.command()
@click.argument("out")
@click.option(
    "--source", required=True, help="The i2i recipe, or the cohort manifest (CSV/Parquet)."
)
@click.option("--linkage", default=None, help="The key → source id table written by generate.")
@click.option(
    "--embedder",
    default="pixels",
    show_default=True,
    help="pixels[:SIZE] | torchvision:ARCH[@WEIGHTS] | timm:ARCH[@WEIGHTS] | PATH of a TorchScript"
    " or exported program",
)
@click.option("--predictor", default=None, help="A model predicting the labels (same syntax).")
@click.option("--holdout", default=None, help="T2I: a manifest of real images never trained on.")
@click.option(
    "--image-column", default="image", show_default=True, help="With a manifest --source."
)
@click.option("--id-column", default="id", show_default=True, help="With a manifest --source.")
@click.option("--patient-column", default=None, help="With a manifest --source.")
@click.option("-o", "--report-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default="cpu", show_default=True)
@click.option("--append-to-card", is_flag=True, help="Show the summary in OUT's privacy section.")
@user_errors
def audit(out, source, linkage, embedder, predictor, holdout, image_column, id_column,
          patient_column, report_dir, device, append_to_card):  # fmt: skip
    """Privacy–utility audit: how re-identifiable is OUT, and how much signal did it keep?"""
    # start-up time: each command imports only what it runs
    from synthgen.audit.engine import AuditSettings, run_audit
    from synthgen.audit.inputs import read_linkage, skipped_rows, source_items, synthetic_items
    from synthgen.audit.report import card_section
    from synthgen.output.outdir import OutDir
    from synthgen.run.finalize import finalize_alone

    outdir = OutDir(out)
    if outdir.holds(report_dir):  # pairs.png shows real source images: never in the dataset
        raise SynthgenError("must not be inside the output directory", where="--report-dir")
    links = read_linkage(linkage) if linkage else None
    synthetic = synthetic_items(outdir, links)
    columns = dict(image_column=image_column, id_column=id_column, patient_column=patient_column)
    sources = source_items(source, leave_out=skipped_rows(outdir), **columns)
    held = source_items(holdout, **columns) if holdout else []
    settings = AuditSettings(embedder=embedder, predictor=predictor, device=device)
    report = run_audit(synthetic, sources, report_dir=report_dir, holdout=held, settings=settings)
    click.echo(f"wrote {report_dir}/report.md, report.json, report.csv, tradeoff.png")
    for warning in report.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    if append_to_card:
        finalize_alone(out, audit_section=card_section(report))
        click.echo(f"added the audit summary to {out}/README.md")


@main.command()
@click.argument("out")
@click.option("-o", "--report-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--checks",
    "checks",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A recipe whose quality section to run instead of OUT's own (same labels).",
)
@click.option("--device", default="cpu", show_default=True)
@user_errors
def gate(out: str, report_dir: Path, checks: Path | None, device: str) -> None:
    """Run the quality gate's checks over OUT: per-sample predictions and the acceptance table."""
    # start-up time: each command imports only what it runs
    from synthgen.output.outdir import OutDir
    from synthgen.recipe.schema import load_recipe
    from synthgen.run.gate_report import gate_dataset

    checks_from = load_recipe(checks) if checks is not None else None
    report = gate_dataset(OutDir(out), report_dir, checks_from=checks_from,
                          checks_file=str(checks) if checks else None, device=device)  # fmt: skip
    tally = report.tally
    rate = tally.accepted / tally.images if tally.images else float("nan")
    click.echo(f"judged {report.samples} samples: {tally.accepted} pass every check ({rate:.3f})")
    click.echo(f"wrote {', '.join(str(path) for path in report.files)}")
