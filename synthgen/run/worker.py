"""Worker: load the pipeline once, then render and commit the shards it is handed.

Joins rendering (synthgen.render) and writing (synthgen.output), which never import each other.
Knows nothing about processes, ranks or Ray: an executor decides which shards it gets.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from synthgen.cohort.rows import source_image_loader
from synthgen.output.outdir import MODEL_RECORD, OutDir
from synthgen.output.records import ModelRecord, ShardRecord
from synthgen.output.shards import ShardWriter
from synthgen.plan import Plan, ShardTask
from synthgen.render.gate import Gate
from synthgen.render.gated import GateSeconds, render_gated
from synthgen.render.pipeline import load_pipeline
from synthgen.render.renderer import Renderer
from synthgen.render.tuning import tune_pipeline
from synthgen.run.executors import Progress


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
        pipe, lora = load_pipeline(recipe.model, mode=recipe.generation.mode, device=device)
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
        # The quality gate's models live on the worker's device, beside the pipeline.
        self.gate = Gate.load(recipe, device) if recipe.quality is not None else None
        weights = self.gate.weights if self.gate is not None else None
        self.writer = ShardWriter(out, recipe, check_weights=weights)
        if not out.exists(MODEL_RECORD):
            record = ModelRecord.from_config(recipe.model, None)
            if lora is not None:
                record = ModelRecord.from_config(
                    recipe.model, lora.sha256, lora_rank=lora.rank, lora_alpha=lora.alpha,
                    lora_alpha_source=lora.alpha_source,
                )  # fmt: skip
            out.write_atomic(MODEL_RECORD, record.to_json())

    def close(self) -> None:
        """Stop the encoder and source-reading threads."""
        self.writer.close()
        self.renderer.close()

    def run_shard(self, task: ShardTask, progress: Progress | None = None) -> ShardRecord:
        if self.gate is not None:
            return self._run_gated_shard(task, progress)
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

    def _run_gated_shard(self, task: ShardTask, progress: Progress | None) -> ShardRecord:
        """Every batch judged before it is encoded; rejected samples rendered again."""
        plan = self.plan
        seconds, timings = GateSeconds(), {}
        if self.compile_seconds:
            timings["compile"], self.compile_seconds = self.compile_seconds, 0.0

        def decided():
            read_before = self.renderer.source_seconds
            samples = render_gated(self.renderer, self.gate, plan.specs(task), plan.attempt,
                                   plan.recipe.quality, bool(plan.recipe.balance), seconds)  # fmt: skip
            for sample in samples:
                if progress:
                    progress(1)
                yield sample.spec, sample.image, sample.verdict
            # read by the writer once the last sample is in
            timings.update(render=seconds.render, gate=seconds.gate, rejected=seconds.rejected)
            if plan.cohort is not None:
                timings["source_read"] = self.renderer.source_seconds - read_before

        return self.writer.write(task, decided(), seconds=timings)


@dataclass(frozen=True)
class WorkerFactory:
    """What an executor is handed: picklable, so a spawned process or a Ray actor builds its own
    worker where it runs."""

    plan: Plan
    out_url: str

    def __call__(self, device: str) -> Worker:
        return Worker(self.plan, OutDir(self.out_url), device)
