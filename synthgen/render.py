"""Renderer: turn sample specs into images, batch by batch, one generator per sample.

Each sample draws its initial noise from its own `torch.Generator` seeded by the plan, and every
batch is padded to the full batch size, so an image does not depend on which batch it landed in:
on CPU the pixels are byte-identical whatever the shard size, resume point or worker count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image

from synthgen.plan import SampleSpec
from synthgen.recipe import GenerationConfig

SourceLoader = Callable[[SampleSpec], Image.Image]
log = logging.getLogger("synthgen")


class Renderer:
    def __init__(
        self,
        pipe,
        generation: GenerationConfig,
        device: str = "cpu",
        load_source: SourceLoader | None = None,
    ):
        self.pipe = pipe
        self.generation = generation
        self.device = device
        self.load_source = load_source
        self.batch_size = generation.batch_size
        if generation.mode == "i2i" and load_source is None:
            raise ValueError("an i2i renderer needs a source loader")

    def render(self, specs: Sequence[SampleSpec]) -> Iterator[tuple[SampleSpec, Image.Image]]:
        size = self.batch_size
        for start in range(0, len(specs), size):
            yield from self._render_batch(list(specs[start : start + size]), size)

    def _render_batch(self, batch: list[SampleSpec], size: int):
        padded = batch + [batch[-1]] * (size - len(batch))
        try:
            images = self._call(padded)
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            # Retry in halves, and keep the smaller batch for the rest of the run.
            torch.cuda.empty_cache()
            self.batch_size = size // 2
            log.warning("out of memory at batch size %d; retrying at %d", size, self.batch_size)
            for start in range(0, len(batch), self.batch_size):
                yield from self._render_batch(
                    batch[start : start + self.batch_size], self.batch_size
                )
            return
        yield from zip(batch, images)

    def _call(self, specs: list[SampleSpec]) -> list[Image.Image]:
        g = self.generation
        generators = [torch.Generator(self.device).manual_seed(s.seed) for s in specs]
        kwargs = dict(
            prompt=[s.prompt for s in specs],
            negative_prompt=[g.negative_prompt] * len(specs) if g.negative_prompt else None,
            num_inference_steps=g.steps,
            guidance_scale=g.guidance_scale,
            generator=generators,
            output_type="latent",
        )
        if g.mode == "i2i":
            strengths = {s.strength for s in specs}
            if len(strengths) != 1:
                raise ValueError("an i2i batch must share one strength")
            kwargs.update(image=[self.load_source(s) for s in specs], strength=strengths.pop())
        else:
            kwargs.update(height=g.height, width=g.width)
        with torch.inference_mode():
            pixels = self._decode(self.pipe(**kwargs).images)
        return [Image.fromarray(array) for array in pixels.numpy()]

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to uint8 HxWxC on the host, decoded here rather than in the pipeline so that
        a half-precision VAE that overflows (NaN, black images) is redone in float32."""
        vae = self.pipe.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[
            0
        ]
        if not torch.isfinite(decoded).all() and vae.dtype != torch.float32:
            log.warning("the VAE overflowed in %s; decoding in float32 from now on", vae.dtype)
            vae.to(torch.float32)
            decoded = vae.decode(latents.float() / vae.config.scaling_factor, return_dict=False)[0]
        images = (decoded / 2 + 0.5).clamp(0, 1)
        # To uint8 on the device: a quarter of the bytes to copy, and no float work on the host.
        return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
