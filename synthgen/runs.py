"""A run of a recipe into OUT: claim the directory, find what is already committed, render the rest.

Resume, multi-GPU, ranks and Ray are all "run the shards not yet committed": this module finds
those shards; an executor decides where they run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from synthgen.errors import OutputError
from synthgen.outdir import RUN_RECORD, OutDir
from synthgen.plan import Plan, ShardTask
from synthgen.recipe import Recipe

OWN_PATHS = ("README.md", "recipe.yaml", "manifest.json", "webdataset", "parquet", "previews",
             ".synthgen")  # fmt: skip


@dataclass(frozen=True)
class RunState:
    done: list[ShardTask]
    todo: list[ShardTask]
    complete: bool  # every shard committed and the manifest written


def planned_tasks(out: OutDir) -> list[ShardTask]:
    """The shard list recorded when the run started (finalize needs no cohort to know it)."""
    record = out.run_record()
    if record is None:
        raise OutputError("no run record: this is not a synthgen output directory", file=out.url)
    return [ShardTask(**task) for task in record["tasks"]]


def claim_output(out: OutDir, recipe: Recipe, plan: Plan, overwrite: bool = False) -> None:
    """OUT must be empty, or hold a run of this very recipe (which then resumes)."""
    record = out.run_record()
    if record is not None and record["recipe_sha256"] == recipe.sha256():
        return
    if record is not None and not overwrite:
        raise OutputError(
            "holds a run of a different recipe; pass --overwrite to replace it, "
            "or choose another output directory",
            file=out.url,
        )
    # a kill during an earlier claim can leave recipe.yaml.tmp-*: ours too
    foreign = [p for p in out.all_files() if p.split("/")[0].split(".tmp-")[0] not in OWN_PATHS]
    if foreign:
        raise OutputError(
            f"is not empty and holds files synthgen did not write (e.g. {foreign[0]}); "
            "choose an empty or new directory",
            file=out.url,
        )
    if overwrite:
        for relative in OWN_PATHS:
            out.remove(relative)
    # Nothing else is removed: ranks started together all claim OUT at once, with the same bytes.
    if recipe.privacy is not None:
        write_linkage(plan, recipe.privacy.linkage, out)
    out.write_atomic("recipe.yaml", recipe.shareable().to_yaml().encode())
    skipped = plan.cohort.skipped if plan.cohort is not None else []
    run = {"recipe_sha256": recipe.sha256(), "tasks": [asdict(t) for t in plan.tasks],
           "skipped": skipped}  # fmt: skip
    out.write_atomic(RUN_RECORD, json.dumps(run).encode())


def write_linkage(plan: Plan, path: str, out: OutDir) -> None:
    """The key → source id table, for re-identification audits: never inside OUT."""
    target = Path(path).resolve()
    if out.is_local and target.is_relative_to(Path(out.root).resolve()):
        raise OutputError("must not be inside the output directory", where="privacy.linkage")
    rows = plan.linkage()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    temporary.write_text(buffer.getvalue())
    temporary.replace(target)


def _hashes_match(out: OutDir, record: dict) -> bool:
    for path, digest in record["files"].items():
        if not out.exists(path) or hashlib.sha256(out.read_bytes(path)).hexdigest() != digest:
            return False
    return True


def run_state(out: OutDir, tasks: list[ShardTask], verify: bool = False) -> RunState:
    """Split the plan into committed and to-do shards; a damaged shard is to do again.

    A shard's files were complete when its commit record was written (they are renamed into
    place first), so what can go wrong later is a file lost or cut short: checking names and
    sizes from one listing catches that without reading terabytes. `verify` re-hashes every
    file, for damage that keeps the size.
    """
    records = out.committed_records()
    if out.exists("manifest.json") and all(t.name in records for t in tasks):
        return RunState(done=list(tasks), todo=[], complete=True)
    on_disk = out.file_sizes()
    done, todo = [], []
    for task in tasks:
        record = records.get(task.name)
        if record is None:
            intact = False
        elif verify or not record.get("sizes"):  # records from before sizes were kept: hash
            intact = _hashes_match(out, record)
        else:
            intact = all(on_disk.get(path) == size for path, size in record["sizes"].items())
        if intact:
            done.append(task)
        else:
            if record is not None:
                out.remove(out.commit_path(task.name))
            todo.append(task)
    if todo:
        out.remove("manifest.json")  # a damaged shard: the dataset is not complete any more
    return RunState(done=done, todo=todo, complete=False)


def plan_in(out: OutDir, recipe: Recipe) -> Plan:
    """The plan of `recipe` for OUT, with the cohort's images checked once per run.

    Resuming (or re-running a complete) i2i run trusts the check made when it started, whose
    skipped rows are in the run record, instead of decoding every source image again; if the
    cohort no longer gives the recorded shards, it is checked in full.
    """
    from synthgen.plan import build_plan

    record = out.run_record()
    resuming = record is not None and record["recipe_sha256"] == recipe.sha256()
    if recipe.generation.mode == "i2i" and resuming:
        from synthgen.cohort import Cohort, load_cohort

        dropped = {entry["row"] for entry in record["skipped"]}
        cohort = load_cohort(recipe.source, recipe.labels, check_images=False)
        rows = [row for row in cohort.rows if row.row not in dropped]
        plan = Plan(recipe, cohort=Cohort(rows, record["skipped"]))
        if [asdict(task) for task in plan.tasks] == record["tasks"]:
            return plan
    return build_plan(recipe, check_images=True)


@dataclass(frozen=True)
class RunResult:
    total: int
    rendered: int
    seconds: float
    already_complete: bool
    resumed_shards: int
    skipped_rows: int
    finalized: bool
    failed: dict[str, str]


@dataclass(frozen=True)
class Execution:
    """Where the shards run: devices of a local pool, a launcher's rank, or a Ray cluster."""

    devices: tuple[str, ...] = ("cpu",)
    executor: str = "local"  # local | ray
    ray_address: str | None = None
    rank: int | None = None
    world_size: int | None = None
    max_retries: int = 2
    log_dir: str | None = None


