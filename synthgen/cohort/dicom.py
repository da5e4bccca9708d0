"""Recognise a DICOM file (with or without its 128-byte preamble) and decode its pixels to 8 bits.

Compressed transfer syntaxes go through the decoders pydicom finds (pylibjpeg with its libjpeg,
openjpeg and RLE plugins, installed with synthgen). Every failure is an ImageError quoting
nothing from the file: DICOM headers hold names, ids and dates.

pydicom reports odd headers through `warnings` and the `pydicom` logger, quoting the values it
found (`Invalid value for VR DA: '<a patient's name>'`). Reading a cohort must not print them
nor put them in worker logs, so each read silences pydicom's warnings and stops its log
records from reaching the process's handlers. A process that imports the cohort reader gives
up pydicom's diagnostics: they are exactly what must not be shown.
"""

from __future__ import annotations

import logging
import struct
import warnings
from typing import IO

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from synthgen.cohort.pixels import ImageError, check_size, guarded, stretch

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

# Warnings are attributed to the module at the warning's stack level: pydicom's own, or this
# module (the caller of pydicom) for a warning issued one level up.
_PYDICOM_MODULES = r"(pydicom|synthgen\.cohort\.dicom)(\.|$)"

_COLOR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"}
# Value representations; those after the gap have 2 reserved bytes and a 4-byte length.
_SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO",
              b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}  # fmt: skip
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}  # fmt: skip
# A dataset without preamble starts with its file meta (group 0002) or, without one, with the
# identifying group 0008 that every image object has (SOP Class, Specific Character Set, …).
_FIRST_GROUPS = (0x0002, 0x0008)


def is_dicom(header: bytes) -> bool:
    """True for a DICOM file, recognised from its first bytes.

    With the preamble, the `DICM` magic at byte 128 says it. Without, the file must open with
    two well-formed data elements of group 0002 or 0008 in ascending tag order (explicit or
    implicit VR little endian, or explicit big endian): only then is pydicom asked to read it
    with `force=True`, which parses any bytes at all into some dataset.
    """
    if header[128:132] == b"DICM":
        return True
    return any(
        _leading_tags(header, order, explicit) is not None
        for order, explicit in (("<", True), ("<", False), (">", True))
    )


def _leading_tags(header: bytes, order: str, explicit: bool) -> list[tuple[int, int]] | None:
    """The tags of the first two elements if they parse in this encoding and look right."""
    tags, pos = [], 0
    for _ in range(2):
        if pos + 8 > len(header):
            return None
        group, element = struct.unpack_from(f"{order}HH", header, pos)
        if explicit:
            vr = header[pos + 4 : pos + 6]
            if vr in _SHORT_VRS:
                (length,), pos = struct.unpack_from(f"{order}H", header, pos + 6), pos + 8
            elif (
                vr in _LONG_VRS and header[pos + 6 : pos + 8] == b"\0\0" and pos + 12 <= len(header)
            ):
                (length,), pos = struct.unpack_from(f"{order}I", header, pos + 8), pos + 12
            else:
                return None
        else:
            (length,), pos = struct.unpack_from(f"{order}I", header, pos + 4), pos + 8
        if length > len(header):  # the leading elements are short; also excludes undefined
            return None
        tags.append((group, element))
        pos += length
    (first_group, _), second = tags
    if first_group not in _FIRST_GROUPS or not tags[0] < second or second[0] > first_group + 8:
        return None
    return tags


def read_dicom(fp: IO[bytes]) -> Image.Image:
    """One frame of a DICOM file as an 8-bit 'L' or 'RGB' image (see `is_dicom` first)."""
    _silence_pydicom()
    ds = guarded(lambda: pydicom.dcmread(fp, force=True), "truncated or corrupt DICOM data")
    return guarded(lambda: _decode(ds), "unreadable or inconsistent DICOM attributes")


def _silence_pydicom() -> None:
    """Keep pydicom's warnings and log records (which quote header values) from any output.

    Checked at every read, not once on import: a `warnings.catch_warnings()` block that was
    open at import time (pytest's, a caller's) drops the filters added inside it on exit, and
    a filter put in front later (`simplefilter("always")`) would win over ours.
    """
    first = warnings.filters[0] if warnings.filters else None
    if not (first and first[0] == "ignore" and first[3] and first[3].pattern == _PYDICOM_MODULES):
        warnings.filterwarnings("ignore", module=_PYDICOM_MODULES)  # moves it to the front
    logging.getLogger("pydicom").propagate = False


