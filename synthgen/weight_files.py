"""What a weight file is, from its bytes alone: safetensors, a TorchScript or exported program, or
something to refuse. Names and suffixes are never trusted; nothing here unpickles or imports torch.

synthgen opens a weight file only when this module has said what it is:

- **safetensors** (LoRAs, base-model folders, audit state dicts): the 8-byte little-endian header
  length, a JSON header whose every tensor has a known dtype, a shape and offsets inside the file.
  The safetensors library reads such a file as raw numbers; there is no code in it to run.
- **TorchScript** (`torch.jit.save`, a user's own audit model): a zip archive with `data.pkl`,
  `constants.pkl`, `version` and TorchScript source under `code/`, nothing else. It does hold
  pickles, but `torch.jit.load` reads them with its own C++ unpickler, which builds only tensors,
  containers and the TorchScript classes compiled from `code/`; it never calls a Python function
  named in the pickle (a crafted `data.pkl` fails to load: tests/test_weight_files.py). What the
  module then computes is a TorchScript program of torch operators, which the user asked to run as
  their model, as they would run a script. That is acceptable for a model the user names as theirs
  (`--embedder`, `--predictor`), never for weights (a LoRA or a base model), where no code is due.
- **exported program** (`torch.export.save`): a zip archive in the PT2 layout (`archive_format`
  `pt2`, `models/*.json` graphs of torch operators, raw weight and constant tensors described by
  JSON configs). `torch.export.load` unpickles with Python's pickle in three places: the sample
  inputs (and it falls back to `weights_only=False` when the safe unpickler fails), weights or
  constants stored pickled, and custom objects. That is not acceptable, so `exported_program`
  refuses an archive with pickled weights, constants or objects, compiled code (AOTInductor) or any
  member outside the layout, and hands torch a copy whose sample inputs are empty.

Everything else (a `torch.save` pickle or zip archive under any name, a truncated file) is refused
with `RefusedWeightFile`, whose text says what the file was found to be. This module sits at the
bottom of the layers beside `synthgen.errors`, which it cannot import: callers turn the refusal
into their own error naming the recipe field or option.
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_SCALAR_FORMATS = {"F16": "<e", "F32": "<f", "F64": "<d", "I32": "<i", "I64": "<q"}
_SNIFF_BYTES = 64
# Members of a torch.jit.save archive, below its one top-level folder.
_TORCHSCRIPT_FILES = {"data.pkl", "constants.pkl", "version", "byteorder", ".data/version",
                      ".data/serialization_id", ".format_version", ".storage_alignment"}  # fmt: skip
_TORCHSCRIPT_FOLDERS = ("code/", "data/", "constants/", "extra/")
# Members of a torch.export.save (PT2) archive that carry no pickle.
_PT2_FILES = {"archive_format", "archive_version", "byteorder", ".data/version",
              ".data/serialization_id"}  # fmt: skip
ProgramKind = Literal["torchscript", "exported program"]


class RefusedWeightFile(ValueError):
    """A file is not the kind of weight file asked for; its text says what it is instead
    ("a pickle file (torch.save), …"), to follow "'NAME' is"."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section (after the header)
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]  # the header's __metadata__ (strings only, by the format)
    data_start: int  # file offset of the data section


