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
import pydicom
from PIL import Image, ImageFile, ImageOps
from pydicom.uid import UID

try:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    _LEGACY_PYDICOM = False
except ImportError:  # pydicom < 3 keeps the same functions under their older names
    from pydicom.pixel_data_handlers.util import (
        apply_color_lut,
        apply_modality_lut,
        apply_voi_lut,
        convert_color_space,
    )

    _LEGACY_PYDICOM = True

MAX_PIXELS: int = 100_000_000
MAX_SIDE: int = 50_000

Fit = Literal["center_crop", "pad", "resize"]

_UNSUPPORTED = "not a supported image format (PNG, JPEG, TIFF, DICOM)"
_CORRUPT = "truncated or corrupt image data"
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_COLOR_DICOM = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"}


class ImageError(Exception):
    """The image cannot be used; the message says why.

    It never names the file: cohort paths often embed patient names or MRNs. The caller adds
    the manifest row instead.
    """


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """Return an 8-bit 'L' or 'RGB' image with every scrap of metadata dropped.

    The format is chosen from the file's first bytes, not its extension: cohort exports often
    name DICOM files `.png` or strip extensions. Raises ImageError for anything unusable.
    """
    with _open_nameless(path) as fp:
        header = fp.read(132)
        fp.seek(0)
        if header[128:132] == b"DICM":
            return _read_dicom(fp)
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
    """Open by descriptor so the file object carries no name.

    PIL and pydicom put `fp.name` into error messages and reprs; without a name, no exception
    raised below (or chained onto an ImageError) can leak the path.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        reason = "file not found"
    except PermissionError:
        reason = "permission denied"
    except OSError as exc:
        reason = f"cannot open file ({exc.strerror})"
    else:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return os.fdopen(fd, "rb")
        os.close(fd)
        reason = "not a regular file (a directory or device?)"
    # Raised outside the except clauses: the OSError names the path and must not ride along
    # as __context__ into logs or error reporters.
    raise ImageError(reason)


def _sniff_pil_format(header: bytes) -> str | None:
    if header.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if header.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if header[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise ImageError(
            f"image is too large ({width}x{height}; limits are {MAX_PIXELS:,} pixels "
            f"and {MAX_SIDE:,} per side)"
        )


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
        try:
            image = Image.open(fp, formats=[fmt])
        except Image.DecompressionBombError:
            raise ImageError(f"image is too large (over {MAX_PIXELS:,} pixels)") from None
        except Exception as exc:
            raise ImageError(_CORRUPT) from exc
        _check_size(*image.size)  # before load(): the header alone tells the size
        try:  # PIL raises a zoo of exception types on corrupt input
            # A JPEG's extra (MPO) frames are previews; a TIFF or APNG stack has no right frame.
            frames = 1 if fmt == "JPEG" else getattr(image, "n_frames", 1)
            image.load()
            image = ImageOps.exif_transpose(image)
        except Exception as exc:
            raise ImageError(_CORRUPT) from exc
    if frames > 1:
        raise ImageError(
            f"multi-frame images are not supported ({frames} frames); export one frame per file"
        )
    return _strip_metadata(_to_8bit(image))


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
        return Image.fromarray(_stretch(np.asarray(image)))
    return image.convert("L" if mode == "1" else "RGB")  # CMYK, YCbCr, LAB, HSV


def _stretch(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map lo..hi linearly onto 0..255 (default: the image's own finite min..max).

    Own min..max, not the container's full range, for 16-bit PNG/TIFF: chest X-rays are
    typically 10-12 bits stored in 16, so full-range scaling would squeeze them into the bottom
    16 grey levels, and they carry no window to tell us better (DICOM does; see _dicom_gray).
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


def _strip_metadata(image: Image.Image) -> Image.Image:
    # A fresh image from raw bytes has empty info: no EXIF, text chunks, ICC or DPI can follow.
    return Image.frombytes(image.mode, image.size, image.tobytes())


def _read_dicom(fp: IO[bytes]) -> Image.Image:
    try:
        ds = pydicom.dcmread(fp)
    except Exception as exc:
        raise ImageError("truncated or corrupt DICOM data") from exc
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageError("DICOM object has no pixel data (a report or other non-image object?)")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageError(
            f"multi-frame DICOM is not supported ({frames} frames); export one frame per file"
        )
    _check_size(int(ds.get("Columns") or 0), int(ds.get("Rows") or 0))
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        # Text burned into the pixels (names, dates) would survive image-to-image generation.
        raise ImageError("DICOM declares burned-in annotation: pixels may show identifying text")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        if syntax is not None and syntax.is_compressed:
            raise ImageError(
                f"cannot decode DICOM pixel data compressed as {syntax.name}: corrupt, or no "
                "decoder for it is installed (pylibjpeg, gdcm)"
            ) from exc
        raise ImageError("truncated or corrupt DICOM pixel data") from exc

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            if pixels.ndim != 2:
                raise ImageError(f"DICOM grayscale pixel data has shape {pixels.shape}")
            gray = _dicom_gray(pixels, ds)
            if photometric == "MONOCHROME1":  # MONOCHROME1 means low values are displayed white
                gray = 255 - gray
            return Image.fromarray(gray)
        return Image.fromarray(_dicom_rgb(pixels, ds, photometric, syntax))
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"inconsistent DICOM pixel attributes ({exc})") from exc


def _dicom_gray(pixels: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Stored values -> modality values (e.g. Hounsfield) -> the file's display window -> 8 bit.

    Scaling the window's output range (not the image's min..max) keeps the contrast the
    modality chose, e.g. a lung window stays a lung window.
    """
    values = apply_modality_lut(pixels, ds)
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return _stretch(apply_voi_lut(values, ds, index=0), 0, 2**bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        # pydicom derives the window's output range from BitsStored and rescale; two extreme
        # probes read it back without repeating its rules here.
        lo, hi = apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0)
        return _stretch(apply_voi_lut(values, ds, index=0), float(lo), float(hi))
    return _stretch(values)


def _dicom_rgb(
    pixels: np.ndarray, ds: pydicom.Dataset, photometric: str, syntax: UID | None
) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    elif photometric not in _COLOR_DICOM:
        raise ImageError(f"unsupported DICOM photometric interpretation {photometric}")
    elif _LEGACY_PYDICOM and photometric.startswith("YBR_FULL"):
        # pydicom >= 3 returns RGB already; 2.x only does so for data it decompressed itself.
        if not getattr(syntax, "is_compressed", False):
            pixels = convert_color_space(pixels, photometric, "RGB")
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ImageError(f"DICOM colour pixel data has shape {pixels.shape}")
    if pixels.dtype == np.uint8:
        return pixels
    # Colour data carries no window: its full stored range is the display range.
    bits = 16 if photometric == "PALETTE COLOR" else int(ds.get("BitsStored") or 16)
    return _stretch(pixels, 0, 2**bits - 1)
