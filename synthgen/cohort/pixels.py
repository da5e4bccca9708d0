"""What every cohort image reader shares: the error type, the size limits, the 8-bit mapping.

Decoders see hostile bytes; their exceptions may quote header values (a DICOM name, an EXIF
string) and their tracebacks would carry them into logs. `guarded` is the one way a decoder is
called: whatever it raises becomes an ImageError with our own words and no chained exception.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

MAX_PIXELS: int = 100_000_000
MAX_SIDE: int = 50_000

T = TypeVar("T")


class ImageError(Exception):
    """The image cannot be used; the message says why.

    It never names the file (cohort paths often embed patient names or MRNs) nor quotes
    anything read from it. The caller adds the manifest row instead.
    """


def guarded(call: Callable[[], T], reason: str) -> T:
    """`call()`, with any failure but our own ImageError turned into ImageError(reason).

    Raised after the except clause, so the decoder's exception (and its text) is neither the
    cause nor the context of what the caller sees.
    """
    try:
        return call()
    except ImageError:
        raise
    except Exception:  # noqa: BLE001 - decoders raise every type there is on hostile input
        pass
    raise ImageError(reason)


def check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise ImageError(
            f"image is too large ({width}x{height}; limits are {MAX_PIXELS:,} pixels "
            f"and {MAX_SIDE:,} per side)"
        )


def stretch(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map lo..hi linearly onto 0..255 (default: the image's own finite min..max).

    Own min..max, not the container's full range, for 16-bit PNG/TIFF: chest X-rays are
    typically 10-12 bits stored in 16, so full-range scaling would squeeze them into the bottom
    16 grey levels, and they carry no window to tell us better (DICOM does).
    """
    if lo is None or hi is None:
        finite = values if np.issubdtype(values.dtype, np.integer) else values[np.isfinite(values)]
        if finite.size == 0:
            return np.zeros(values.shape, dtype=np.uint8)
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    scaled = np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255)
    return np.rint(scaled).astype(np.uint8)
