"""The privacy sweep: a sentinel in every place a cohort can hold one, and every byte synthgen
writes under OUT (and beside it) or prints to the terminal searched for each.

Each place gets its own token (`ZQX007SNTL`), so a hit names the place it came from. Searched:
every file (tar members, PNG chunks inflated, Parquet cells, statistics and metadata), every
file name, stdout and stderr of each command: `validate`, `generate` with 1 and 2 workers under
`on_error: skip` and `fail`, the `fail` message of each bad row, `audit`, `preview` (of OUT and
of the recipe), `info --plots` and `push --dry-run`.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from conftest import ROOT, SYNTHGEN, write_recipe
from PIL import Image, ImageCms, TiffImagePlugin
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from test_dicom import STRING_ELEMENTS, dicom_file
from test_i2i import i2i_recipe

from synthgen.cohort.demo import write_table
from synthgen.cohort.rows import load_cohort
from synthgen.errors import CohortError
from synthgen.recipe.schema import load_recipe

pytestmark = pytest.mark.slow
TIMEOUT = 300


@dataclass
class Sites:
    """Where each token was planted."""

    where: dict[str, str] = field(default_factory=dict)
    placeholders: dict[bytes, bytes] = field(default_factory=dict)  # numeric stand-in -> token

    def token(self, site: str, token: str | None = None) -> str:
        token = token or f"ZQX{len(self.where):03d}SNTL"
        self.where[token] = site
        return token

    def numeric(self, site: str) -> str:
        """A number-shaped stand-in of the token's length, swapped for the token in the file's
        bytes (DS, IS values), so no element's length changes."""
        placeholder = f"98{len(self.where):03d}76543"
        self.placeholders[placeholder.encode()] = self.token(site).encode()
        return placeholder


# --- planting ----------------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _exif(sites: Sites, where: str) -> bytes:
    exif = Image.Exif()
    exif[0x010E] = sites.token(f"{where} EXIF ImageDescription")
    exif[0x013B] = sites.token(f"{where} EXIF Artist")
    exif[0x8298] = sites.token(f"{where} EXIF Copyright")
    return exif.tobytes()


def _icc(sites: Sites, where: str) -> bytes:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return profile + sites.token(f"{where} ICC profile bytes").encode()


def png_with_every_chunk(path: Path, pixels: np.ndarray, sites: Sites) -> None:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    t = sites.token
    chunks = [
        _chunk(b"tEXt", f"{t('PNG tEXt key')}\0{t('PNG tEXt value')}".encode()),
        _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(t("PNG zTXt (inflated)").encode())),
        _chunk(b"iTXt", b"Author\0\0\0en\0\0" + t("PNG iTXt").encode()),
        _chunk(
            b"iTXt",
            b"Title\0\1\0en\0"
            + t("PNG iTXt translated key").encode()
            + b"\0"
            + zlib.compress(t("PNG iTXt compressed (inflated)").encode()),
        ),  # fmt: skip
        _chunk(b"iCCP", t("PNG iCCP name").encode() + b"\0\0" + zlib.compress(_icc(sites, "PNG"))),
        _chunk(b"eXIf", _exif(sites, "PNG")),
    ]
    end = data.index(b"IDAT") - 4  # the chunks go before the image data
    path.write_bytes(data[:end] + b"".join(chunks) + data[end:])


def jpeg_with_every_segment(path: Path, pixels: np.ndarray, sites: Sites) -> None:
    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22'
        '-rdf-syntax-ns#"><rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" '
        f'dc:creator="{sites.token("JPEG XMP")}"/></rdf:RDF></x:xmpmeta>'
    )
    Image.fromarray(pixels).save(
        path, format="JPEG", quality=92, exif=_exif(sites, "JPEG"), icc_profile=_icc(sites, "JPEG"),
        comment=sites.token("JPEG COM"), xmp=xmp.encode(),
    )  # fmt: skip


def tiff_with_tags(path: Path, pixels: np.ndarray, sites: Sites) -> None:
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    for tag, name in ((270, "ImageDescription"), (315, "Artist"), (305, "Software"),
                      (269, "DocumentName"), (33432, "Copyright")):  # fmt: skip
        tags[tag] = sites.token(f"TIFF {name}")
    tags[65000] = sites.token("TIFF private tag")
    tags.tagtype[65000] = 2  # ASCII
    Image.fromarray(pixels).save(path, format="TIFF", tiffinfo=tags)


