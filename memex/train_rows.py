"""The index's copy of the training set: written once per index, read by gid range and by gid set.

    train_rows.parquet  TRAIN_FILE_SCHEMA: gid (= row number), id, uri, caption, image_offset, image_length
    train.pack          the rows' encoded image bytes end to end, in row order (no container, never parsed)

Readers get TRAIN_SCHEMA tables (gid, id, image, uri, caption) either way.

Why a pack beside the table: the match stage fetches the pixels of each samples shard's distinct
neighbours, 500-2,000 rows scattered over the whole training set, and pyarrow reads the column chunk of
a row group whole for one row. With the images in the table (row groups of 512 x ~40 KB), that was
~20 MB read for each neighbour, 10-40 GB a samples shard at 5M training rows, again for every shard.
From the pack, one ranged read an image (~40 KB; fsspec's cat_ranges sends a read's requests together,
as many at once as botocore's connection pool holds on S3: 10 unless storage.options sets
config_kwargs.max_pool_connections): bench/bench_fetch.py. Lance reads rows by number too, but would
be one more storage format for one column.

Indexes built before the pack hold their rows and images in train.parquet (TRAIN_SCHEMA): they are
read as they are, so their keys, runs and re-matches stay valid. The new table has another name so
that memex from before the pack, given an index folder written by this one (one storage.root, two
checkouts), finds no train.parquet and writes it, rather than reading no image from a table without
them (every training image quarantined, an audit with no finding and no error).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memex.layout import TRAIN_FILE_SCHEMA, TRAIN_SCHEMA, IndexLayout, StorageError
from memex.storage import Store, client_error, damaged, is_damage, unreadable

# Neighbouring ranges of one read are fetched as one request when fewer bytes than this lie between them
# (an S3 GET's ~20-50 ms to first byte moves ~0.25-1 MB on one connection; the requests of one read go
# out together), up to PACK_SPAN bytes a request (memory). A range of gids in row order (a shard's batch)
# is one request; a match shard's neighbours (500-2,000 of 5M rows, ~100 MB apart) one request each.
PACK_GAP = 256 << 10
PACK_SPAN = 64 << 20
# read_in fetches the chosen row groups' column chunks this many bytes at a time, each batch's requests sent
# together: all of a match shard's ~640 groups of train_rows.parquet at once (~25 KB each at 256 rows), ~12 groups
# at a time of an older index's train.parquet, whose image column is ~20 MB a group (640 of them: 12.8 GB held)
READ_BATCH = 256 << 20


def write(store: Store, layout: IndexLayout, tables: Iterable[pa.Table], row_group_size: int) -> None:
    """train.pack, then train_rows.parquet, from TRAIN_SCHEMA tables made one after another (bounded
    memory: one record batch's images at a time). Each file appears complete or not at all; the table,
    whose presence says the copy is done, is moved into place last."""
    with store.atomic(layout.rows_path) as table_tmp:
        with store.writing(layout.pack_path) as pack:  # (on S3 written in place: no copy of ~200 GB to move it)
            with store.fs.open(table_tmp, "wb") as f, pq.ParquetWriter(f, TRAIN_FILE_SCHEMA, compression="zstd") \
                    as writer:
                at = 0
                for t in tables:  # a batch at a time: binary offsets are int32 (2 GiB), a table may be larger
                    for b in t.cast(TRAIN_SCHEMA).to_batches():
                        if b.num_rows:
                            rows, at = _packed(pa.Table.from_batches([b]), pack, at)
                            writer.write_table(rows, row_group_size=row_group_size)
    # Arrow's allocator (mimalloc) keeps what the copy freed: a listing that holds its images (WebDataset
    # tars) left the driver ~520 MB larger for the rest of the audit at 9,600 55 kB images, with Arrow's
    # own allocations unchanged (bench/bench_manifest.py); this hands it back to the system
    pa.default_memory_pool().release_unused()


def _packed(t: pa.Table, pack, at: int) -> tuple[pa.Table, int]:
    """Append the images of TRAIN_SCHEMA rows to the open pack file at byte `at` -> (their rows of
    train_rows.parquet, the pack's new end)."""
    image = t["image"].combine_chunks()
    valid = image.is_valid()
    # null rows (an image read later from its uri) as empty values: the offsets then give the bytes of
    # every row, and the values buffer holds the table's images end to end (written in one call)
    if image.null_count:  # (a copy of the table's images: only when some are null)
        image = pc.if_else(valid, image, pa.scalar(b"", pa.binary()))
    bufs = image.buffers()  # [validity, int32 offsets, values]
    ends = np.frombuffer(bufs[1], np.int32)[image.offset:image.offset + t.num_rows + 1].astype(np.int64)
    size = int(ends[-1] - ends[0])
    if size:
        pack.write(bufs[2].slice(int(ends[0]), size))
    null = ~valid.to_numpy(zero_copy_only=False)
    rows = pa.table({"gid": t["gid"], "id": t["id"], "uri": t["uri"], "caption": t["caption"],
                     "image_offset": pa.array(at + ends[:-1] - ends[0], pa.int64(), mask=null),
                     "image_length": pa.array(np.diff(ends), pa.int64(), mask=null)}, schema=TRAIN_FILE_SCHEMA)
    return rows, at + size


def table_path(layout: IndexLayout) -> tuple[str, bool]:
    """(the Parquet file of the training rows, whether their images are in train.pack): train_rows.parquet,
    or an older index's train.parquet (images inline). Neither there: train_rows.parquet, named where read."""
    if layout.store.exists(layout.rows_path):
        return layout.rows_path, True
    if layout.store.exists(layout.inline_train_path):
        return layout.inline_train_path, False
    return layout.rows_path, True


def missing(layout: IndexLayout) -> list[str]:
    """["train_rows.parquet"] or ["train.pack"] when gone (a partial copy, a removal by hand), else [].
    Either one gone, the copy is made again (both files, the same rows)."""
    store = layout.store
    if store.exists(layout.rows_path):
        return [] if store.exists(layout.pack_path) else ["train.pack"]
    return [] if store.exists(layout.inline_train_path) else ["train_rows.parquet"]


def read_range(layout: IndexLayout, start: int, stop: int, batch: int,
               gids: np.ndarray | None = None) -> Iterator[pa.Table]:
    """Rows with start <= gid < stop (and gid in `gids`, sorted, when given), `batch` rows a table: only
    the row groups whose gid statistics reach the range are read, one at a time, and each batch's images
    in one request when their rows are consecutive. A shard task read its whole range at once: ~10 GB a
    task for a quarter of a 1M-image LAION part (bench/bench_shard_read.py)."""
    path, _ = table_path(layout)
    f = open_table(layout, path)
    try:
        md, col = f.metadata, f.schema_arrow.get_field_index("gid")
        groups = []
        for i in range(md.num_row_groups):
            st = md.row_group(i).column(col).statistics
            if st is None or not st.has_min_max:
                groups.append(i)
            elif st.min < stop and st.max >= start and (
                    gids is None or np.searchsorted(gids, st.max, "right") > np.searchsorted(gids, st.min)):
                groups.append(i)  # (with gids: only a group that holds one of them)
        for b in f.iter_batches(batch_size=batch, row_groups=groups):
            t = pa.Table.from_batches([b])
            g = t["gid"]
            keep = pc.and_(pc.greater_equal(g, start), pc.less(g, stop))
            if gids is not None:  # the sample's gids within this batch's span: a small set to look up
                span = pc.min_max(g)
                lo, hi = np.searchsorted(gids, [span["min"].as_py(), span["max"].as_py() + 1])
                keep = pc.and_(keep, pc.is_in(g, value_set=pa.array(gids[lo:hi], pa.int64())))
            t = t.filter(keep)
            if t.num_rows:
                yield _with_images(layout, t)
    except (pa.ArrowInvalid, OSError) as e:  # truncated or removed since: named, with the recovery
        if not is_damage(e):  # a storage failure (a reset, a refused read): re-raised, the table is fine
            raise
        raise StorageError(damaged(layout.store.uri_of(path), "Parquet", e)) from e


def read_gids(layout: IndexLayout, gids, columns: list[str] | None = None) -> pa.Table:
    """The rows of these gids (a list or an array), in gid order (`columns` of TRAIN_SCHEMA; images fetched
    only when asked). One read of the table's footer (6-12 MB at 5M rows) and of the row groups holding the
    gids (read_in)."""
    columns = columns or TRAIN_SCHEMA.names
    if not len(gids):
        return TRAIN_SCHEMA.empty_table().select(columns)
    path, packed = table_path(layout)
    packed = packed and "image" in columns
    if packed and not layout.store.exists(layout.pack_path):
        raise StorageError(f"{layout.store.uri_of(layout.pack_path)} is missing, the images of "
                           f"{layout.store.uri_of(path)}. It was removed after memex wrote it (a partial copy or "
                           "sync, a cleanup by hand): rerun the audit, whose index stage writes it again.")
    read = [c for c in columns if not (packed and c == "image")] + (["image_offset", "image_length"] if packed else [])
    t = read_in(layout.store, path, "gid", gids, read)
    return _with_images(layout, t).select(columns) if "image" in columns else t.select(columns)


def read_in(store: Store, path: str, column: str, values, columns: list[str] | None = None,
            schema: pa.Schema | None = None) -> pa.Table:
    """The rows of one Parquet file whose int `column` holds one of `values`, in file order (`columns` of them,
    cast to `schema`'s fields when given): only the row groups whose min/max statistics of `column` reach one
    of the values are read, their column chunks fetched together, READ_BATCH bytes at a time (ranges within
    PACK_GAP as one request, as read_pack). pyarrow's ("in", values) filter prunes row groups only for a few
    values (<~100 in pyarrow 26): the ~640 neighbours of a match shard read all 3,907 groups of a 1M-row
    train_rows.parquet (8x the time; bench/bench_gid_reads.py), a pictures.parquet whole for each samples
    shard. Nor is pyarrow given the file to read the chunks itself: through fsspec it reads them one after
    another, and on S3 each one past s3fs's read-ahead fetches its 50 MiB block (at LAION scale the whole file
    again). A file that is gone or damaged, or a store that fails to serve it, is named as Store.read_table
    names it."""
    want = np.unique(np.asarray(values, np.int64))
    try:
        with store.fs.open(path, "rb") as raw:  # its footer, and its size (the file's info, which s3fs's open gets)
            size = raw.size
            md = pq.ParquetFile(raw, pre_buffer=False).metadata
        schema_arrow = md.schema.to_arrow_schema()
        col = schema_arrow.get_field_index(column)
        lo, hi, known = (np.zeros(md.num_row_groups, np.int64) for _ in range(3))
        for i in range(md.num_row_groups):
            st = md.row_group(i).column(col).statistics
            if st is not None and st.has_min_max:
                lo[i], hi[i], known[i] = st.min, st.max, 1
        # a group holds a value when one lies in its [min, max]; one without statistics is read
        groups = np.flatnonzero((known == 0) | (np.searchsorted(want, hi, "right") > np.searchsorted(want, lo)))
        read = schema_arrow.names if columns is None else columns + [column] * (column not in columns)
        at = {md.schema.column(c).path: c for c in range(md.num_columns)}
        value_set = pa.array(want, schema_arrow.field(column).type)
        tables, batch, ranges, held = [], [], [], 0
        for k, g in enumerate(groups.tolist()):
            for name in read:
                c = md.row_group(g).column(at[name])
                first = c.data_page_offset  # where pyarrow starts a chunk (an empty one's data page offset is 0)
                if c.has_dictionary_page and 0 < c.dictionary_page_offset < first:
                    first = c.dictionary_page_offset
                ranges.append((first, first + c.total_compressed_size))
                held += c.total_compressed_size
            batch.append(g)
            if held >= READ_BATCH or k == len(groups) - 1:  # (an old index's inline images: ~20 MB a group)
                parts = _Parts(store, path, size, sorted(ranges))
                t = pq.ParquetFile(pa.PythonFile(parts, mode="r"), metadata=md, pre_buffer=False).read_row_groups(
                    batch, columns=read)
                tables.append(t.filter(pc.is_in(t[column], value_set=value_set)))
                batch, ranges, held = [], [], 0
        t = pa.concat_tables(tables) if tables else schema_arrow.empty_table().select(read)
    except Exception as e:  # as Store.read_table names it: damage with its fix, a store's failure to serve it
        if (failure := store.read_failure([path], store.uri_of(path), e)) is None:
            raise
        raise failure from e
    t = t if columns is None else t.select(columns)
    return t.cast(pa.schema([schema.field(c) for c in t.column_names])) if schema is not None else t


class _Parts:
    """A Parquet file as pyarrow reads it in read_in: the byte ranges it will read (sorted (start, end)),
    fetched at once (fsspec's cat_ranges: concurrent on S3); a read outside them is fetched when made."""

    closed = False

    def __init__(self, store: Store, path: str, size: int, ranges: list[tuple[int, int]]):
        self.store, self.path, self.size, self.pos = store, path, size, 0
        starts, ends = [], []
        for a, b in ranges:
            if starts and a - ends[-1] <= PACK_GAP and b - starts[-1] <= PACK_SPAN:
                ends[-1] = max(ends[-1], b)
            else:
                starts.append(a)
                ends.append(b)
        got = store.fs.cat_ranges([path] * len(starts), starts, ends) if starts else []
        for blob in got:
            if isinstance(blob, Exception):  # (fsspec returns a range's failure in its place)
                raise blob
        self.starts, self.blobs = starts, got

    def read(self, n: int = -1) -> bytes:
        i = bisect.bisect_right(self.starts, self.pos) - 1
        end = self.size if n < 0 else self.pos + n
        if i >= 0 and end <= self.starts[i] + len(self.blobs[i]):
            out = self.blobs[i][self.pos - self.starts[i]:end - self.starts[i]]
        else:
            out = self.store.fs.cat_file(self.path, start=self.pos, end=min(end, self.size))  # (s3fs: version_id 2nd)
        self.pos += len(out)
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos + (self.pos if whence == 1 else self.size if whence == 2 else 0)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def open_table(layout: IndexLayout, path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, filesystem=layout.store.fs, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as e:  # truncated or removed since: named, with the recovery
        if not is_damage(e):  # a storage failure (a reset, a refused read): re-raised, the table is fine
            raise
        raise StorageError(damaged(layout.store.uri_of(path), "Parquet", e)) from e


def _with_images(layout: IndexLayout, t: pa.Table) -> pa.Table:
    """A TRAIN_SCHEMA table from rows of train_rows.parquet: their images fetched from train.pack (rows of
    an older index's train.parquet, images inline, are cast as they are)."""
    if "image" in t.column_names:
        return t.cast(pa.schema([TRAIN_SCHEMA.field(c) for c in t.column_names]))
    offset, length = (t[c].to_numpy(zero_copy_only=False) for c in ("image_offset", "image_length"))
    valid = t["image_offset"].is_valid().to_numpy(zero_copy_only=False) if t["image_offset"].null_count else \
        np.ones(t.num_rows, bool)
    image = pa.array(read_pack(layout, offset[valid].astype(np.int64), length[valid].astype(np.int64)), pa.binary())
    if not valid.all():  # back to one value a row, nulls where no image was stored
        full = np.full(t.num_rows, -1)
        full[valid] = np.arange(valid.sum())
        image = image.take(pa.array(full, pa.int64(), mask=~valid))
    cols = {c: t[c] for c in t.column_names if c not in ("image_offset", "image_length")} | {"image": image}
    return pa.table([cols[c] for c in TRAIN_SCHEMA.names if c in cols],
                    schema=pa.schema([f for f in TRAIN_SCHEMA if f.name in cols]))


def read_pack(layout: IndexLayout, offset: np.ndarray, length: np.ndarray) -> list[bytes]:
    """The byte ranges [offset, offset + length) of train.pack, in the order given; ranges near each
    other fetched as one request (PACK_GAP), the requests sent together (fsspec's cat_ranges: concurrent on
    S3, up to botocore's connection pool). An empty range (an empty image) is no request."""
    store, path = layout.store, layout.pack_path
    order = np.argsort(offset, kind="stable")
    starts, ends, members = [], [], []  # one request each, and the ranges it holds
    for i in order.tolist():
        lo, hi = int(offset[i]), int(offset[i] + length[i])
        if lo == hi:  # an empty image: no request (s3fs sends bytes=N-(N-1), which S3 answers with the whole file)
            continue
        if starts and lo - ends[-1] <= PACK_GAP and hi - starts[-1] <= PACK_SPAN:
            ends[-1] = max(ends[-1], hi)
            members[-1].append(i)
        else:
            starts.append(lo)
            ends.append(hi)
            members.append([i])
    out: list[bytes] = [b""] * len(offset)
    try:  # fsspec returns a range's failure in its place (on_error="return"): each is looked at below
        got = store.fs.cat_ranges([path] * len(starts), starts, ends) if starts else []
    except Exception as e:  # noqa: BLE001 - an I/O or store failure named (damage, or a rerun); the rest as itself
        if not _io_failure(e):
            raise
        raise _pack_error(store, path, e) from e
    for blob, lo, hi, idx in zip(got, starts, ends, members):
        if isinstance(blob, Exception) and not _io_failure(blob):
            raise blob
        if isinstance(blob, Exception) or len(blob) != hi - lo:  # removed, or shorter than train_rows.parquet says
            e = blob if isinstance(blob, Exception) else EOFError(f"bytes {lo}-{hi} asked, {len(blob)} read")
            raise _pack_error(store, path, e) from (e if isinstance(blob, Exception) else None)
        view = memoryview(blob)
        for i in idx:
            out[i] = bytes(view[int(offset[i]) - lo:int(offset[i] + length[i]) - lo])
    return out


def _io_failure(e: BaseException) -> bool:
    """A failure of reading the file (fsspec's OSErrors, a store client's own errors), which _pack_error names; a
    MemoryError or a bug (TypeError, fsspec's loop) is raised as itself, not called damage."""
    return isinstance(e, OSError) or client_error(e)


def _pack_error(store: Store, path: str, e: BaseException) -> StorageError:
    """A range of train.pack that did not read: gone or short (damaged: the pack and its rows are written again),
    or a storage failure (a 503 after s3fs's retries, a reset: the pack is fine, and deleting it would copy the
    whole training set again, ~200 GB at LAION scale, for a network blip)."""
    if not is_damage(e):
        return StorageError(unreadable(store.uri_of(path), e))
    return StorageError(damaged(store.uri_of(path), "image pack", e).replace(
        "Remove it,", "Remove it and train_rows.parquet beside it,"))
