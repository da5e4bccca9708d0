"""Renderer: batches padded to one size, out-of-memory retries, the float32 VAE fallback."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import small_recipe

from synthgen.plan import Plan
from synthgen.recipe.schema import recipe_from_dict
from synthgen.render.pipeline import load_pipeline
from synthgen.render.renderer import Renderer


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(recipe_from_dict(small_recipe()).model)[0]


def digests(pairs) -> dict[str, str]:
    return {spec.key: hashlib.sha256(image.tobytes()).hexdigest() for spec, image in pairs}


def test_images_do_not_depend_on_the_batch_they_land_in(pipe):
    recipe = recipe_from_dict(small_recipe())
    plan = Plan(recipe)
    specs = plan.specs(plan.tasks[0])[:6]
    whole = digests(Renderer(pipe, recipe.generation).render(specs))
    tail = digests(Renderer(pipe, recipe.generation).render(specs[3:]))  # other batch-mates
    assert {k: whole[k] for k in tail} == tail


def test_out_of_memory_retries_in_smaller_batches(pipe):
    # No GPU here: a real CUDA out-of-memory cannot happen, so the pipeline raises the real
    # torch.OutOfMemoryError for batches above 2, as a card with too little memory would.
    recipe = recipe_from_dict(small_recipe())
    plan = Plan(recipe)
    specs = plan.specs(plan.tasks[0])[:5]

    class SmallCard:
        def __getattr__(self, name):
            return getattr(pipe, name)

        def __call__(self, **kwargs):
            if len(kwargs["prompt_embeds"]) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated: no GPU in tests)")
            return pipe(**kwargs)

    renderer = Renderer(SmallCard(), recipe.generation)
    got = digests(renderer.render(specs))
    assert renderer.batch_size == 2 and len(got) == 5
    small = recipe.generation.model_copy(update={"batch_size": 2})
    assert got == digests(Renderer(pipe, small).render(specs))


def test_half_precision_vae_overflow_is_redone_in_float32(pipe):
    recipe = recipe_from_dict(small_recipe())
    renderer = Renderer(pipe, recipe.generation)
    pipe.vae.to(torch.float16)
    try:
        latents = torch.full((1, 4, 8, 8), 3e4)  # past float16's range inside the decoder
        with torch.inference_mode():
            pixels = renderer._decode(latents)
        assert pipe.vae.dtype == torch.float32
        assert pixels.dtype == torch.uint8 and pixels.shape == (1, 64, 64, 3)
    finally:
        pipe.vae.to(torch.float32)