def dicom_with_every_string(path: Path, sites: Sites, where: str, **broken: str) -> None:
    """MR_small (RLE) with a token in every string VR, a sequence, private and UN/OB tags.

    `broken` sets attributes to a token too (`PhotometricInterpretation=...`): a bad row.
    """
    ds = pydicom.dcmread(dicom_file("MR_small_RLE.dcm"))
    with pydicom_config.disable_value_validation():
        for keyword, vr in STRING_ELEMENTS.items():
            site = f"{where} {keyword} ({vr})"
            ds.add_new(
                keyword, vr, sites.numeric(site) if vr in ("DS", "IS") else sites.token(site)
            )
        ds.PatientID = sites.token(f"{where} PatientID")
        item = Dataset()
        item.CodeMeaning = sites.token(f"{where} nested sequence item")
        ds.add_new("ProcedureCodeSequence", "SQ", Sequence([item]))
        block = ds.private_block(0x0011, sites.token(f"{where} private creator"), create=True)
        block.add_new(0x01, "LO", sites.token(f"{where} private LO"))
        block.add_new(0x02, "UT", sites.token(f"{where} private UT"))
        block.add_new(0x03, "UN", sites.token(f"{where} private UN").encode())
        block.add_new(0x04, "OB", sites.token(f"{where} private OB").encode())
        for keyword, vr in broken.items():
            site = f"{where} {keyword} (breaks decoding)"
            value = sites.numeric(site) if vr == "IS" else sites.token(site)
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    data = buffer.getvalue()
    for placeholder, token in sites.placeholders.items():
        data = data.replace(placeholder, token)
    path.write_bytes(data)


@dataclass
class PlantedCohort:
    rich: Path  # good rows and bad rows
    clean: Path  # the good rows only, every metadata token still in them
    bad_rows: list[int]
    sites: Sites


def plant_cohort(base: Path) -> PlantedCohort:
    sites = Sites()
    t = sites.token
    folder = base / f"cohort_{t('cohort folder name')}"
    images = folder / f"{t('image folder name')}_images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = lambda: rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)  # noqa: E731
    file_token = t("image file names")
    id_token, patient_token = t("source ids"), t("patient ids")
    column, cell = t("undeclared column name"), t("undeclared column values")

    def row(n: int, image: str, **cells: str) -> dict:
        return {"image_file": image, "study_id": f"{id_token}-{n}",
                "patient_id": f"{patient_token}-{n // 2}", "Eye": ["right", "left"][n % 2],
                "AgeYears": str(40 + n), "Sex": ["male", "female"][n % 3 % 2],
                "SBP": str(110 + n), column: f"{cell} {n}", **cells}  # fmt: skip

    def image(n: int, suffix: str) -> tuple[Path, str]:
        name = f"{images.name}/{file_token}_{n}{suffix}"
        return folder / name, name

    good = []
    path, name = image(1, ".png")
    png_with_every_chunk(path, rgb(), sites)
    good.append(row(1, name))
    path, name = image(2, ".jpg")
    jpeg_with_every_segment(path, rgb(), sites)
    good.append(row(2, name))
    path, name = image(3, ".tif")
    tiff_with_tags(path, rgb()[..., 0], sites)
    good.append(row(3, name))
    path, name = image(4, ".dcm")
    dicom_with_every_string(path, sites, "DICOM")
    good.append(row(4, name))
    for n in (5, 6):
        path, name = image(n, ".png")
        Image.fromarray(rgb()).save(path)
        good.append(row(n, name))

    bad = [
        row(7, good[0]["image_file"], Sex=t("declared categorical cell (invalid)")),
        row(8, good[0]["image_file"], AgeYears=t("declared numeric cell (invalid)")),
        row(9, good[0]["image_file"], SBP=t("declared int cell with a fraction", "918273.5")),
    ]
    path, name = image(10, ".png")
    path.write_bytes(Path(folder / good[0]["image_file"]).read_bytes()[:300])  # cut short
    bad.append(row(10, name))
    path, name = image(11, ".dcm")
    dicom_with_every_string(path, sites, "DICOM (bad row)", PhotometricInterpretation="CS")
    bad.append(row(11, name))
    path, name = image(12, ".dcm")
    dicom_with_every_string(path, sites, "DICOM (bad row 2)", NumberOfFrames="IS")
    bad.append(row(12, name))
    bad.append({**row(13, good[1]["image_file"]), "study_id": good[0]["study_id"]})  # duplicate
    outside = base / f"{t('outside file name')}.png"
    Image.fromarray(rgb()).save(outside)
    bad.append(row(14, str(outside)))
    bad.append(row(15, f"{images.name}/{t('missing file name')}.png"))

    rich = write_table(folder / f"{t('manifest file name')}_manifest.csv", good + bad)
    clean = write_table(folder / "clean.csv", good)
    return PlantedCohort(rich, clean, list(range(len(good) + 1, len(good) + len(bad) + 1)), sites)


