"""The two ways of making the same images, each timed end to end and component by component.

- seed loop: the model card's Quick Start in a loop, `pipe(prompt)` one image at a time, then
  `image.save(png)`;
- synthgen: a `Worker` on the benchmark recipe, `run_shard` for every shard, i.e. the renderer's
  batches, PNG encoding, the WebDataset tar and the Parquet file, sha256 and the atomic commit.
  The pipeline load is left out of both, and each gets one untimed warm-up call first.

synthgen encodes images in a thread pool while the next batch renders, and reads the next i2i
batch's sources in threads too: its `png_encode` and `source_read` are pool-thread seconds,
overlapped with the rest, so they are left out of the sum that `other` closes.
"""

from __future__ import annotations

import io
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fixtures import Settings
from PIL import Image
from timing import COMPONENTS, MODEL_COMPONENTS, ComponentTimer, synchronize


@dataclass
class PathTiming:
    images: int
    wall: float
    cpu: float  # process CPU seconds, every thread: steadier than wall on a shared machine
    seconds: dict[str, float]  # per component, summed over the run
    unet_forwards: int
    unet_batch: int
    extra: dict[str, float] = field(default_factory=dict)
    overlapped: tuple[str, ...] = ()  # components that ran beside the others, in other threads

    def summary(self) -> dict:
        per_image = {name: self.seconds[name] / self.images for name in COMPONENTS}
        serial = sum(value for name, value in per_image.items() if name not in self.overlapped)
        per_image["other"] = self.wall / self.images - serial
        per_image["total"] = self.wall / self.images
        model = sum(self.seconds[name] for name in MODEL_COMPONENTS)
        return {
            "images_per_s": round(self.images / self.wall, 4),
            "cpu_s_per_image": round(self.cpu / self.images, 5),
            "s_per_image": {name: round(value, 5) for name, value in per_image.items()},
            "overlapped": list(self.overlapped),
            # everything but the text encoder, UNet loop and VAE passes (issue target: < 5% on GPU)
            "non_model_share": round(max(0.0, 1 - model / self.wall), 4),
            "unet_forwards": self.unet_forwards,
            "unet_batch": self.unet_batch,
            **{name: round(value, 4) for name, value in self.extra.items()},
        }


def cfg_factor(settings: Settings) -> int:
    """Classifier-free guidance runs the UNet on the prompt and the empty prompt together."""
    return 2 if settings.guidance_scale > 1 else 1


def seed_loop(pipe, specs: list, sources: dict, settings: Settings, folder: Path) -> PathTiming:
    """One `pipe(...)` call and one `image.save` per image; with --check, per-sample seeds."""
    folder.mkdir(parents=True, exist_ok=True)
    device = settings.device

    def one(spec, timer: ComponentTimer | None) -> Image.Image:
        kwargs = {"num_inference_steps": settings.steps, "guidance_scale": settings.guidance_scale}
        if settings.check:
            kwargs["generator"] = torch.Generator(device).manual_seed(spec.seed)
        if spec.source_row is None:
            return pipe(spec.prompt, height=settings.size, width=settings.size, **kwargs).images[0]
        started = time.perf_counter()
        source = Image.open(sources[spec.source_row]).resize((settings.size, settings.size))
        if timer:
            timer.add("source_read", time.perf_counter() - started)
        return pipe(prompt=spec.prompt, image=source, strength=settings.strength, **kwargs).images[
            0
        ]

    one(specs[0], None)  # warm-up
    timer = ComponentTimer(device).attach(pipe)
    synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for spec in specs:
        image = one(spec, timer)
        encode_started = time.perf_counter()
        image.save(folder / f"{spec.key}.png")  # the seed's save: encode and write in one
        timer.add("png_encode", time.perf_counter() - encode_started)
    synchronize(device)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    timer.detach()
    return PathTiming(
        len(specs), wall, cpu, timer.seconds(), timer.unet_forwards, cfg_factor(settings)
    )


def synthgen_path(plan, settings: Settings, folder: Path) -> tuple[PathTiming, object]:
    """Every shard of `plan` through a Worker into `folder`; returns the timing and the pipe."""
    from synthgen.output.outdir import OutDir
    from synthgen.run.finalize import finalize
    from synthgen.run.generate import claim_output
    from synthgen.run.worker import Worker

    device = settings.device
    out = OutDir(str(folder))
    claim_output(out, plan.recipe, plan)
    worker = Worker(plan, out, device)  # loads the pipeline, like the seed's from_pretrained
    compile_seconds = worker.compile_seconds  # its warm-up batch, when the recipe compiles
    renderer = worker.renderer
    warm = plan.specs(plan.tasks[0])[: settings.batch_size]
    list(renderer.render(warm))  # warm-up: one full batch, not written
    renderer.prompts.cache.clear()  # the timed run encodes its prompts, as the seed loop does

    timer = ComponentTimer(device).attach(renderer.pipe)
    try:
        synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        for task in plan.tasks:
            # The shard's own stats: pool-thread encode and reader-thread source seconds, and
            # `write`, what the main thread spent after the last batch (writer tail, commit).
            seconds = worker.run_shard(task).seconds
            timer.add("png_encode", seconds["encode"])
            timer.add("source_read", seconds.get("source_read", 0.0))
            timer.add("write", seconds["write"])
        synchronize(device)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        timer.detach()
    finalize_started = time.perf_counter()
    finalize(out)  # once per dataset, not per image: reported beside the per-image numbers
    extra = {
        "finalize_s": time.perf_counter() - finalize_started,
        "load_s": worker.load_seconds,
        "compile_s": compile_seconds,
    }
    batch = cfg_factor(settings) * settings.batch_size
    # PNG encoding runs in the writer's pool, i2i sources are read in the renderer's threads
    overlapped = ("png_encode", "source_read")
    timing = PathTiming(
        plan.total, wall, cpu, timer.seconds(), timer.unet_forwards, batch, extra, overlapped
    )
    return timing, renderer.pipe


def compare_images(seed_folder: Path, out_folder: Path) -> dict:
    """Max and mean absolute pixel difference (0-255) between the two contenders' images."""
    synthgen_images = {}
    for path in sorted((out_folder / "webdataset").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    data = tar.extractfile(member).read()
                    synthgen_images[member.name.removesuffix(".png")] = _pixels(data)
    diffs = []
    for key, theirs in synthgen_images.items():
        ours = _pixels((seed_folder / f"{key}.png").read_bytes())
        diffs.append(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)))
    return {
        "images": len(diffs),
        "max_abs_pixel_diff": int(max(d.max() for d in diffs)),
        "mean_abs_pixel_diff": round(float(np.mean([d.mean() for d in diffs])), 4),
        "identical_images": sum(int(d.max() == 0) for d in diffs),
        "pixels_off_by_more_than_1": round(float(np.mean([(d > 1).mean() for d in diffs])), 6),
    }


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
