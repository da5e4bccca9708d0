"""An fsspec filesystem wrapper that counts what is opened and read through it.

Put in place of an `OutDir.fs`, it sees OUT's files only (unlike the process's read(2) counter,
which sees fonts and libraries too). The corpus tests assert on it; benchmarks/scale.py measures
finalize's reads with it.
"""

from __future__ import annotations


class CountingFS:
    """`read`: bytes read so far; `opened`: the paths opened for reading, in order; `fetched`:
    the files read whole (`cat_file`, one round trip each on an object store)."""

    def __init__(self, fs):
        self.fs, self.read, self.opened, self.fetched = fs, 0, [], []

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def cat_file(self, path, *args, **kwargs):
        data = self.fs.cat_file(path, *args, **kwargs)
        self.fetched.append(path)
        self.read += len(data)
        return data

    def open(self, path, mode="rb", **kwargs):
        handle = self.fs.open(path, mode, **kwargs)
        if "r" in mode:
            self.opened.append(path)
            read = handle.read

            def counted(*args):
                data = read(*args)
                self.read += len(data)
                return data

            handle.read = counted
        return handle
