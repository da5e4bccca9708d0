"""The one planning entry: read what the recipe points at (cohort or `labels_from` table) once,
and hand the pure plan its rows (and, in an existing OUT, the shards already planned there).
"""

from __future__ import annotations

from synthgen.cohort.rows import Cohort, load_cohort
from synthgen.cohort.tables import label_table
from synthgen.errors import OutputError
from synthgen.output.outdir import OutDir
from synthgen.output.records import RunRecord
from synthgen.plan import PLAN_VERSION, Plan
from synthgen.recipe.schema import Recipe


def build_plan(
    recipe: Recipe, *, check_images: bool = True, previous: RunRecord | None = None
) -> Plan:
    """The plan, reading the cohort (checking its images) or the label table it needs.

    `previous`: the run record of the same corpus in OUT; its shards are kept as planned.
    """
    if recipe.generation.mode == "i2i":
        cohort = load_cohort(recipe.source, recipe.labels, check_images=check_images)
        return Plan(recipe, cohort=cohort)
    table = label_table(recipe.labels_from, recipe.labels) if recipe.labels_from else None
    return Plan(recipe, table=table, previous=previous.tasks if previous else ())


def plan_for_out(out: OutDir, recipe: Recipe, *, fresh: bool = False) -> Plan:
    """The plan of `recipe` for OUT, with the cohort's images checked once per run.

    A T2I run of the same corpus (the same recipe but for its size) keeps the shards OUT's run
    record lists and plans only what is new. Resuming (or re-running a complete) i2i run trusts
    the cohort check made when it started, whose skipped rows are in the run record, instead of
    decoding every source image again; if the cohort no longer gives the recorded shards, it is
    checked in full. `fresh` (--overwrite) plans as if OUT were empty.
    """
    record = None if fresh else out.run_record()
    if record is None:
        return build_plan(recipe)
    if record.plan_version != PLAN_VERSION and record.recipe_sha256 == recipe.sha256():
        raise OutputError(
            f"was written by an older synthgen (plan version {record.plan_version}); it can be "
            "read, finalized and pushed as it is, but resuming or growing it needs a fresh run: "
            "pass --overwrite",
            file=out.url,
        )
    same_corpus = record.corpus_sha256 == recipe.corpus_sha256()
    previous = record if same_corpus else None
    if recipe.generation.mode == "t2i":
        return build_plan(recipe, previous=previous)
    if same_corpus:
        dropped = {entry.row for entry in record.skipped}
        cohort = load_cohort(recipe.source, recipe.labels, check_images=False)
        rows = [row for row in cohort.rows if row.row not in dropped]
        plan = Plan(
            recipe, Cohort(rows, record.skipped), previous=record.tasks, blocks=record.blocks
        )
        if plan.tasks[: len(record.tasks)] == record.tasks:
            return plan
    return build_plan(recipe, check_images=True)
