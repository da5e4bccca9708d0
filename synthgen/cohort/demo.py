"""Write a small fake cohort: images in the formats hospitals hold, plus a metadata table.

For the i2i demo and tests, where no real cohort may be used. Every identifying field (file
names, ids, an undeclared column, PNG text, EXIF, DICOM PatientName) carries `marker`, so a test
can prove none of it reaches the output. Run: `python -m synthgen.cohort.demo FOLDER [N]`.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

FORMATS = ("png8", "png16", "jpeg", "rgba", "dicom1", "dicom2", "tiff", "cmyk")


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random pattern with a bright disc: a stand-in for a fundus or a chest."""
    coarse = rng.random((8, 8, 3))
    image = np.array(
        Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    )
    yy, xx = np.mgrid[:size, :size]
    centre = rng.uniform(0.3, 0.7, 2) * size
    disc = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) < (size * 0.15) ** 2
    image[disc] = np.clip(image[disc].astype(int) + 80, 0, 255)
    return image.astype(np.uint8)


def _write_dicom(path: Path, gray: np.ndarray, marker: str, monochrome1: bool) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.PatientName = f"{marker}^Patient"
    ds.PatientID = f"{marker}-pid"
    ds.Modality = "OT"
    pixels = gray.astype(np.uint16) * 16  # 12-bit data
    if monochrome1:
        pixels = 4095 - pixels
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (
        1,
        "MONOCHROME1" if monochrome1 else "MONOCHROME2",
    )
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _write(path: Path, kind: str, rgb: np.ndarray, marker: str) -> None:
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    if kind == "png8":
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", f"patient {marker}")
        Image.fromarray(rgb).save(path, pnginfo=info)
    elif kind == "png16":
        Image.fromarray((gray.astype(np.uint16) * 64 + 1000).astype(np.uint16)).save(path)
    elif kind == "jpeg":
        exif = Image.Exif()
        exif[0x010E] = f"ImageDescription {marker}"  # EXIF ImageDescription
        exif[0x0112] = 1  # orientation
        Image.fromarray(rgb).save(path, quality=92, exif=exif)
    elif kind == "rgba":
        alpha = np.full(gray.shape, 255, np.uint8)
        Image.fromarray(np.dstack([rgb, alpha])).save(path)
    elif kind in ("dicom1", "dicom2"):
        _write_dicom(path, gray, marker, monochrome1=kind == "dicom1")
    elif kind == "tiff":
        Image.fromarray(gray.astype(np.uint16) * 256).save(path)
    elif kind == "cmyk":
        Image.fromarray(rgb).convert("CMYK").save(path, quality=92)


SUFFIX = {"png8": ".png", "png16": ".png", "jpeg": ".jpg", "rgba": ".png", "dicom1": ".dcm",
          "dicom2": ".dcm", "tiff": ".tif", "cmyk": ".jpg"}  # fmt: skip


def make_cohort(
    folder: Path, rows: int = 8, marker: str = "MRN", size: int = 96, seed: int = 0
) -> Path:
    """Write `rows` images (two per patient: both eyes) and `manifest.csv`; return its path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    table = []
    for row in range(rows):
        patient = f"{marker}{1000 + row // 2}"
        kind = FORMATS[row % len(FORMATS)]
        name = f"images/{patient}_{'OD' if row % 2 == 0 else 'OS'}_{kind}{SUFFIX[kind]}"
        _write(folder / name, kind, _texture(rng, size), marker)
        table.append(
            {
                "image_file": name,
                "study_id": f"{patient}-{row}",
                "patient_id": patient,
                "AgeYears": str(int(rng.integers(40, 76))),
                "Sex": ["male", "female"][int(rng.integers(2))],
                "Eye": "right" if row % 2 == 0 else "left",
                "SBP": str(int(rng.integers(95, 170))),
                "referring_physician": f"Dr {marker} House",  # undeclared: must never leave
            }
        )
    return write_table(folder / "manifest.csv", table)


def write_table(path: Path, rows: list[dict]) -> Path:
    """A cohort manifest CSV with the columns of the first row."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo-cohort")
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    print(f"wrote {make_cohort(target, count)}")
