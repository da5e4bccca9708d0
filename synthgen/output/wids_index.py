"""`webdataset/{split}.wids.json`: the shard index `wids.ShardListDataset` opens for random access."""

from __future__ import annotations

import json
import posixpath

from synthgen.output.outdir import WEBDATASET, WIDS_INDEX, OutDir
from synthgen.output.records import Manifest


def write_wids_index(out: OutDir, manifest: Manifest) -> list[str]:
    """One index per split; returns the paths written.

    URLs are relative to the index file, which wids resolves against the index's own location, so
    the index works wherever OUT is copied or pushed.
    """
    has_tars = any(p.startswith(f"{WEBDATASET}/") for s in manifest.shards for p in s.files)
    if not has_tars:
        return []
    written = []
    for split in manifest.counts:
        shards = [
            {"url": posixpath.basename(f.path), "nsamples": f.count}
            for f in manifest.shard_files(split, WEBDATASET)
        ]
        index = {
            "__kind__": "wids-shard-index-v1",
            "wids_version": 1,
            "name": f"{manifest.name}-{split}",
            "shardlist": shards,
        }
        relative = WIDS_INDEX.format(split=split)
        out.write_atomic(relative, json.dumps(index, indent=2).encode())
        written.append(relative)
    return written