def _open_regular(path: Path):
    """Open for reading without blocking on a FIFO or device; refuse anything but a plain file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RefusedWeightFile("not a regular file")
    return os.fdopen(fd, "rb")


def what_it_is(path: str | Path, unknown: str = "not a safetensors file") -> str:
    """A short description of a file's kind from its first bytes, for refusal messages."""
    with _open_regular(Path(path)) as handle:
        head = handle.read(_SNIFF_BYTES)
    if not head:
        return "an empty file"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle file (torch.save), which can run code when loaded"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save or TorchScript), which holds pickles"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file"
    return unknown


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Parse and check a safetensors header; RefusedWeightFile when the bytes are anything else."""
    path = Path(path)
    with _open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise RefusedWeightFile(what_it_is(path))
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RefusedWeightFile(what_it_is(path)) from None
    if not isinstance(header, dict):
        raise RefusedWeightFile("not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise RefusedWeightFile("not a safetensors file (its __metadata__ is not strings)")
    data_bytes = size - 8 - length
    tensors = {name: _tensor_entry(name, value, data_bytes) for name, value in header.items()}
    return SafetensorsHeader(tensors, dict(metadata), 8 + length)


def _tensor_entry(name: str, value: Any, data_bytes: int) -> TensorEntry:
    broken = RefusedWeightFile(f"not a safetensors file (tensor '{name}' is malformed)")
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise broken
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    ints = [*shape, *offsets] if isinstance(shape, list) and isinstance(offsets, list) else None
    if dtype not in DTYPE_BYTES or ints is None or len(offsets) != 2:
        raise broken
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in ints):
        raise broken
    count = 1
    for n in shape:
        count *= n
    begin, end = offsets
    if end - begin != count * DTYPE_BYTES[dtype] or end > data_bytes:
        raise broken
    return TensorEntry(dtype, tuple(shape), begin, end)


def read_scalar(path: str | Path, header: SafetensorsHeader, name: str) -> float:
    """The value of a one-element tensor (a kohya `.alpha`), read by offset: no weights loaded."""
    entry = header.tensors[name]
    with _open_regular(Path(path)) as handle:
        handle.seek(header.data_start + entry.begin)
        data = handle.read(entry.end - entry.begin)
    if entry.dtype == "BF16" and len(data) == 2:
        return struct.unpack("<f", b"\x00\x00" + data)[0]
    fmt = _SCALAR_FORMATS.get(entry.dtype)
    if fmt is None or len(data) != struct.calcsize(fmt):
        raise RefusedWeightFile(f"a file whose tensor '{name}' is not a single number")
    return float(struct.unpack(fmt, data)[0])


def _archive_members(path: Path) -> tuple[zipfile.ZipFile, str, set[str]]:
    """The zip archive, its one top-level folder and the member names below it."""
    with _open_regular(path) as handle:
        zipped = handle.read(4) == b"PK\x03\x04"
    if not zipped:
        raise RefusedWeightFile(what_it_is(path, "not a saved TorchScript or exported program"))
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise RefusedWeightFile("a damaged zip archive") from None
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in n or ".." in PurePosixPath(n).parts for n in names):
        archive.close()
        raise RefusedWeightFile("a zip archive of another layout than torch's")
    root = roots.pop()
    return archive, root, {name[len(root) + 1 :] for name in names}


def program_kind(path: str | Path) -> ProgramKind:
    """Which saved program a file is, by its archive layout; RefusedWeightFile for anything else."""
    archive, _, members = _archive_members(Path(path))
    archive.close()
    if "archive_format" in members:
        return "exported program"
    code = any(name.startswith("code/") for name in members)
    if not (code and {"data.pkl", "constants.pkl", "version"} <= members):
        raise RefusedWeightFile("a torch.save zip archive of pickles, without TorchScript code")
    for name in members:
        if name not in _TORCHSCRIPT_FILES and not name.startswith(_TORCHSCRIPT_FOLDERS):
            raise RefusedWeightFile(f"a TorchScript archive with a stray member '{name}'")
    return "torchscript"


def exported_program(path: str | Path) -> io.BytesIO:
    """The PT2 archive, checked to hold no pickle torch.export.load would unpickle, as a copy with
    its (pickled) sample inputs emptied: ready for `torch.export.load`."""
    archive, root, members = _archive_members(Path(path))
    with archive:
        if archive.read(f"{root}/archive_format") != b"pt2":
            raise RefusedWeightFile("an exported program of an older format, which holds pickles")
        models = {n[len("models/") : -len(".json")] for n in members if n.startswith("models/")}
        allowed = set(_PT2_FILES)
        for model in models:
            allowed |= {f"models/{model}.json", f"data/sample_inputs/{model}.pt"}
            for folder, kind in (("weights", "weights"), ("constants", "constants")):
                config = f"data/{folder}/{model}_{kind}_config.json"
                if config not in members:
                    raise RefusedWeightFile(f"an exported program without {config}")
                allowed |= {config} | _raw_payloads(archive.read(f"{root}/{config}"), folder)
        stray = sorted(n for n in members - allowed if not n.startswith("extra/"))
        if not models or stray:
            what = f"a member '{stray[0]}' outside the layout" if stray else "no model"
            raise RefusedWeightFile(f"an exported program with {what}")
        copy = io.BytesIO()
        with zipfile.ZipFile(copy, "w", zipfile.ZIP_STORED) as out:
            for info in archive.infolist():
                sample_inputs = info.filename.startswith(f"{root}/data/sample_inputs/")
                out.writestr(info.filename, b"" if sample_inputs else archive.read(info))
    copy.seek(0)
    return copy


def _raw_payloads(config_bytes: bytes, folder: str) -> set[str]:
    """Member names of a PT2 payload config, refusing any payload stored as a pickle."""
    try:
        entries = json.loads(config_bytes.decode("utf-8"))["config"].values()
        payloads = {(entry["path_name"], entry["use_pickle"]) for entry in entries}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise RefusedWeightFile("an exported program with a damaged config") from None
    prefix = "weight_" if folder == "weights" else "tensor_"
    for name, pickled in payloads:
        if pickled is not False or not isinstance(name, str) or not name.startswith(prefix):
            raise RefusedWeightFile(f"an exported program with pickled {folder}")
    return {f"data/{folder}/{name}" for name, _ in payloads}
