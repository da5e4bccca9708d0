"""DICOM as hospitals export it: every transfer syntax in pydicom's own test files, files without
a preamble, malformed files as row errors, and header values that never reach a message.

The files are pydicom's bundled test files and, where installed, those of `pydicom-data` (a
test dependency); a file that is not there is skipped, never downloaded.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from synthgen.cohort.dicom import is_dicom
from synthgen.cohort.images import ImageError, read_image

BUNDLED = Path(pydicom.__file__).parent / "data" / "test_files"
SENTINEL = "ZQXDICOMSENTINEL"


def _data_dirs() -> list[Path]:
    dirs = [BUNDLED]
    try:
        from pydicom.data.data_manager import external_data_sources

        dirs += [Path(s.data_path) for s in external_data_sources().values()]
    except Exception:  # noqa: BLE001 - pydicom-data is optional
        pass
    return dirs


def dicom_file(name: str) -> Path:
    """A pydicom test file by name; the test is skipped where it is not installed."""
    for folder in _data_dirs():
        if (folder / name).is_file():
            return folder / name
    pytest.skip(f"{name} is not installed (pip install pydicom-data)")


def pixels(path: Path) -> np.ndarray:
    return np.asarray(read_image(path)).astype(int)


# (transfer syntax, file, the same image stored uncompressed or None, largest mean |difference|)
SYNTAXES = [
    ("1.2.840.10008.1.2", "MR_small_implicit.dcm", "MR_small.dcm", 0),
    ("1.2.840.10008.1.2.1", "CT_small.dcm", None, 0),
    ("1.2.840.10008.1.2.1.99", "image_dfl.dcm", None, 0),  # deflate
    ("1.2.840.10008.1.2.2", "MR_small_bigendian.dcm", "MR_small.dcm", 0),
    ("1.2.840.10008.1.2.2", "OBXXXX1A_expb.dcm", "OBXXXX1A.dcm", 0),  # big-endian palette
    ("1.2.840.10008.1.2.4.50", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb.dcm", 1.0),
    ("1.2.840.10008.1.2.4.51", "JPGExtended.dcm", None, 0),  # 12-bit JPEG Extended
    ("1.2.840.10008.1.2.4.70", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", 0),
    ("1.2.840.10008.1.2.4.70", "JPEG-LL.dcm", None, 0),  # 16-bit grayscale, as CR/DX archives
    ("1.2.840.10008.1.2.4.70", "JPGLosslessP14SV1_1s_1f_8b.dcm", None, 0),
    ("1.2.840.10008.1.2.4.80", "MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0),
    ("1.2.840.10008.1.2.4.81", "JPEGLSNearLossless_16.dcm", None, 0),
    ("1.2.840.10008.1.2.4.81", "SC_rgb_jls_lossy_line.dcm", "SC_rgb.dcm", 1.0),
    ("1.2.840.10008.1.2.4.90", "MR_small_jp2klossless.dcm", "MR_small.dcm", 0),
    ("1.2.840.10008.1.2.4.90", "RG1_J2KR.dcm", "RG1_UNCR.dcm", 0),  # 15-bit MONOCHROME1 CR
    ("1.2.840.10008.1.2.4.90", "US1_J2KR.dcm", "US1_UNCR.dcm", 0),  # YBR_RCT colour
    ("1.2.840.10008.1.2.4.91", "JPEG2000.dcm", "JPEG2000_UNC.dcm", 0),
    ("1.2.840.10008.1.2.4.91", "693_J2KI.dcm", "693_UNCI.dcm", 0),
    ("1.2.840.10008.1.2.5", "MR_small_RLE.dcm", "MR_small.dcm", 0),
    ("1.2.840.10008.1.2.5", "SC_rgb_rle_16bit.dcm", "SC_rgb.dcm", 0),
    ("1.2.840.10008.1.2.5", "OBXXXX1A_rle.dcm", "OBXXXX1A.dcm", 0),
]


@pytest.mark.parametrize(
    ("syntax", "name", "reference", "tolerance"), SYNTAXES, ids=[c[1] for c in SYNTAXES]
)
def test_every_transfer_syntax_decodes(syntax, name, reference, tolerance) -> None:
    path = dicom_file(name)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    image = pixels(path)
    assert image.std() > 5, "decoded to a flat image"
    if reference is not None:
        expected = pixels(dicom_file(reference))
        assert image.shape == expected.shape
        assert np.abs(image - expected).mean() <= tolerance


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("JPEG-lossy.dcm", "compressed as JPEG Extended"),  # malformed scan header (SOS)
        ("JPEG2000-embedded-sequence-delimiter.dcm", "compressed as JPEG 2000"),
        ("MR_truncated.dcm", "truncated or corrupt DICOM pixel data"),
        ("badVR.dcm", "unreadable or inconsistent DICOM attributes"),  # was a raw ValueError
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "truncated or corrupt DICOM"),
        ("rtplan.dcm", "no pixel data"),
        ("SC_rgb_rle_2frame.dcm", "multi-frame DICOM is not supported (2 frames)"),
    ],
)
def test_undecodable_files_are_image_errors_with_nothing_chained(name, reason) -> None:
    with pytest.raises(ImageError, match=re.escape(reason)) as caught:
        read_image(dicom_file(name))
    assert caught.value.__cause__ is None and caught.value.__context__ is None


# --- files without the 128-byte preamble -------------------------------------------------------


def test_file_meta_without_preamble_is_read(tmp_path: Path) -> None:
    source = dicom_file("MR_small_RLE.dcm")  # compressed: the meta's transfer syntax is needed
    bare = tmp_path / "no-preamble"
    bare.write_bytes(source.read_bytes()[132:])
    assert bare.read_bytes()[:2] == b"\x02\x00"
    assert np.array_equal(pixels(bare), pixels(source))


@pytest.mark.parametrize(
    ("implicit", "little"), [(True, True), (False, True), (False, False)],
    ids=["implicit-little", "explicit-little", "explicit-big"],
)  # fmt: skip
def test_dataset_without_preamble_or_meta_is_read(tmp_path: Path, implicit, little) -> None:
    source = dicom_file("MR_small.dcm")
    # pydicom writes Pixel Data's bytes as they are: a big-endian copy starts from one.
    ds = pydicom.dcmread(source if little else dicom_file("MR_small_bigendian.dcm"))
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "bare.png"  # a name says nothing: the content decides
    pydicom.dcmwrite(bare, ds, implicit_vr=implicit, little_endian=little)
    assert b"DICM" not in bare.read_bytes()[:200]
    assert np.array_equal(pixels(bare), pixels(source))


@pytest.mark.parametrize(
    "name", ["ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm", "rtstruct.dcm"]
)
def test_bundled_files_without_meta_are_recognised(name) -> None:
    assert is_dicom(dicom_file(name).read_bytes()[:1024])
    with pytest.raises(ImageError, match="no pixel data"):  # recognised; they hold no image
        read_image(dicom_file(name))


def test_palette_file_without_meta_decodes() -> None:
    assert pixels(dicom_file("OT-PAL-8-face.dcm")).std() > 5


def _near_misses() -> list[bytes]:
    rng = np.random.default_rng(0)
    explicit = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100"  # one good element, then:
    misses = [
        b"\x08\x00" + rng.bytes(1022),
        explicit + rng.bytes(1000),  # junk second element
        explicit + b"\x08\x00\x01\x00CS\x02\x00AB",  # second tag not after the first
        explicit + b"\x20\x00\x12\x00CS\x02\x00AB",  # a group far from the first
        b"\x09\x00\x05\x00CS\x0a\x00ISO_IR 100\x09\x00\x08\x00CS\x02\x00AB",  # group 0009 first
        b"\x08\x00\x05\x00\xff\xff\xff\xff" + bytes(64),  # undefined length
        b"\x08\x00 hello, this is text" * 20,
    ]
    return misses + [rng.bytes(1024) for _ in range(300)]


def test_preamble_less_sniffing_takes_no_near_miss() -> None:
    for header in _near_misses():
        assert not is_dicom(header)


def test_preamble_less_sniffing_accepts_two_ordered_elements() -> None:
    explicit = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + b"\x08\x00\x16\x00UI\x02\x001\x00"
    assert is_dicom(explicit)


# --- header values never reach a message, a warning or a log -----------------------------------

# One element of every string VR. Numeric-string ones (DS, IS) are written with a placeholder
# of the sentinel's length that pydicom can parse, then swapped for the sentinel in the file's
# bytes: a value that breaks its VR is what a careless export holds.
STRING_ELEMENTS = {
    "RetrieveAETitle": "AE", "PatientAge": "AS", "Modality": "CS", "PatientBirthDate": "DA",
    "PatientWeight": "DS", "AcquisitionDateTime": "DT", "SeriesNumber": "IS",
    "InstitutionName": "LO", "AdditionalPatientHistory": "LT", "PatientName": "PN",
    "AccessionNumber": "SH", "InstitutionAddress": "ST", "StudyTime": "TM",
    "StudyInstanceUID": "UI", "RetrieveURL": "UR", "TextValue": "UT",
    "StrainAdditionalInformation": "UC",
}  # fmt: skip
PLACEHOLDER = "9876543210987654"
assert len(PLACEHOLDER) == len(SENTINEL)


def _value(vr: str) -> str:
    return PLACEHOLDER if vr in ("DS", "IS") else SENTINEL


def plant_everywhere(ds: Dataset) -> None:
    """The sentinel in every string VR, a nested sequence, private tags (LO, UT, UN, OB)."""
    with pydicom_config.disable_value_validation():
        for keyword, vr in STRING_ELEMENTS.items():
            ds.add_new(keyword, vr, _value(vr))
        ds.PatientID = f"{SENTINEL}-pid"
        item = Dataset()
        item.CodeMeaning = SENTINEL
        ds.add_new("ProcedureCodeSequence", "SQ", Sequence([item]))
        block = ds.private_block(0x0011, f"{SENTINEL} CREATOR", create=True)
        block.add_new(0x01, "LO", SENTINEL)
        block.add_new(0x02, "UT", f"notes {SENTINEL}")
        block.add_new(0x03, "UN", SENTINEL.encode())
        block.add_new(0x04, "OB", SENTINEL.encode())


def save_planted(ds: Dataset, path: Path) -> Path:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    path.write_bytes(buffer.getvalue().replace(PLACEHOLDER.encode(), SENTINEL.encode()))
    assert PLACEHOLDER.encode() not in path.read_bytes()
    return path


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def noisy_host():
    """A host process that shows every warning and logs everything at its root, as a worker
    does into OUT/.synthgen/logs (pytest's caplog would not do: it also listens on loggers that
    do not propagate)."""
    root, handler = logging.getLogger(), _Collect()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught, handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _forget_setup(host, capfd) -> None:
    """Drop what the test's own pydicom calls (writing the planted file) said."""
    for said in host:
        said.clear()
    capfd.readouterr()