def generate(
    recipe: Recipe,
    out_url: str,
    execution: Execution = Execution(),
    *,
    overwrite: bool = False,
    verify: bool = False,
) -> RunResult:
    """Render every shard of `recipe` not yet committed in OUT; finalize once all are.

    `verify` re-hashes the committed shards before resuming (else names and sizes are checked).
    """
    from synthgen.card import finalize
    from synthgen.executors import progress_bar, rank_share, run_in_process, run_local_pool, run_ray

    out = OutDir(out_url)
    plan = plan_in(out, recipe)
    claim_output(out, recipe, plan, overwrite=overwrite)
    tasks = plan.tasks
    skipped = len(plan.cohort.skipped) if plan.cohort is not None else 0
    state = run_state(out, tasks, verify=verify)
    if state.complete:
        return RunResult(plan.total, 0, 0.0, True, len(tasks), skipped, True, {})
    ranked = execution.rank is not None
    if not ranked:
        out.remove_temporaries()  # ranks leave them: another rank may be writing one right now
    mine = rank_share(tasks, execution.rank, execution.world_size) if ranked else tasks
    todo = [task for task in mine if task in state.todo]
    started = time.perf_counter()
    with progress_bar(
        sum(t.size for t in mine), initial=sum(t.size for t in mine) - sum(t.size for t in todo)
    ) as bar:
        if execution.executor == "ray":
            cpu_only = all(device == "cpu" for device in execution.devices)
            outcome = run_ray(
                plan, out, todo, bar, execution.max_retries, execution.ray_address,
                cpu_actors=len(execution.devices) if cpu_only else None,
            )  # fmt: skip
        elif len(execution.devices) > 1:
            outcome = run_local_pool(
                plan,
                out,
                todo,
                execution.devices,
                bar,
                execution.max_retries,
                execution.log_dir,
                f"r{execution.rank}-" if ranked else "",
            )
        else:
            outcome = run_in_process(
                plan, out, todo, execution.devices[0], bar, execution.max_retries
            )
    seconds = time.perf_counter() - started
    rendered = sum(t.size for t in todo if t.name in outcome.committed)
    committed = out.committed_names()  # other ranks may have committed shards this one did not
    finalized = all(task.name in committed for task in tasks)
    if finalized:
        finalize(out)
    return RunResult(
        plan.total, rendered, seconds, False, len(state.done), skipped, finalized, outcome.failed
    )
