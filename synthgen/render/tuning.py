"""Device tuning of a loaded pipeline: a sync-free DDIM, the memory layout and `torch.compile`.

Each changes how the same weights run, not what they compute (up to float rounding: the
tolerances are in tests/test_tuning.py). Compilation happens on the first batch, so the worker
warms up once and reports the seconds apart from rendering.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from synthgen.render.ddim import SyncFreeDDIMScheduler


def tune_pipeline(pipe, device: str, *, compile_unet: bool) -> None:
    if type(pipe.scheduler) is DDIMScheduler:  # bit-identical on CPU: tests/test_tuning.py
        pipe.scheduler = SyncFreeDDIMScheduler.from_config(pipe.scheduler.config)
    if device.startswith("cuda"):
        # Tensor cores read NHWC convolutions without transposes.
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        # Padded batches keep every convolution's shape fixed: cuDNN times its algorithms once
        # per shape and keeps the fastest (GPU runs are not promised bit-identical anyway).
        torch.backends.cudnn.benchmark = True
    if compile_unet:
        # Batches are padded to one size, so one static graph serves the whole run.
        pipe.unet = torch.compile(pipe.unet, dynamic=False)


def uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The eager module under a `torch.compile` wrapper (FLOP counting, state dicts)."""
    return getattr(module, "_orig_mod", module)
