"""Speed work checked against the unoptimised path on the same seeds.

Tolerances: the sync-free DDIM is bit-identical; prompt-embedding reuse and the batched i2i VAE
encode are within 1 grey level (0-255) of plain diffusers calls; torch.compile within 2.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_recipe
from diffusers import DDIMScheduler
from PIL import Image
from test_i2i import i2i_recipe

from synthgen.cohort.demo import make_cohort
from synthgen.cohort.rows import source_image_loader
from synthgen.recipe.schema import LoraConfig, ModelConfig, recipe_from_dict
from synthgen.render.ddim import SyncFreeDDIMScheduler
from synthgen.render.pipeline import _SD_SCHEDULER, load_pipeline
from synthgen.render.renderer import Renderer
from synthgen.render.tuning import tune_pipeline
from synthgen.run.generate import generate
from synthgen.run.planning import build_plan


@pytest.fixture(scope="module")
def pipes():
    recipe = recipe_from_dict(small_recipe())
    return {mode: load_pipeline(recipe.model, mode=mode)[0] for mode in ("t2i", "i2i")}


def pixels(pairs) -> dict[str, np.ndarray]:
    return {spec.key: np.asarray(image, dtype=np.int16) for spec, image in pairs}


def max_diff(a: dict, b: dict) -> int:
    assert a.keys() == b.keys()
    return max(int(np.abs(a[k] - b[k]).max()) for k in a)


def decoded(renderer: Renderer, latents: torch.Tensor) -> list[np.ndarray]:
    with torch.inference_mode():
        return [np.asarray(a, dtype=np.int16) for a in renderer._decode(latents).numpy()]


def test_sync_free_ddim_is_bit_identical_to_diffusers():
    ours, theirs = SyncFreeDDIMScheduler(**_SD_SCHEDULER), DDIMScheduler(**_SD_SCHEDULER)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(50)
    torch.manual_seed(0)
    a = b = torch.randn(2, 4, 8, 8)
    for t in theirs.timesteps:
        noise = torch.randn(2, 4, 8, 8)
        a, b = ours.step(noise, t, a).prev_sample, theirs.step(noise, t, b).prev_sample
        assert torch.equal(a, b)


def test_sync_free_ddim_never_reads_a_value_on_the_host():
    # On the meta device every value is unknown: any host read (`.item()`, `if tensor`,
    # indexing with a 0-d tensor) raises. No GPU is needed to show the step has none.
    ours, theirs = SyncFreeDDIMScheduler(**_SD_SCHEDULER), DDIMScheduler(**_SD_SCHEDULER)
    sample = torch.empty(2, 4, 8, 8, device="meta")
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(50, device="meta")
    for t in ours.timesteps[-3:]:  # the last step takes the final-alpha branch
        assert ours.step(sample, t, sample).prev_sample.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):
        theirs.step(sample, theirs.timesteps[0], sample)


def test_worker_tuning_swaps_in_the_sync_free_ddim(pipes):
    pipe = load_pipeline(recipe_from_dict(small_recipe()).model)[0]
    tune_pipeline(pipe, "cpu", compile_unet=False)
    assert type(pipe.scheduler) is SyncFreeDDIMScheduler
    assert pipe.scheduler.config == pipes["t2i"].scheduler.config


def test_text_encoder_runs_once_per_distinct_prompt(pipes):
    pipe = pipes["t2i"]
    recipe = recipe_from_dict(small_recipe())
    plan = build_plan(recipe)
    specs = [spec for task in plan.tasks for spec in plan.specs(task)]
    specs = [spec for spec in specs[:4] for _ in range(3)]  # each prompt three times
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape))
    try:
        renderer = Renderer(pipe, recipe.generation)
        ours = pixels(renderer.render(specs))
    finally:
        hook.remove()
    distinct = len({spec.prompt for spec in specs})
    assert renderer.prompts.encoded == distinct + 1  # + the empty negative prompt
    assert len(calls) <= distinct + 1 and all(shape[0] == 4 for shape in calls)  # padded batches
    # The plain pipeline call, which encodes every prompt of every batch, gives the same images.
    g = recipe.generation
    for start in range(0, len(specs), 4):
        batch = specs[start : start + 4]
        with torch.inference_mode():
            latents = pipe(
                prompt=[s.prompt for s in batch],
                generator=[torch.Generator().manual_seed(s.seed) for s in batch],
                num_inference_steps=g.steps, guidance_scale=g.guidance_scale,
                height=g.height, width=g.width, output_type="latent",
            ).images  # fmt: skip
        plain = dict(zip([s.key for s in batch], decoded(renderer, latents)))
        assert max(int(np.abs(ours[k] - plain[k]).max()) for k in plain) <= 1


def test_i2i_batched_encode_and_prefetch_match_diffusers(tmp_path, pipes):
    pipe = pipes["i2i"]
    cohort = make_cohort(tmp_path / "cohort", rows=6, marker="X")
    recipe = recipe_from_dict(i2i_recipe(cohort, tmp_path / "linkage.csv"))
    plan = build_plan(recipe)
    specs = [spec for task in plan.tasks for spec in plan.specs(task)]
    load_row = source_image_loader(plan.cohort, recipe.source.preprocess)
    threads = set()

    def load(row):
        threads.add(threading.current_thread().name)
        return load_row(row)

    renderer = Renderer(pipe, recipe.generation, load_source=load)
    ours = pixels(renderer.render(specs))
    assert threads and all(name.startswith("source") for name in threads)  # off the render thread
    g = recipe.generation
    for start in range(0, len(specs), 4):
        batch = specs[start : start + 4]
        batch += batch[-1:] * (4 - len(batch))
        with torch.inference_mode():
            latents = pipe(
                prompt=[s.prompt for s in batch],
                image=[load_row(s.source_row) for s in batch],
                strength=batch[0].strength,
                generator=[torch.Generator().manual_seed(s.seed) for s in batch],
                num_inference_steps=g.steps, guidance_scale=g.guidance_scale,
                output_type="latent",
            ).images  # fmt: skip
        plain = dict(zip([s.key for s in batch], decoded(renderer, latents)))
        assert max(int(np.abs(ours[k] - plain[k]).max()) for k in plain) <= 1


def test_channels_last_layout_keeps_the_images(pipes):
    recipe = recipe_from_dict(small_recipe())
    plan = build_plan(recipe)
    specs = plan.specs(plan.tasks[0])[:4]
    pipe = load_pipeline(recipe.model)[0]
    before = pixels(Renderer(pipe, recipe.generation).render(specs))
    pipe.unet.to(memory_format=torch.channels_last)  # what tune_pipeline does on CUDA
    pipe.vae.to(memory_format=torch.channels_last)
    after = pixels(Renderer(pipe, recipe.generation).render(specs))
    assert max_diff(before, after) <= 1


@pytest.mark.slow
def test_compiled_unet_matches_eager_and_reports_compile_time(tmp_path):
    # Inductor compiles the tiny UNet in about a minute on 2 cores (seconds once cached).
    eager_out, compiled_out = tmp_path / "eager", tmp_path / "compiled"
    base = small_recipe(num_samples=8, shard_size=4)
    generate(recipe_from_dict(base), str(eager_out))
    compiled = {**base, "model": {**base["model"], "compile": True}}
    generate(recipe_from_dict(compiled), str(compiled_out))
    eager, ours = read_images(eager_out), read_images(compiled_out)
    assert max_diff(eager, ours) <= 2
    commits = [json.loads(p.read_text()) for p in (compiled_out / ".synthgen/commits").iterdir()]
    compile_seconds = [c["seconds"]["compile"] for c in commits if "compile" in c["seconds"]]
    assert len(compile_seconds) == 1 and compile_seconds[0] > 0  # once, with the first shard


def read_images(out: Path) -> dict[str, np.ndarray]:
    images = {}
    for path in sorted((out / "parquet").glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "image"]).to_pylist()
        for row in table:
            image = Image.open(io.BytesIO(row["image"]["bytes"]))
            images[row["key"]] = np.asarray(image, dtype=np.int16)
    return images


def test_attention_runs_through_pytorch_sdpa_with_a_fused_lora(tmp_path, pipes):
    # SDPA picks flash / memory-efficient kernels on CUDA; loading and fusing a LoRA must keep it.
    from diffusers.models.attention_processor import AttnProcessor2_0
    from lora_files import peft_lora_state, write_peft_layout

    path = write_peft_layout(peft_lora_state(pipes["t2i"].unet), tmp_path / "lora.safetensors")
    model = ModelConfig(base="tiny", lora=LoraConfig(path=str(path)))
    processors = load_pipeline(model)[0].unet.attn_processors.values()
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)
