"""The one planning entry: read what the recipe points at (cohort or `labels_from` table) once,
and hand the pure plan its rows.
"""

from __future__ import annotations

from synthgen.cohort.rows import Cohort, load_cohort
from synthgen.cohort.tables import label_table
from synthgen.output.outdir import OutDir
from synthgen.plan import Plan
from synthgen.recipe.schema import Recipe


def build_plan(recipe: Recipe, *, check_images: bool = True) -> Plan:
    """The plan, reading the cohort (checking its images) or the label table it needs."""
    if recipe.generation.mode == "i2i":
        cohort = load_cohort(recipe.source, recipe.labels, check_images=check_images)
        return Plan(recipe, cohort=cohort)
    table = label_table(recipe.labels_from, recipe.labels) if recipe.labels_from else None
    return Plan(recipe, table=table)


def plan_for_out(out: OutDir, recipe: Recipe) -> Plan:
    """The plan of `recipe` for OUT, with the cohort's images checked once per run.

    Resuming (or re-running a complete) i2i run trusts the check made when it started, whose
    skipped rows are in the run record, instead of decoding every source image again; if the
    cohort no longer gives the recorded shards, it is checked in full.
    """
    record = out.run_record()
    resuming = record is not None and record.recipe_sha256 == recipe.sha256()
    if recipe.generation.mode == "i2i" and resuming:
        dropped = {entry.row for entry in record.skipped}
        cohort = load_cohort(recipe.source, recipe.labels, check_images=False)
        rows = [row for row in cohort.rows if row.row not in dropped]
        plan = Plan(recipe, cohort=Cohort(rows, record.skipped))
        if plan.tasks == record.tasks:
            return plan
    return build_plan(recipe, check_images=True)
