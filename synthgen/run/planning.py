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

    `previous`: the run record of the same corpus in OUT; its shards are kept as planned (and
    for i2i its blocks and cohort parts, and the rows it skipped: their images were checked
    when it started, so only rows added since are decoded).
    """
    if recipe.generation.mode == "t2i":
        table = label_table(recipe.labels_from, recipe.labels) if recipe.labels_from else None
        return Plan(recipe, table=table, previous=previous.tasks if previous else ())
    if previous is None:
        cohort = load_cohort(recipe.source, recipe.labels, check_images=check_images)
        return Plan(recipe, cohort=cohort)
    checked = previous.parts[-1] if previous.parts else 0
    cohort = load_cohort(
        recipe.source, recipe.labels, check_images=check_images, checked_before=checked
    )
    earlier = {entry.row for entry in previous.skipped}
    rows = [row for row in cohort.rows if row.row not in earlier]
    skipped = [*previous.skipped, *(s for s in cohort.skipped if s.row > checked)]
    return Plan(
        recipe, Cohort(rows, skipped), previous=previous.tasks, blocks=previous.blocks,
        parts=previous.parts,
    )  # fmt: skip


def plan_for_out(out: OutDir, recipe: Recipe, *, fresh: bool = False) -> Plan:
    """The plan of `recipe` for OUT, with the cohort's images checked once per run.

    A run of the same corpus (the same recipe but for its size: num_samples, per_cell, an i2i
    sweep's strengths, repeats and rows) keeps the shards OUT's run record lists and plans only
    what is new; for i2i the cohort check made when it started (its skipped rows are recorded)
    is trusted and only added rows are decoded. If the cohort no longer gives the recorded
    samples (a row changed place), it is planned afresh, and claiming OUT refuses it. `fresh`
    (--overwrite) plans as if OUT were empty.
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
    if record.corpus_sha256 != recipe.corpus_sha256():
        return build_plan(recipe)
    plan = build_plan(recipe, previous=record)
    if plan.layout_sha256(record.layout_size) == record.layout_sha256:
        return plan
    return build_plan(recipe)
