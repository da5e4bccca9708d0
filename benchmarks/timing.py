"""Where a pipeline's time goes: hooks on its components, the UNet's FLOPs, and a matmul peak.

On CUDA every span is a pair of `torch.cuda.Event`s read after one synchronize, so the hooks
never stall the GPU; on CPU they are `time.perf_counter` readings.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import torch

COMPONENTS = (
    "source_read",
    "text_encoder",
    "vae_encode",
    "unet_loop",
    "vae_decode",
    "png_encode",
    "write",
)
# The forward passes; the UNet loop also holds the scheduler steps and the guidance arithmetic.
MODEL_COMPONENTS = ("text_encoder", "vae_encode", "unet_loop", "vae_decode")


class ComponentTimer:
    """Seconds spent in `pipe.text_encoder`, the UNet loop and `pipe.vae.encode`/`decode`.

    The UNet loop runs from the first UNet forward to the last one before another component
    starts, so it includes the scheduler steps and the guidance arithmetic between forwards.
    Work timed on the host (PNG encoding, writing, reading sources) goes in with `add`, from any
    thread.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.spans: dict[str, list[tuple]] = defaultdict(list)
        self.host: dict[str, float] = defaultdict(float)
        self._host_lock = threading.Lock()
        self.unet_forwards = 0
        self._open: dict[str, object] = {}
        self._loop: list = []  # [start mark, last end mark] while a UNet loop is running
        self._undo: list[Callable[[], None]] = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _elapsed(self, start, end) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start

    def _close_loop(self) -> None:
        if self._loop:
            self.spans["unet_loop"].append(tuple(self._loop))
            self._loop = []

    def begin(self, name: str) -> None:
        self._close_loop()
        self._open[name] = self._mark()

    def end(self, name: str) -> None:
        self.spans[name].append((self._open.pop(name), self._mark()))

    def _unet_begin(self, *_) -> None:
        if not self._loop:
            self._loop = [self._mark(), None]

    def _unet_end(self, *_) -> None:
        self.unet_forwards += 1
        self._loop[1] = self._mark()

    def add(self, name: str, seconds: float) -> None:
        with self._host_lock:
            self.host[name] += seconds

    def attach(self, pipe) -> ComponentTimer:
        text = pipe.text_encoder
        handles = [
            text.register_forward_pre_hook(lambda *_: self.begin("text_encoder")),
            text.register_forward_hook(lambda *_: self.end("text_encoder")),
            pipe.unet.register_forward_pre_hook(self._unet_begin),
            pipe.unet.register_forward_hook(self._unet_end),
        ]
        self._undo += [handle.remove for handle in handles]
        vae = pipe.vae
        for method, name in (("decode", "vae_decode"), ("encode", "vae_encode")):
            original = getattr(vae, method)

            def timed(*args, _original=original, _name=name, **kwargs):
                self.begin(_name)
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.end(_name)

            # An instance attribute shadows the class's method; deleting it restores the method.
            setattr(vae, method, timed)
            self._undo.append(lambda _method=method: vars(vae).pop(_method, None))
        return self

    def detach(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []

    def seconds(self) -> dict[str, float]:
        """Total seconds per component (synchronizes the GPU once)."""
        self._close_loop()
        if self.cuda:
            torch.cuda.synchronize()
        totals = {name: 0.0 for name in COMPONENTS}
        for name, spans in self.spans.items():
            totals[name] = sum(self._elapsed(start, end) for start, end in spans)
        for name, value in self.host.items():
            totals[name] += value
        return totals


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def unet_flops(pipe, batch: int, size: int) -> int:
    """FLOPs of one UNet forward on `batch` latents (the CFG batch: twice the images)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from synthgen.render.tuning import uncompiled

    unet = uncompiled(pipe.unet)  # the counter needs the eager module's operators
    latent = size // pipe.vae_scale_factor
    device, dtype = unet.device, unet.dtype
    sample = torch.randn(batch, unet.config.in_channels, latent, latent, device=device, dtype=dtype)
    context_length = pipe.tokenizer.model_max_length
    hidden = torch.randn(
        batch, context_length, unet.config.cross_attention_dim, device=device, dtype=dtype
    )
    # The counter knows CUDA's fused attention kernels but not CPU's: on CPU use the math
    # backend, whose matmuls it counts.
    backend = sdpa_kernel([SDPBackend.MATH]) if device.type == "cpu" else contextlib.nullcontext()
    with torch.inference_mode(), backend, FlopCounterMode(display=False) as counter:
        unet(sample, 500, encoder_hidden_states=hidden)
    return counter.get_total_flops()


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square `torch.matmul`: the denominator of MFU."""
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    synchronize(device)
    repeats = 20 if device.startswith("cuda") else 5
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started)