# --- searching ---------------------------------------------------------------------------------


def _inflate(data: bytes) -> bytes:
    """As much as inflates (a cut-short cohort file inflates partly)."""
    try:
        return zlib.decompressobj().decompress(data)
    except zlib.error:
        return b""


def _png_texts(data: bytes) -> Iterator[bytes]:
    pos, idat = 8, b""
    while pos + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IDAT":
            idat += body
        elif kind in (b"zTXt", b"iCCP"):
            yield _inflate(body[body.index(b"\0") + 2 :])
        elif kind == b"iTXt" and body[body.index(b"\0") + 1] == 1:
            rest = body[body.index(b"\0") + 3 :]
            yield _inflate(rest.split(b"\0", 2)[2])
    if idat:
        yield _inflate(idat)


def texts(data: bytes) -> Iterator[bytes]:
    """`data` and everything inside it that a reader would decompress or decode."""
    yield data
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        yield from _png_texts(data)
    elif data.startswith(b"PAR1"):
        yield from _parquet_texts(data)
    elif len(data) > 512 and data[257:262] == b"ustar":
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                yield member.name.encode()
                if member.isfile():
                    yield from texts(tar.extractfile(member).read())


def _parquet_texts(data: bytes) -> Iterator[bytes]:
    file = pq.ParquetFile(io.BytesIO(data))
    meta = file.metadata
    yield repr(file.schema_arrow.metadata).encode() + str(meta.created_by).encode()
    for group in range(meta.num_row_groups):
        for column in range(meta.num_columns):
            stats = meta.row_group(group).column(column).statistics
            if stats is not None and stats.has_min_max:
                yield repr((stats.min, stats.max)).encode()
    for record in file.read().to_pylist():
        for cell in record.values():
            yield from _cell_texts(cell)


def _cell_texts(cell: object) -> Iterator[bytes]:
    if isinstance(cell, bytes):
        yield from texts(cell)
    elif isinstance(cell, dict):
        for value in cell.values():
            yield from _cell_texts(value)
    elif isinstance(cell, list):
        for value in cell:
            yield from _cell_texts(value)
    else:
        yield str(cell).encode()


def found(data: bytes, tokens: list[str]) -> set[str]:
    hits = set()
    for text in texts(data):
        folded = text.lower()
        for token in tokens:
            low = token.lower()
            if (low.encode() in folded or low.encode("utf-16-le") in folded
                    or low.encode("utf-16-be") in folded):  # fmt: skip
                hits.add(token)
    return hits


