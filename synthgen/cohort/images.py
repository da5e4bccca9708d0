"""Turn a cohort image file (PNG, JPEG, TIFF, DICOM) into a metadata-free 8-bit PIL image.

`preprocess` then squares it for the image-to-image model.
"""

from __future__ import annotations

import os
import stat
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps

from synthgen.cohort.dicom import is_dicom, read_dicom
from synthgen.cohort.pixels import MAX_PIXELS, ImageError, check_size, guarded, stretch

__all__ = ["ImageError", "preprocess", "read_image", "to_model_rgb"]

Fit = Literal["center_crop", "pad", "resize"]

_HEADER_BYTES = 1024  # enough for PNG/JPEG/TIFF magic and a preamble-less DICOM's first tags
_UNSUPPORTED = "not a supported image format (PNG, JPEG, TIFF, DICOM)"
_CORRUPT = "truncated or corrupt image data"
_NOT_REGULAR = "not a regular file (a directory, pipe, socket or device?)"
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """Return an 8-bit 'L' or 'RGB' image with every scrap of metadata dropped.

    The format is chosen from the file's first bytes, not its extension: cohort exports often
    name DICOM files `.png` or strip extensions. Raises ImageError for anything unusable.
    """
    with _open_nameless(path) as fp:
        header = fp.read(_HEADER_BYTES)
        fp.seek(0)
        if is_dicom(header):
            return read_dicom(fp)
        fmt = _sniff_pil_format(header)
        if fmt is None:
            raise ImageError(_UNSUPPORTED)
        return _read_pil(fp, fmt)


def to_model_rgb(image: Image.Image) -> Image.Image:
    """Give the model the 3 channels it was trained on; grayscale is repeated per channel."""
    return _strip_metadata(_to_8bit(image)).convert("RGB")


def preprocess(image: Image.Image, size: int, fit: Fit) -> Image.Image:
    """Square an 'L' or 'RGB' image to `size` x `size`.

    center_crop scales the short side to `size` and crops the centre (no distortion, loses the
    edges); pad scales the long side to `size` and pads black (keeps everything, wastes pixels);
    resize stretches (keeps everything, distorts the aspect). Lanczos matches what diffusers'
    image processor uses, so the model sees the resampling it was trained with.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    lanczos = Image.Resampling.LANCZOS
    if fit == "center_crop":
        return ImageOps.fit(image, (size, size), method=lanczos)
    if fit == "pad":
        return ImageOps.pad(image, (size, size), method=lanczos, color=0)
    if fit == "resize":
        return image.resize((size, size), lanczos)
    raise ValueError(f"unknown fit {fit!r}; expected center_crop, pad or resize")


def _open_nameless(path: str | os.PathLike[str]) -> IO[bytes]:
    """Open a regular file by descriptor, so the file object carries no name.

    PIL and pydicom put `fp.name` into error messages and reprs; without a name, no exception
    raised below can leak the path. The type is checked before opening and again on the open
    descriptor: opening a FIFO blocks until a writer comes (forever, in a cohort folder), a
    device may have side effects, and the path may be swapped in between. O_NONBLOCK makes the
    open itself return at once whatever the path has become.
    """
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_NOCTTY", 0)
    reason = None
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            fd = os.open(path, flags)
        else:
            reason = _NOT_REGULAR
    except FileNotFoundError:
        reason = "file not found"
    except PermissionError:
        reason = "permission denied"
    except OSError as exc:
        reason = f"cannot open file ({exc.strerror})"
    except ValueError:  # a NUL byte in the path
        reason = "invalid file path"
    if reason is None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            _set_blocking(fd)
            return os.fdopen(fd, "rb")
        os.close(fd)
        reason = _NOT_REGULAR
    # Raised outside the except clauses: the OSError names the path and must not ride along
    # as __context__ into logs or error reporters.
    raise ImageError(reason)


def _set_blocking(fd: int) -> None:
    """Plain blocking reads from here on (O_NONBLOCK was for the open only)."""
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)


def _sniff_pil_format(header: bytes) -> str | None:
    if header.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if header.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if header[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


_strict_lock = threading.Lock()
_strict_depth = 0
_saved_load_truncated = False


@contextmanager
def _strict_truncation() -> Iterator[None]:
    """Keep PIL's global LOAD_TRUNCATED_IMAGES off while decoding.

    Training code often switches it on process-wide; then PIL silently pads truncated files with
    grey/black and we would synthesise from half an X-ray. A depth count (not a lock held over
    the decode) lets concurrent reads stay parallel and restores the caller's value at the end.
    """
    global _strict_depth, _saved_load_truncated
    with _strict_lock:
        if _strict_depth == 0:
            _saved_load_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_depth += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_depth -= 1
            if _strict_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_load_truncated


def _read_pil(fp: IO[bytes], fmt: str) -> Image.Image:
    with _strict_truncation(), warnings.catch_warnings():
        # Our own size limit below applies whatever the global Image.MAX_IMAGE_PIXELS says.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = guarded(lambda: _open_pil(fp, fmt), _CORRUPT)
        check_size(*image.size)  # before load(): the header alone tells the size
        # A JPEG's extra (MPO) frames are previews; a TIFF or APNG stack has no right frame.
        frames = 1 if fmt == "JPEG" else guarded(lambda: getattr(image, "n_frames", 1), _CORRUPT)
        image = guarded(lambda: _load_upright(image), _CORRUPT)
    if frames > 1:
        raise ImageError(
            f"multi-frame images are not supported ({frames} frames); export one frame per file"
        )
    return guarded(lambda: _strip_metadata(_to_8bit(image)), _CORRUPT)


def _open_pil(fp: IO[bytes], fmt: str) -> Image.Image:
    try:
        return Image.open(fp, formats=[fmt])
    except Image.DecompressionBombError:
        pass
    raise ImageError(f"image is too large (over {MAX_PIXELS:,} pixels)")


def _load_upright(image: Image.Image) -> Image.Image:
    image.load()
    return ImageOps.exif_transpose(image)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Bring any PIL mode to 'L' or 'RGB' without losing contrast."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in _ALPHA_MODES:
        # Transparent areas become black, like the padding, never a random underlying colour.
        base = "L" if mode in ("LA", "La") else "RGB"
        rgba = image.convert("LA" if base == "L" else "RGBA")
        out = Image.new(base, image.size, 0)
        out.paste(rgba.convert(base), mask=rgba.getchannel("A"))
        return out
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(stretch(np.asarray(image)))
    return image.convert("L" if mode == "1" else "RGB")  # CMYK, YCbCr, LAB, HSV


def _strip_metadata(image: Image.Image) -> Image.Image:
    # A fresh image from raw bytes has empty info: no EXIF, text chunks, ICC or DPI can follow.
    return Image.frombytes(image.mode, image.size, image.tobytes())
