"""Executors decide which worker renders which shard; they know nothing about images."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tqdm import tqdm

from synthgen.outdir import OutDir
from synthgen.plan import ShardTask
from synthgen.recipe import Recipe
from synthgen.worker import Worker


def progress_bar(total: int, initial: int = 0) -> tqdm:
    return tqdm(
        total=total, initial=initial, unit="img", desc="generating", file=sys.stderr,
        dynamic_ncols=True, smoothing=0.1,
    )  # fmt: skip


def run_in_process(
    recipe: Recipe, out: OutDir, tasks: Sequence[ShardTask], device: str, bar: tqdm
) -> None:
    """One worker in this process, shard after shard."""
    if not tasks:
        return
    worker = Worker(recipe, out, device)
    for task in tasks:
        worker.run_shard(task, progress=bar.update)