def found_in_tree(folder: Path, tokens: list[str]) -> dict[str, set[str]]:
    """token -> the files (relative to `folder`) that hold it, in content or name."""
    where: dict[str, set[str]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        for token in found(path.read_bytes(), tokens) | found(name.encode(), tokens):
            where.setdefault(token, set()).add(name)
    return where


# --- the sweep ---------------------------------------------------------------------------------


def synthgen_together(**commands: tuple[str, ...]) -> dict[str, subprocess.CompletedProcess]:
    """Run `synthgen ARGS` for each command at once (they are independent); output goes to
    files, so no full pipe stalls a run nobody is reading yet."""
    started = {}
    for name, args in commands.items():
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        proc = subprocess.Popen([*SYNTHGEN, *args], cwd=ROOT, stdout=out, stderr=err, text=True)
        started[name] = (proc, args, out, err)
    results = {}
    for name, (proc, args, out, err) in started.items():
        try:
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
        out.seek(0)
        err.seek(0)
        results[name] = subprocess.CompletedProcess(args, proc.returncode, out.read(), err.read())
    return results


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> PlantedCohort:
    return plant_cohort(tmp_path_factory.mktemp("planted"))


def sweep_recipe(base: Path, manifest: Path, name: str, on_error: str) -> Path:
    recipe = i2i_recipe(manifest, base / f"{name}.linkage.csv", steps=2, batch_size=2)
    recipe["shard_size"] = 2
    recipe["source"]["on_error"] = on_error
    return write_recipe(base / f"{name}.yaml", recipe)


def test_every_planted_token_is_in_the_cohort(planted):
    tokens = list(planted.sites.where)
    missing = set(tokens) - set(found_in_tree(planted.rich.parent.parent, tokens))
    assert not missing, sorted(planted.sites.where[t] for t in missing)


def test_failing_rows_name_no_token(planted, tmp_path):
    """`on_error: fail` on each bad row alone: the message names the row, never its content."""
    tokens = list(planted.sites.where)
    recipe = load_recipe(sweep_recipe(tmp_path, planted.rich, "fail", "fail"))
    with open(planted.rich) as handle:
        lines = handle.read().splitlines()
    for row in planted.bad_rows:
        single = planted.rich.parent / f"single-{row}.csv"
        single.write_text("\n".join([lines[0], lines[1], lines[row]]) + "\n")  # row 1: good
        source = recipe.source.model_copy(update={"manifest": str(single)})
        with pytest.raises(CohortError) as caught:
            load_cohort(source, recipe.labels, progress=False)
        assert not found(str(caught.value).encode(), tokens), (row, str(caught.value))


def test_nothing_planted_reaches_out_or_the_terminal(planted, tmp_path):
    tokens = list(planted.sites.where)
    hits: dict[str, dict[str, set[str]]] = {}  # command -> token -> where

    def scan(command: str, result: subprocess.CompletedProcess | None, *folders: Path) -> None:
        where: dict[str, set[str]] = {}
        if result is not None:
            for stream, text in (("stdout", result.stdout), ("stderr", result.stderr)):
                for token in found(text.encode(), tokens):
                    where.setdefault(token, set()).add(stream)
        for folder in folders:
            for token, files in found_in_tree(folder, tokens).items():
                where.setdefault(token, set()).update(files)
        hits[command] = where

    skip = sweep_recipe(tmp_path, planted.rich, "skip", "skip")
    clean = sweep_recipe(tmp_path, planted.clean, "clean", "fail")
    fail = sweep_recipe(tmp_path, planted.rich, "rich-fail", "fail")
    one, two, failed = tmp_path / "one", tmp_path / "two", tmp_path / "failed"
    previews, plots, report = tmp_path / "previews", tmp_path / "plots", tmp_path / "report"

    ran = synthgen_together(
        validate=("validate", str(skip)),
        one=("generate", str(skip), "-o", str(one), "--devices", "cpu"),
        two=("generate", str(clean), "-o", str(two), "--devices", "cpu",
             "--workers-per-device", "2"),
        failed=("generate", str(fail), "-o", str(failed), "--devices", "cpu"),
    )  # fmt: skip
    for name in ("validate", "one", "two"):
        assert ran[name].returncode == 0, ran[name].stderr
    assert ran["validate"].stderr.count("skip: row") == len(planted.bad_rows)
    manifest = json.loads((one / "manifest.json").read_text())
    assert [s["row"] for s in manifest["skipped"]] == planted.bad_rows
    assert list((two / ".synthgen" / "logs").glob("*.log")), "the workers wrote no logs"
    assert ran["failed"].returncode == 2 and "source.manifest row 7" in ran["failed"].stderr
    scan("validate (skip)", ran["validate"])
    scan("generate, 1 worker, on_error skip", ran["one"], one)
    scan("generate, 2 workers, on_error fail", ran["two"], two)
    scan("generate, on_error fail, a bad row", ran["failed"], *[failed] * failed.exists())

    ran = synthgen_together(  # these only read OUT
        preview_out=("preview", str(one), "-o", str(previews / "out.png")),
        preview_recipe=("preview", str(clean), "-o", str(previews / "recipe.png"), "-n", "1",
                        "--device", "cpu"),
        info=("info", str(one), "--plots", str(plots)),
        push=("push", str(one), "--repo-id", "org/name", "--dry-run"),
    )  # fmt: skip
    for result in ran.values():
        assert result.returncode == 0, result.stderr
    scan("preview OUT", ran["preview_out"], previews)
    scan("preview RECIPE", ran["preview_recipe"], previews)
    scan("info --plots", ran["info"], plots)
    scan("push --dry-run", ran["push"])

    ran = synthgen_together(  # writes OUT's card
        audit=("audit", str(one), "--source", str(skip), "--linkage",
               str(tmp_path / "skip.linkage.csv"), "-o", str(report), "--append-to-card"),
    )  # fmt: skip
    assert ran["audit"].returncode == 0, ran["audit"].stderr
    scan("audit --append-to-card", ran["audit"], report, one)

    tried = len(tokens) * len(hits)
    leaked = {(command, planted.sites.where[token], ", ".join(sorted(files)))
              for command, where in hits.items() for token, files in where.items()}  # fmt: skip
    print(f"\nprivacy sweep: {len(tokens)} sites x {len(hits)} commands = {tried} tried, "
          f"{tried - len(leaked)} holding")  # fmt: skip
    assert not leaked, sorted(leaked)
