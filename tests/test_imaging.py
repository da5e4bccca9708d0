"""Real image files in tmp_path through read_image / to_model_rgb / preprocess."""

from __future__ import annotations

import io
import os
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile, PngImagePlugin
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from synthgen.cohort.images import ImageError, preprocess, read_image, to_model_rgb

SENTINEL = "SENTINEL-Doe-4711"
# File names look like real cohort names, so a leak into a message is caught.
PHI_NAME = "Doe_John_MRN4711"


def _encoded(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _assert_clean(image: Image.Image, mode: str) -> None:
    assert image.mode == mode
    assert image.info == {}
    assert len(image.getexif()) == 0


def _assert_rejected(path: Path, reason: str) -> ImageError:
    with pytest.raises(ImageError) as caught:
        read_image(path)
    err = caught.value
    assert reason in str(err)
    # Neither the message nor anything chained onto it may name the file.
    chain: BaseException | None = err
    while chain is not None:
        assert path.name not in str(chain) and path.stem not in repr(chain)
        chain = chain.__cause__ or chain.__context__
    return err


def _noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- PNG / JPEG / TIFF -------------------------------------------------------------------------


def test_16bit_png_keeps_contrast_of_12bit_data(tmp_path: Path) -> None:
    gradient = np.tile(np.linspace(100, 4000, 128).astype(np.uint16), (64, 1))  # 12-bit in 16
    path = tmp_path / f"{PHI_NAME}.png"
    Image.fromarray(gradient).save(path)
    image = read_image(path)
    _assert_clean(image, "L")
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8
    assert pixels.min() == 0 and pixels.max() == 255  # own min..max, not 0..65535
    assert np.all(np.diff(pixels[0].astype(int)) >= 0)  # still a monotone gradient


def test_rgba_png_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((4, 3, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, 0, 3], rgba[:, 1, 3], rgba[:, 2, 3] = 0, 255, 128
    path = tmp_path / f"{PHI_NAME}.png"
    Image.fromarray(rgba).save(path)
    image = read_image(path)
    _assert_clean(image, "RGB")
    pixels = np.asarray(image).astype(int)
    assert (pixels[:, 0] == 0).all()
    assert (pixels[:, 1] == (200, 100, 50)).all()
    assert np.abs(pixels[:, 2] - (100, 50, 25)).max() <= 1


def test_palette_png_becomes_rgb(tmp_path: Path) -> None:
    image = Image.new("P", (4, 2))
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2, 1, 0, 1, 2, 1])
    path = tmp_path / f"{PHI_NAME}.png"
    image.save(path)
    out = read_image(path)
    _assert_clean(out, "RGB")
    assert out.getpixel((1, 0)) == (255, 0, 0) and out.getpixel((2, 0)) == (0, 0, 255)


def test_png_metadata_is_dropped(tmp_path: Path) -> None:
    meta = PngImagePlugin.PngInfo()
    meta.add_text("Comment", SENTINEL)
    meta.add_text("Author", SENTINEL, zip=True)
    meta.add_itxt("Description", SENTINEL, lang="en")
    exif = Image.Exif()
    exif[0x010E] = SENTINEL  # ImageDescription
    path = tmp_path / f"{PHI_NAME}.png"
    Image.fromarray(_noise((16, 16))).save(path, pnginfo=meta, exif=exif, dpi=(300, 300))
    with Image.open(path) as stored:  # the sentinel really is in the file
        assert SENTINEL in str(stored.info)
    image = read_image(path)
    _assert_clean(image, "L")
    assert SENTINEL.encode() not in _encoded(image)


