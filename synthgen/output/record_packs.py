"""Record packs: many commit records in one file, so reading 10^4 of them from an object store
takes about 40 round trips, not 10^4.

A worker writes a pack of the records it committed every `PACK_SIZE` shards and when it stops.
A pack is only a copy: the commit record of each shard stays the truth. A reader takes a packed
record only where the store's own listing vouches for it, the listed MD5 of the record file
(S3's ETag of a single-part object) being the MD5 of the packed bytes. So a pack never needs to
be invalidated: a record written again (a damaged shard rendered anew), removed, or a pack from
another run simply stops matching, and that record is read on its own. Where a listing carries no
MD5 (local disk, where reading each record is cheap anyway), packs are not read at all.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

from synthgen.errors import OutputError
from synthgen.output.records import ShardRecord

PACK_SIZE = 256  # records per pack: 40 packs for 10^4 shards; a killed worker loses < 256
PACK = re.compile(r"[0-9a-f]{12}\.json")  # the name of a pack file, in STATE/packs
_ETAG = re.compile(r'"?([0-9a-f]{32})"?')  # an MD5 ETag; a multipart one ("…-3") is no MD5


def pack_bytes(records: Iterable[ShardRecord]) -> bytes:
    """A pack holding each record's exact commit-file bytes."""
    return json.dumps({"records": {r.name: r.to_json().decode() for r in records}}).encode()


def listed_md5(info: dict[str, Any]) -> str | None:
    """The MD5 of a file's bytes as the store's listing gives it, or None where it gives none."""
    match = _ETAG.fullmatch(str(info.get("ETag", "")))
    return match.group(1) if match else None


def unpacked(data: bytes, vouched: dict[str, str], commit_path) -> dict[str, ShardRecord]:
    """The records of a pack whose bytes match `vouched` (shard name -> listed MD5 of its commit
    file). A pack that is not one (damaged, cut short) gives nothing: each record is then read."""
    try:
        packed = json.loads(data.decode("utf-8"))["records"]
        items = list(packed.items())
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    records = {}
    for name, text in items:
        if not isinstance(text, str) or name not in vouched:
            continue
        raw = text.encode()
        if hashlib.md5(raw, usedforsecurity=False).hexdigest() != vouched[name]:
            continue
        try:
            records[name] = ShardRecord.from_json(raw, commit_path(name))
        except OutputError:
            continue  # the same bytes as the record file: reading that one reports the damage
    return records
