"""Worker: load the pipeline once, then render and commit the shards it is handed.

Knows nothing about processes, ranks or Ray: an executor decides which shards it gets.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from synthgen.card import MODEL_RECORD
from synthgen.cohort import source_image_loader
from synthgen.models import load_pipeline
from synthgen.outdir import OutDir
from synthgen.plan import Plan, ShardTask
from synthgen.render import Renderer
from synthgen.shards import ShardRecord, ShardWriter
from synthgen.tuning import tune_pipeline

Progress = Callable[[int], None]


class Worker:
    def __init__(self, plan: Plan, out: OutDir, device: str = "cpu"):
        recipe = plan.recipe
        if device == "cpu":
            # CPU kernels split their sums by thread count: a fixed count keeps every executor,
            # worker count and resume byte-identical (SYNTHGEN_CPU_THREADS, default 1).
            torch.set_num_threads(int(os.environ.get("SYNTHGEN_CPU_THREADS", "1")))
        self.plan = plan
        self.out = out
        started = time.perf_counter()
        pipe, identity = load_pipeline(recipe.model, mode=recipe.generation.mode, device=device)
        tune_pipeline(pipe, device, compile_unet=recipe.model.compile)
        self.load_seconds = time.perf_counter() - started
        load_source = None
        if plan.cohort is not None:
            load_source = source_image_loader(plan.cohort, recipe.source.preprocess)
        self.renderer = Renderer(pipe, recipe.generation, device, load_source)
        self.compile_seconds = 0.0  # reported once, with the first shard this worker commits
        if recipe.model.compile:
            started = time.perf_counter()
            self.renderer.warm_up(plan.specs(plan.tasks[0])[0])
            self.compile_seconds = time.perf_counter() - started
        self.writer = ShardWriter(out, recipe)
        if not out.exists(MODEL_RECORD):
            out.write_atomic(MODEL_RECORD, json.dumps(asdict(identity), indent=2).encode())

    def run_shard(self, task: ShardTask, progress: Progress | None = None) -> ShardRecord:
        specs = self.plan.specs(task)
        timings = {"render": 0.0}
        if self.compile_seconds:
            timings["compile"], self.compile_seconds = self.compile_seconds, 0.0

        def rendered():
            last, read_before = time.perf_counter(), self.renderer.source_seconds
            for spec, image in self.renderer.render(specs):
                timings["render"] += time.perf_counter() - last
                if progress:
                    progress(1)
                yield spec, image
                last = time.perf_counter()
            if self.plan.cohort is not None:  # reader-thread seconds, beside the rendering
                timings["source_read"] = self.renderer.source_seconds - read_before

        return self.writer.write(task, rendered(), seconds=timings)