def test_jpeg_exif_orientation_is_applied_then_dropped(tmp_path: Path) -> None:
    pixels = np.full((20, 40, 3), 255, dtype=np.uint8)  # 40 wide, 20 high
    pixels[:, :20] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    exif[0x010E] = SENTINEL
    path = tmp_path / f"{PHI_NAME}.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = read_image(path)
    _assert_clean(image, "RGB")
    assert image.size == (20, 40)
    red, green, _ = image.getpixel((10, 5))  # the stored left half is now on top
    assert red > 200 and green < 60
    assert min(image.getpixel((10, 35))) > 200
    assert SENTINEL.encode() not in _encoded(image)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    cmyk = np.zeros((16, 32, 4), dtype=np.uint8)
    cmyk[:, 16:, 0] = 255  # right half pure cyan, left half paper white
    path = tmp_path / f"{PHI_NAME}.jpg"
    Image.frombytes("CMYK", (32, 16), cmyk.tobytes()).save(path, quality=95)
    with Image.open(path) as stored:
        assert stored.mode == "CMYK"
    image = read_image(path)
    _assert_clean(image, "RGB")
    assert min(image.getpixel((4, 8))) > 240
    red, green, blue = image.getpixel((28, 8))
    assert red < 20 and green > 235 and blue > 235


def test_16bit_tiff_keeps_contrast(tmp_path: Path) -> None:
    gradient = np.tile(np.linspace(0, 60000, 64).astype(np.uint16), (32, 1))
    path = tmp_path / f"{PHI_NAME}.tif"
    Image.fromarray(gradient).save(path)
    image = read_image(path)
    _assert_clean(image, "L")
    pixels = np.asarray(image)
    assert pixels.min() == 0 and pixels.max() == 255


def test_float_tiff_ignores_non_finite_values(tmp_path: Path) -> None:
    values = np.tile(np.linspace(-1.0, 1.0, 16, dtype=np.float32), (4, 1))
    values[0, 0], values[0, 1] = np.nan, np.inf
    path = tmp_path / f"{PHI_NAME}.tif"
    Image.fromarray(values).save(path)
    pixels = np.asarray(read_image(path))
    assert pixels[1, 0] == 0 and pixels[1, -1] == 255


def test_constant_16bit_image_does_not_divide_by_zero(tmp_path: Path) -> None:
    path = tmp_path / f"{PHI_NAME}.png"
    Image.fromarray(np.full((4, 4), 1234, dtype=np.uint16)).save(path)
    assert np.asarray(read_image(path)).max() == 0


def test_multipage_tiff_is_rejected(tmp_path: Path) -> None:
    pages = [Image.fromarray(_noise((8, 8), seed)) for seed in range(3)]
    path = tmp_path / f"{PHI_NAME}.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    _assert_rejected(path, "multi-frame images are not supported (3 frames)")


# --- DICOM -------------------------------------------------------------------------------------


