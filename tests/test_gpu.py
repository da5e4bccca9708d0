"""On a CUDA device: no host syncs in the denoising loop, half precision, a compiled UNet.

Skipped without CUDA (the development machine has none); on a GPU machine `make test-gpu`
(which uses the wheels in .whl/ where synthgen is not installed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small_recipe
from diffusers import DDIMScheduler

from synthgen.recipe.schema import recipe_from_dict
from synthgen.render.ddim import SyncFreeDDIMScheduler
from synthgen.render.pipeline import _SD_SCHEDULER, load_pipeline
from synthgen.render.renderer import Renderer
from synthgen.render.tuning import tune_pipeline
from synthgen.run.planning import build_plan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on a lent GPU)"),
]


def recipe(**model):
    base = small_recipe()
    base["model"] = {**base["model"], "dtype": "float16", **model}
    return recipe_from_dict(base)


def test_unet_loop_never_waits_for_the_host():
    pipe = load_pipeline(recipe().model, device="cuda")[0]
    tune_pipeline(pipe, "cuda", compile_unet=False)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(10, device="cuda")
    latents = torch.randn(4, 4, 8, 8, device="cuda", dtype=torch.float16)
    context = torch.randn(4, 77, 32, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            for t in scheduler.timesteps:
                noise = pipe.unet(latents, t, encoder_hidden_states=context).sample
                latents = scheduler.step(noise, t, latents).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(latents).all()


def test_diffusers_ddim_step_syncs_and_ours_does_not():
    for cls, syncs in ((DDIMScheduler, True), (SyncFreeDDIMScheduler, False)):
        scheduler = cls(**_SD_SCHEDULER)
        scheduler.set_timesteps(50, device="cuda")
        sample = torch.randn(2, 4, 8, 8, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            if syncs:
                with pytest.raises(RuntimeError):
                    scheduler.step(sample, scheduler.timesteps[0], sample)
            else:
                scheduler.step(sample, scheduler.timesteps[0], sample)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def render(pipe, r) -> dict[str, np.ndarray]:
    plan = build_plan(r)
    specs = plan.specs(plan.tasks[0])
    pairs = Renderer(pipe, r.generation, "cuda").render(specs)
    return {spec.key: np.asarray(image, dtype=np.int16) for spec, image in pairs}


def test_half_precision_renders_finite_images_and_compile_matches_eager():
    r = recipe()
    pipe = load_pipeline(r.model, device="cuda")[0]
    tune_pipeline(pipe, "cuda", compile_unet=False)
    eager = render(pipe, r)
    assert all(image.max() > 0 for image in eager.values())  # no black (NaN) images
    tune_pipeline(pipe, "cuda", compile_unet=True)
    compiled = render(pipe, r)
    assert max(int(np.abs(eager[k] - compiled[k]).max()) for k in eager) <= 2