def _assert_nothing_said(host, capfd) -> None:
    caught, records = host
    said = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    out, err = capfd.readouterr()
    assert SENTINEL not in " ".join(said) + out + err


def test_sentinel_in_every_string_element_stays_in_the_file(tmp_path, noisy_host, capfd):
    ds = pydicom.dcmread(dicom_file("MR_small_RLE.dcm"))
    plant_everywhere(ds)
    path = save_planted(ds, tmp_path / "planted.dcm")
    assert path.read_bytes().count(SENTINEL.encode()) >= len(STRING_ELEMENTS) + 6
    _forget_setup(noisy_host, capfd)
    image = read_image(path)
    assert image.info == {} and SENTINEL.encode() not in image.tobytes()
    _assert_nothing_said(noisy_host, capfd)


@pytest.mark.parametrize(
    "attribute",
    [("PhotometricInterpretation", "CS"), ("NumberOfFrames", "IS"), ("WindowCenter", "DS"),
     ("RescaleSlope", "DS"), ("TransferSyntaxUID", "UI")],
    ids=lambda attribute: attribute[0],
)  # fmt: skip
def test_a_header_value_that_breaks_its_vr_is_never_quoted(
    tmp_path, noisy_host, capfd, attribute
) -> None:
    keyword, vr = attribute
    ds = pydicom.dcmread(dicom_file("MR_small_RLE.dcm"))
    plant_everywhere(ds)
    target = ds.file_meta if keyword == "TransferSyntaxUID" else ds
    with pydicom_config.disable_value_validation():
        setattr(target, keyword, _value(vr))
    path = save_planted(ds, tmp_path / "broken.dcm")
    _forget_setup(noisy_host, capfd)
    try:
        read_image(path)  # pydicom may do without the value (a slope it cannot parse)
    except ImageError as error:
        assert SENTINEL not in str(error)
        assert error.__cause__ is None and error.__context__ is None
    else:
        assert keyword == "RescaleSlope"
    _assert_nothing_said(noisy_host, capfd)