def _write_dicom(
    path: Path, pixels: np.ndarray | None, photometric: str = "MONOCHROME2", **attrs: object
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = SENTINEL
    ds.PatientID = SENTINEL
    ds.Modality = "DX"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.astype("<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    try:
        ds.save_as(path, enforce_file_format=True)
    except TypeError:  # pydicom < 3
        ds.save_as(path, write_like_original=False)
    return path


# 0..1000 stored; rescale 2x - 1000 gives -1000..1000; window [-500, 500] covers stored 250..750.
_DICOM_RAMP = np.tile(np.linspace(0, 1000, 101).astype(np.uint16), (8, 1))
_WINDOWED = {"RescaleSlope": 2, "RescaleIntercept": -1000, "WindowCenter": 0, "WindowWidth": 1000}


def test_dicom_applies_rescale_and_window(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / f"{PHI_NAME}.dcm", _DICOM_RAMP, **_WINDOWED)
    image = read_image(path)
    _assert_clean(image, "L")
    row = np.asarray(image)[0].astype(int)
    assert (row[:25] == 0).all()  # stored <= 240 is below the window
    assert (row[76:] == 255).all()  # stored >= 760 is above it
    assert abs(row[50] - 128) <= 2  # stored 500 -> value 0 -> window centre


def test_dicom_without_window_uses_own_range(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / f"{PHI_NAME}.dcm", _DICOM_RAMP + 300)
    row = np.asarray(read_image(path))[0]
    assert row[0] == 0 and row[-1] == 255


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    mono2 = read_image(_write_dicom(tmp_path / "a.dcm", _DICOM_RAMP, **_WINDOWED))
    mono1 = read_image(_write_dicom(tmp_path / "b.dcm", _DICOM_RAMP, "MONOCHROME1", **_WINDOWED))
    assert np.array_equal(np.asarray(mono1), 255 - np.asarray(mono2))


def test_dicom_is_recognised_by_content_not_extension(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / f"{PHI_NAME}.png", _DICOM_RAMP)
    assert read_image(path).size == (101, 8)


def test_dicom_patient_data_never_reaches_output(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / f"{PHI_NAME}.dcm", _DICOM_RAMP, **_WINDOWED)
    assert SENTINEL.encode() in path.read_bytes()
    image = read_image(path)
    _assert_clean(image, "L")
    assert SENTINEL.encode() not in _encoded(image)
    assert SENTINEL.encode() not in _encoded(to_model_rgb(image))


def test_dicom_rgb(tmp_path: Path) -> None:
    rgb = _noise((6, 10, 3))
    colour = {
        "Rows": 6,
        "Columns": 10,
        "SamplesPerPixel": 3,
        "PhotometricInterpretation": "RGB",
        "PlanarConfiguration": 0,
        "BitsAllocated": 8,
        "BitsStored": 8,
        "HighBit": 7,
        "PixelRepresentation": 0,
        "PixelData": rgb.tobytes(),
    }
    image = read_image(_write_dicom(tmp_path / f"{PHI_NAME}.dcm", None, **colour))
    _assert_clean(image, "RGB")
    assert np.array_equal(np.asarray(image), rgb)


def test_dicom_rejects_multiframe(tmp_path: Path) -> None:
    frames = np.stack([_DICOM_RAMP, _DICOM_RAMP])
    path = _write_dicom(tmp_path / f"{PHI_NAME}.dcm", frames, NumberOfFrames=2)
    _assert_rejected(path, "multi-frame DICOM")


def test_dicom_rejects_missing_pixel_data(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / f"{PHI_NAME}.dcm", None)
    _assert_rejected(path, "no pixel data")


def test_dicom_rejects_burned_in_annotation(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / f"{PHI_NAME}.dcm", _DICOM_RAMP, BurnedInAnnotation="YES")
    _assert_rejected(path, "burned-in annotation")


def test_dicom_rejects_truncated_pixel_data(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / f"{PHI_NAME}.dcm", _DICOM_RAMP)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 600])
    _assert_rejected(path, "corrupt DICOM")


def test_dicom_rejects_huge_dimensions_before_decoding(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / f"{PHI_NAME}.dcm", _DICOM_RAMP)
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 40_000  # header lies; pixel data stays tiny
    ds.save_as(path)
    _assert_rejected(path, "too large")


# --- rejects -----------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("load_truncated", [False, True])
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_files_are_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, load_truncated: bool
) -> None:
    # Even when other code switched PIL to tolerate truncation, and without changing it for them.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    path = tmp_path / f"{PHI_NAME}{suffix}"
    Image.fromarray(_noise((64, 64, 3))).save(path)
    _truncate(path)
    _assert_rejected(path, "truncated or corrupt")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is load_truncated


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, not an image at all" * 20, b"GIF89a" + bytes(64), b"\x00" * 200],
    ids=["empty", "text", "gif", "zeros"],
)
def test_unsupported_content_is_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / f"{PHI_NAME}.png"
    path.write_bytes(content)
    _assert_rejected(path, "not a supported image format (PNG, JPEG, TIFF, DICOM)")


def test_bmp_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / f"{PHI_NAME}.bmp"
    Image.fromarray(_noise((8, 8))).save(path)
    _assert_rejected(path, "not a supported image format")


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds no pixel data worth the name."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("global_limit", ["default", "disabled"])
@pytest.mark.parametrize("size", [(60_000, 60_000), (50_001, 2), (20_000, 6_000)])
def test_decompression_bombs_are_rejected_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], global_limit: str
) -> None:
    if global_limit == "disabled":  # our limit must not depend on PIL's global one
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path = tmp_path / f"{PHI_NAME}.png"
    path.write_bytes(_png_claiming(*size))
    start = time.perf_counter()
    _assert_rejected(path, "too large")
    assert time.perf_counter() - start < 1.0


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    _assert_rejected(tmp_path / f"{PHI_NAME}.png", "file not found")


