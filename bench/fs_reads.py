"""Every read made through an fsspec filesystem, recorded as (path, start, end): its files' reads and
cat_file's (fsspec's cat_ranges reads through it). What bench/bench_gid_reads.py counts and
tests/test_gid_reads.py asserts: the row groups of a Parquet file whose bytes a read reached."""

from __future__ import annotations


class _Seen:
    """A file whose reads are recorded."""

    def __init__(self, f, path: str, reads: list):
        self._f, self._path, self._reads = f, path, reads

    def read(self, n=-1):
        at = self._f.tell()
        data = self._f.read(n)
        self._reads.append((self._path, at, at + len(data)))
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self._f.close()


def record_reads(fs, reads: list, patch=setattr) -> None:
    """Append each read of `fs` to `reads` from now on: fs.open's files and fs.cat_file, replaced through
    `patch` (a test's monkeypatch.setattr, undone after it)."""
    real_open, real_cat = fs.open, fs.cat_file

    def cat_file(path, start=None, end=None, **k):
        data = real_cat(path, start=start, end=end, **k)
        reads.append((fs._strip_protocol(path), start or 0, (start or 0) + len(data)))
        return data

    patch(fs, "open", lambda path, *a, **k: _Seen(real_open(path, *a, **k), fs._strip_protocol(path), reads))
    patch(fs, "cat_file", cat_file)