def _decode(ds: pydicom.Dataset) -> Image.Image:
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageError("DICOM object has no pixel data (a report or other non-image object?)")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageError(
            f"multi-frame DICOM is not supported ({frames} frames); export one frame per file"
        )
    check_size(int(ds.get("Columns") or 0), int(ds.get("Rows") or 0))
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        # Text burned into the pixels (names, dates) would survive image-to-image generation.
        raise ImageError("DICOM declares burned-in annotation: pixels may show identifying text")
    syntax = _transfer_syntax(ds)
    pixels = guarded(lambda: ds.pixel_array, _undecodable(syntax))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if pixels.ndim != 2:
            raise ImageError(f"DICOM grayscale pixel data has shape {pixels.shape}")
        gray = _gray(pixels, ds)
        if photometric == "MONOCHROME1":  # MONOCHROME1 means low values are displayed white
            gray = 255 - gray
        return Image.fromarray(gray)
    return Image.fromarray(_rgb(pixels, ds, photometric, syntax))


def _transfer_syntax(ds: pydicom.Dataset) -> UID:
    """The file's transfer syntax; a file without file meta says it by how it was encoded."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        implicit, little = ds.original_encoding
        syntax = (ImplicitVRLittleEndian if implicit else
                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)  # fmt: skip
        ds.file_meta.TransferSyntaxUID = syntax
    return UID(syntax)


def _undecodable(syntax: UID) -> str:
    """Why the pixels would not decode, naming the syntax only if it is a standard one."""
    if not syntax.is_private and syntax.is_transfer_syntax and syntax.is_compressed:
        return (
            f"cannot decode DICOM pixel data compressed as {syntax.name}: corrupt, or no "
            "decoder for it is installed (pylibjpeg-libjpeg, pylibjpeg-openjpeg)"
        )
    return "truncated or corrupt DICOM pixel data"


def _lut_data_to_native_order(ds: pydicom.Dataset) -> None:
    """Byte-swap a big-endian file's 16-bit palette tables, which pydicom 3.0 reads as native.

    (Segmented tables it reads right.) Without this, a big-endian palette image comes out black.
    """
    if ds.original_encoding[1] is not False or np.little_endian is False:
        return
    for colour in ("Red", "Green", "Blue", "Alpha"):
        name = f"{colour}PaletteColorLookupTableData"
        data = ds.get(name)
        descriptor = ds.get(f"{colour}PaletteColorLookupTableDescriptor")
        if data is None or descriptor is None:
            continue
        entries = int(descriptor[0]) or 65536  # 0 means 2**16 entries
        if len(data) == 2 * entries:
            setattr(ds, name, np.frombuffer(data, ">u2").astype("<u2").tobytes())


def _gray(pixels: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Stored values -> modality values (e.g. Hounsfield) -> the file's display window -> 8 bit.

    Scaling the window's output range (not the image's min..max) keeps the contrast the
    modality chose, e.g. a lung window stays a lung window.
    """
    values = apply_modality_lut(pixels, ds)
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return stretch(apply_voi_lut(values, ds, index=0), 0, 2**bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        # pydicom derives the window's output range from BitsStored and rescale; two extreme
        # probes read it back without repeating its rules here.
        lo, hi = apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0)
        return stretch(apply_voi_lut(values, ds, index=0), float(lo), float(hi))
    return stretch(values)


def _rgb(pixels: np.ndarray, ds: pydicom.Dataset, photometric: str, syntax: UID) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        _lut_data_to_native_order(ds)
        pixels = apply_color_lut(pixels, ds)
    elif photometric not in _COLOR:
        raise ImageError("unsupported DICOM photometric interpretation")
    elif _LEGACY_PYDICOM and photometric.startswith("YBR_FULL"):
        # pydicom >= 3 returns RGB already; 2.x only does so for data it decompressed itself.
        if not syntax.is_compressed:
            pixels = convert_color_space(pixels, photometric, "RGB")
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ImageError(f"DICOM colour pixel data has shape {pixels.shape}")
    if pixels.dtype == np.uint8:
        return pixels
    # Colour data carries no window: its full stored range is the display range.
    bits = 16 if photometric == "PALETTE COLOR" else int(ds.get("BitsStored") or 16)
    return stretch(pixels, 0, 2**bits - 1)
