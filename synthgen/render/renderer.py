"""Renderer: turn sample specs into images, batch by batch, one generator per sample.

Each sample draws its initial noise from its own `torch.Generator` seeded by the plan, and every
batch is padded to the full batch size, so an image does not depend on which batch it landed in:
on CPU the pixels are byte-identical whatever the shard size, resume point or worker count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from synthgen.plan import SampleSpec
from synthgen.recipe.schema import GenerationConfig
from synthgen.render.prompt_cache import PromptEmbeddings

SourceLoader = Callable[[int], Image.Image]  # cohort row number -> the model's input image
Sources = list[Future] | None  # per sample: its source image as a (1, 3, H, W) tensor in [-1, 1]
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
        self.prompts = PromptEmbeddings(pipe, device, generation.batch_size)
        self.source_seconds = 0.0  # summed over the reader threads, for the shards' stats
        self._source_lock = threading.Lock()
        self.readers = None
        if generation.mode == "i2i":
            if load_source is None:
                raise ValueError("an i2i renderer needs a source loader")
            # Decoding cohort files (PNG, JPEG, DICOM) releases the GIL: it overlaps the GPU.
            self.readers = ThreadPoolExecutor(4, "source")

    def close(self) -> None:
        """Stop the source-reading threads (i2i)."""
        if self.readers is not None:
            self.readers.shutdown(wait=True)

    def render(self, specs: Sequence[SampleSpec]) -> Iterator[tuple[SampleSpec, Image.Image]]:
        """(spec, image) in order; batch k+1's sources are read while batch k renders."""
        size = self.batch_size
        batches = [list(specs[start : start + size]) for start in range(0, len(specs), size)]
        upcoming = self._read_sources(batches[0]) if batches else None
        for index, batch in enumerate(batches):
            sources = upcoming
            if index + 1 < len(batches):
                upcoming = self._read_sources(batches[index + 1])
            yield from self._render_batch(batch, sources)

    def warm_up(self, spec: SampleSpec) -> None:
        """Render (and drop) one full batch: a compiled UNet compiles here, not in a shard."""
        for _ in self._render_batch([spec], self._read_sources([spec])):
            pass

    def _read_sources(self, batch: list[SampleSpec]) -> Sources:
        if self.readers is None:
            return None
        return [self.readers.submit(self._source_pixels, spec) for spec in batch]

    def _source_pixels(self, spec: SampleSpec) -> torch.Tensor:
        started = time.perf_counter()
        pixels = self.pipe.image_processor.preprocess(self.load_source(spec.source_row))
        with self._source_lock:
            self.source_seconds += time.perf_counter() - started
        return pixels

    def _render_batch(self, batch: list[SampleSpec], sources: Sources):
        size = self.batch_size
        if len(batch) > size:  # planned before an out-of-memory retry shrank the batch
            for start in range(0, len(batch), size):
                part = sources[start : start + size] if sources else None
                yield from self._render_batch(batch[start : start + size], part)
            return
        pad = size - len(batch)
        try:
            images = self._call(
                batch + batch[-1:] * pad, sources + sources[-1:] * pad if sources else None
            )
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            # Retry in halves, and keep the smaller batch for the rest of the run.
            torch.cuda.empty_cache()
            self.batch_size = size // 2
            log.warning("out of memory at batch size %d; retrying at %d", size, self.batch_size)
            yield from self._render_batch(batch, sources)
            return
        yield from zip(batch, images)

    def _call(self, specs: list[SampleSpec], sources: Sources) -> list[Image.Image]:
        g = self.generation
        generators = [torch.Generator(self.device).manual_seed(s.seed) for s in specs]
        with torch.inference_mode():
            embeds = self.prompts([s.prompt for s in specs])
            kwargs = dict(
                prompt_embeds=embeds,
                negative_prompt_embeds=self.prompts([g.negative_prompt or ""]).expand_as(embeds),
                num_inference_steps=g.steps,
                guidance_scale=g.guidance_scale,
                generator=generators,
                output_type="latent",
            )
            if g.mode == "i2i":
                pixels = [future.result() for future in sources]
                # a batch comes from one shard, and a shard has one strength (plan.py)
                kwargs.update(image=self._encode(pixels, generators), strength=specs[0].strength)
            else:
                kwargs.update(height=g.height, width=g.width)
            pixels = self._decode(self.pipe(**kwargs).images)
        return [Image.fromarray(array) for array in pixels.numpy()]

    def _encode(self, pixels: list[torch.Tensor], generators: list[torch.Generator]):
        """Source images to scaled latents in one VAE call (diffusers encodes them one by one
        when each sample has its own generator); each sample's posterior draw uses its own
        generator first, as in diffusers, so the noise that follows is the same."""
        vae = self.pipe.vae
        posterior = vae.encode(torch.cat(pixels).to(self.device, vae.dtype)).latent_dist
        shape = (1, *posterior.mean.shape[1:])
        draws = [
            randn_tensor(shape, generator=g, device=vae.device, dtype=vae.dtype) for g in generators
        ]
        return vae.config.scaling_factor * (posterior.mean + posterior.std * torch.cat(draws))

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