def test_directory_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / PHI_NAME
    path.mkdir()
    _assert_rejected(path, "not a regular file")


# --- to_model_rgb / preprocess -----------------------------------------------------------------


def test_to_model_rgb() -> None:
    gray = Image.fromarray(_noise((8, 8)))
    rgb = to_model_rgb(gray)
    assert rgb.mode == "RGB" and rgb.size == gray.size
    channels = np.asarray(rgb)
    assert all(np.array_equal(channels[..., i], np.asarray(gray)) for i in range(3))
    colour = Image.fromarray(_noise((8, 8, 3)))
    assert np.array_equal(np.asarray(to_model_rgb(colour)), np.asarray(colour))
    assert to_model_rgb(Image.fromarray(np.full((4, 4), 4095, np.uint16))).mode == "RGB"


@pytest.mark.parametrize("fit", ["center_crop", "pad", "resize"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_preprocess_gives_square(fit: str, mode: str) -> None:
    image = Image.new(mode, (200, 100), "white")
    out = preprocess(image, 64, fit)  # type: ignore[arg-type]
    assert out.size == (64, 64) and out.mode == mode


def test_center_crop_keeps_aspect_and_cuts_the_sides() -> None:
    pixels = np.full((100, 200), 255, dtype=np.uint8)
    pixels[:, :40] = pixels[:, 160:] = 0  # black side bands fall outside the central square
    out = np.asarray(preprocess(Image.fromarray(pixels), 64, "center_crop"))
    assert out.min() > 230


def test_pad_keeps_aspect_and_pads_black() -> None:
    out = np.asarray(preprocess(Image.new("RGB", (200, 100), "white"), 64, "pad"))
    assert (out[:14] == 0).all() and (out[50:] == 0).all()  # 64x32 content in rows 16..47
    assert (out[20:44] == 255).all()


def test_resize_stretches_everything_in() -> None:
    pixels = np.zeros((100, 200), dtype=np.uint8)
    pixels[:, 100:] = 255
    out = np.asarray(preprocess(Image.fromarray(pixels), 64, "resize"))
    assert out[:, :28].max() < 10 and out[:, 36:].min() > 245


def test_preprocess_rejects_bad_arguments() -> None:
    image = Image.new("L", (10, 10))
    with pytest.raises(ValueError, match="unknown fit"):
        preprocess(image, 8, "squash")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive integer"):
        preprocess(image, 0, "pad")


# --- not regular files: checked before opening, never blocking ---------------------------------


def _read_in_thread(path: Path, seconds: float = 10.0) -> BaseException | None:
    """read_image(path) in a daemon thread: a blocking open must fail the test, not hang it."""
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            read_image(path)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "read_image blocked on a file that is not a regular file"
    return outcome[0]


def test_fifo_named_png_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / f"{PHI_NAME}.png"
    os.mkfifo(path)
    error = _read_in_thread(path)
    assert isinstance(error, ImageError) and "not a regular file" in str(error)
    assert PHI_NAME not in str(error)


def test_socket_named_png_is_refused(tmp_path: Path) -> None:
    path = tmp_path / f"{PHI_NAME}.png"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        error = _read_in_thread(path)
    finally:
        server.close()
    assert isinstance(error, ImageError) and "not a regular file" in str(error)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/tty"])
def test_device_named_png_is_refused(tmp_path: Path, device: str) -> None:
    if not os.path.exists(device):
        pytest.skip(f"{device} does not exist here")
    path = tmp_path / f"{PHI_NAME}.png"
    path.symlink_to(device)  # as a cohort export that links images from elsewhere would
    error = _read_in_thread(path)
    assert isinstance(error, ImageError) and "not a regular file" in str(error)


def test_nul_byte_in_path_is_an_image_error(tmp_path: Path) -> None:
    error = _read_in_thread(Path(f"{tmp_path}/{PHI_NAME}\0.png"))
    assert isinstance(error, ImageError) and PHI_NAME not in str(error)
