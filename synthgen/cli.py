"""The `synthgen` command: parse, call, print. User mistakes exit 2 with one line."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from synthgen import __version__
from synthgen.errors import SynthgenError


def user_errors(command):
    """Turn a SynthgenError into `error: FILE: FIELD: message` and exit code 2, no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SynthgenError as exc:
            click.echo(f"error: {exc.describe()}", err=True)
            sys.exit(2)

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="synthgen")
def main() -> None:
    """Build synthetic medical-image datasets from a YAML recipe."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@user_errors
def validate(recipe: Path) -> None:
    """Check RECIPE without rendering anything."""
    from synthgen.models import check_model_reference
    from synthgen.recipe import load_recipe

    loaded = load_recipe(recipe)
    check_model_reference(loaded.model, file=str(recipe))
    click.echo(
        f"ok: {recipe} ({loaded.name}, {loaded.num_samples} samples, sha256 {loaded.sha256()[:12]})"
    )


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-n", "--num", "count", default=10, show_default=True, help="How many samples.")
@click.option("--start", default=0, show_default=True, help="Index of the first sample.")
@user_errors
def sample(recipe: Path, count: int, start: int) -> None:
    """Print labels and prompts of samples as JSON lines, without rendering."""
    from synthgen.plan import sample_key, split_of, t2i_spec
    from synthgen.recipe import load_recipe

    loaded = load_recipe(recipe)
    total = max(loaded.num_samples, start + count)
    for index in range(start, start + count):
        spec = t2i_spec(loaded, index, split_of(loaded, index, total))
        line = {"index": index, "key": sample_key(loaded, index), "split": spec.split,
                "labels": spec.labels, "prompt": spec.prompt}  # fmt: skip
        click.echo(json.dumps(line))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, help="Output directory or fsspec URL.")
@click.option("--num-samples", type=click.IntRange(min=1), help="Override the recipe's count.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if present).")
@click.option("--overwrite", is_flag=True, help="Replace another recipe's data in OUT.")
@user_errors
def generate(recipe: Path, out: str, num_samples: int | None, device: str | None, overwrite: bool):
    """Render RECIPE into OUT (resumes a partial run of the same recipe)."""
    from synthgen.models import check_model_reference, default_device
    from synthgen.recipe import load_recipe
    from synthgen.runs import generate as run

    loaded = load_recipe(recipe, num_samples=num_samples)
    check_model_reference(loaded.model, file=str(recipe))
    result = run(loaded, out, device=device or default_device(), overwrite=overwrite)
    if result.already_complete:
        click.echo(
            f"{out} is already complete for this recipe ({result.total} samples): nothing to do"
        )
        return
    if result.resumed_shards:
        click.echo(f"resumed: {result.resumed_shards} shards were already committed", err=True)
    click.echo(
        f"wrote {result.total} samples to {out} ({result.rendered} rendered in "
        f"{result.seconds:.1f} s, {result.rendered / max(result.seconds, 1e-9):.2f} img/s)"
    )


@main.command()
@click.argument("out")
@user_errors
def finalize(out: str) -> None:
    """Write OUT's manifest and dataset card again from its committed shards."""
    from synthgen.card import finalize as finalize_out
    from synthgen.outdir import OutDir

    manifest = finalize_out(OutDir(out))
    click.echo(f"finalized {out}: {manifest['num_samples']} samples")


@main.command()
@click.argument("out")
@user_errors
def info(out: str) -> None:
    """Counts, completeness and label summaries of a generated dataset."""
    from synthgen.card import read_label_frame, read_recipe
    from synthgen.outdir import OutDir
    from synthgen.plan import plan_shards
    from synthgen.summary import label_rows, markdown_table

    outdir = OutDir(out)
    recipe = read_recipe(outdir)
    tasks = plan_shards(recipe)
    records = outdir.committed_records()
    done = [records[t.name] for t in tasks if t.name in records]
    complete = outdir.exists("manifest.json") and len(done) == len(tasks)
    click.echo(f"{recipe.name}: {'complete' if complete else 'INCOMPLETE'}")
    click.echo(f"shards: {len(done)} of {len(tasks)} committed")
    for split in recipe.splits:
        count = sum(r["count"] for r in done if r["split"] == split)
        click.echo(f"  {split}: {count} samples")
    if recipe.labels and done:
        click.echo(markdown_table(label_rows(recipe, read_label_frame(outdir, recipe, done))))
