"""Training-set manifests: the one format memex reads training images from (train and audit).

A manifest is a Parquet file (or folder of Parquet files) on any fsspec URI with columns
    id       string, unique per row
    image    binary, encoded PNG/JPEG/WebP bytes      (either image ...
             or Hugging Face datasets' Image struct {bytes, path}: its bytes, else its path as the uri
    uri      string, fsspec URI of the image file      ... or uri per row; a relative
             one, "imgs/0001.png", is relative to the manifest's folder)
    caption  string, optional (text-conditional models and caption-ranked prompts); a list of
             strings (COCO-style, several an image) gives its first (memex/ingest.py)
A Hugging Face datasets folder (`Dataset.save_to_disk`: data-*.arrow Arrow streams, state.json,
dataset_info.json) is read as the same table (`hf_dataset_parts`), and so is img2dataset's Parquet
output (output_format=parquet: key, jpg, caption, status, ...): key is the id, jpg the image, and
its rows without an image (failed downloads) are left out (`img2dataset_rows`).
LAION-style duplicates are simply several rows (different ids) holding the same picture.

`expand_duplicates` applies a duplication schedule (e.g. 8 images x 32 copies, the rest once) to a
manifest of distinct images, the way the paper's small models were trained on duplicated data.
"""

from __future__ import annotations

import json
import logging
import posixpath
import random
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from memex.config import DuplicationGroup, MemexError
from memex.images import decode, resize
from memex.redact import redact_urls
from memex.shards import read_uri, store_failure

log = logging.getLogger("memex.manifest")
MANIFEST_COLUMNS = ("id", "image", "uri", "caption")
HF_STATE, HF_DICT = "state.json", "dataset_dict.json"  # datasets' save_to_disk: a Dataset, a DatasetDict
HF_ID_FIX = ("ds.add_column('id', [str(i) for i in range(len(ds))]).save_to_disk(<new folder>) gives a "
             "Hugging Face dataset ids (datasets.load_from_disk reads it)")


class ManifestError(MemexError, ValueError):
    """The manifest is missing, empty or malformed, or one of its images cannot be read."""


def parquet_parts(folder: str, files: list[str]) -> list[str]:
    """A folder's Parquet parts among its `files` (fs.find), in name order: only .parquet files, as
    pyarrow's datasets skip _/. files: the images a manifest's relative uris point at may lie beside
    them (pyarrow read every file as Parquet), and in no _/. folder under it either, as pyarrow skips
    them: Spark's _temporary/ attempts, a Delta table's _delta_log/ checkpoints (read as rows, they
    duplicated ids or added stray ones)."""
    root = folder.rstrip("/") + "/"
    return sorted(f for f in files if f.endswith(".parquet")
                  and not any(part.startswith(("_", ".")) for part in f[len(root):].split("/")))


def manifest_sources(path: str, storage_options: dict[str, Any] | None = None) \
        -> tuple[fsspec.AbstractFileSystem, str, bool, list[str], bool]:
    """Where a manifest's rows are: (fs, its path, is a folder, its files, they are datasets' Arrow
    files). A folder's Parquet parts are its .parquet files in name order."""
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if not fs.exists(p):
        raise ManifestError(f"training manifest {path} does not exist")
    is_dir = fs.isdir(p)  # one request on object storage: asked once
    arrow = hf_dataset_parts(fs, p, path) if is_dir else None
    if arrow:
        return fs, p, is_dir, arrow, True
    if not is_dir:
        return fs, p, is_dir, [p], False
    files = fs.find(p)
    if not files:
        raise ManifestError(f"training manifest {path} is an empty folder")
    source = parquet_parts(p, files)
    if not source:
        # Arrow's own message: "Could not read schema from a.png. Is this a 'parquet' file?"
        raise ManifestError(f"training manifest {path} is a folder without a .parquet file "
                            f"({posixpath.basename(files[0])} is not one): give a Parquet manifest with columns "
                            "id, image (encoded bytes) or uri, and caption for a text model "
                            "(demo/make_data.py writes one)")
    return fs, p, is_dir, source, False


def read_schemas(subject: str, fs: fsspec.AbstractFileSystem, files: list[str], arrow: bool = False) -> list[pa.Schema]:
    """Each file's schema (a Parquet footer, or an Arrow stream's first message: no rows), 16 files at a
    time: a LAION folder has hundreds of parts on object storage. An unreadable one is named after
    `subject`."""
    from concurrent.futures import ThreadPoolExecutor

    def schema(f: str) -> pa.Schema:
        try:
            return arrow_schema(fs, f) if arrow else pq.read_schema(f, filesystem=fs)
        except Exception as e:  # noqa: BLE001 - re-raised naming the file
            raise ManifestError(f"{subject}: {posixpath.basename(f)} is not readable "
                                f"{'Arrow' if arrow else 'Parquet'}: {type(e).__name__}: {e}") from e

    with ThreadPoolExecutor(min(16, len(files))) as pool:
        return list(pool.map(schema, files))


def part_schemas(path: str, fs: fsspec.AbstractFileSystem, source: list[str], arrow: bool) -> list[pa.Schema]:
    """The schemas of a manifest's parts, which must all hold the same columns: pyarrow reads several
    Parquet files with the first one's schema, so a later part's own columns (its images, its captions)
    were dropped without a word."""
    schemas = read_schemas(f"training manifest {path}", fs, source, arrow)
    found = [s.names for s in schemas]
    for f, cols in zip(source[1:], found[1:]):
        if set(cols) != set(found[0]):
            lacks, adds = sorted(set(found[0]) - set(cols)), sorted(set(cols) - set(found[0]))
            raise ManifestError(
                f"training manifest {path}: its parts hold different columns: {posixpath.basename(f)} "
                f"{'lacks ' + str(lacks) if lacks else ''}{' and ' if lacks and adds else ''}"
                f"{'adds ' + str(adds) if adds else ''} against {posixpath.basename(source[0])} "
                f"({sorted(found[0])}). Read as one table, one part's columns would be dropped or left empty: "
                "write every part with the same columns, or give one part's file")
    return schemas


def part_columns(path: str, fs: fsspec.AbstractFileSystem, source: list[str], arrow: bool) -> list[str]:
    """The columns of a manifest's parts, which must all hold the same (`part_schemas`)."""
    return part_schemas(path, fs, source, arrow)[0].names


def unified_schema(subject: str, source: list[str], schemas: list[pa.Schema]) -> pa.Schema:
    """One schema to read Parquet parts `source` (their `schemas`) as one table. pyarrow reads a list of
    files with the first one's schema, casting the others to it: a caption column pandas wrote all-None
    (type null) in the first part refused every later part's text ("Unsupported cast from string to
    null"). Here a null column takes its type from the other parts, and widths and units are widened
    (int32 and int64, timestamp[us] and [ns]); a dictionary (a pandas category) reads as its values.
    Two types no cast joins (int ids in one part, string ids in another: cast to the first's, "007"
    became 7) are refused naming the column and both parts. `subject` starts each message."""
    try:
        return pa.unify_schemas(schemas)  # the usual case: identical, or a null column beside its typed ones
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    plain = [pa.schema([f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in s],
                       metadata=s.metadata) for s in schemas]
    try:
        return pa.unify_schemas(plain, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    first: dict[str, tuple[str, pa.Field]] = {}  # column -> the first part giving it a type (not null), that field
    for part, s in zip(source, plain):
        for field in s:
            if pa.types.is_null(field.type):
                continue
            if field.name not in first:
                first[field.name] = (part, field)
                continue
            other, was = first[field.name]
            try:
                pa.unify_schemas([pa.schema([was]), pa.schema([field])], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise ManifestError(
                    f"{subject}: its parts hold column {field.name!r} as different types: {was.type} in "
                    f"{posixpath.basename(other)}, {field.type} in {posixpath.basename(part)}; read as one table "
                    "a column has one type: write every part with the same type (ids as strings everywhere: "
                    "table.set_column(table.column_names.index('id'), 'id', pc.cast(table['id'], pa.string())))"
                ) from None
    raise ManifestError(f"{subject}: its parts' schemas cannot be read as one table: write every part with the same "
                        "column types")


def read_manifest(path: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Read and check a manifest: an `id` column with unique values and an `image` or `uri` column."""
    fs, p, is_dir, source, arrow = manifest_sources(path, storage_options)
    schema = None
    if len(source) > 1:
        schemas = part_schemas(path, fs, source, arrow)
        if not arrow:  # (datasets writes every Arrow file of a dataset with one schema)
            schema = unified_schema(f"training manifest {path}", source, schemas)
    if arrow:
        table = read_arrow(f"training manifest {path}", fs, source)
    else:
        try:
            # a local file is memory-mapped: its pages are the file's, not a second copy in the heap
            table = pq.read_table(source if is_dir else p, filesystem=fs, memory_map=_is_local(fs), schema=schema)
        except Exception as e:  # noqa: BLE001 - re-raised naming the file
            raise ManifestError(f"training manifest {path} is not readable Parquet: {type(e).__name__}: {e}") from e
    if table.num_rows == 0:
        raise ManifestError(f"training manifest {path} holds no rows")
    table = img2dataset_rows(path, table)
    problem = missing_columns(table.column_names, hf=arrow)
    if problem:
        raise ManifestError(f"training manifest {path} {problem}")
    table = normalized(path, table, fs, p if is_dir else posixpath.dirname(p))
    check_ids(path, table["id"])
    return table


def normalized(path: str, table: pa.Table, fs: fsspec.AbstractFileSystem, base: str) -> pa.Table:
    """A manifest's rows (img2dataset's already renamed) as memex reads them: id a string, image
    bytes (datasets' Image struct: its bytes, its path as the uri), uris resolved against `base`."""
    try:
        table = table.set_column(table.column_names.index("id"), "id", pc.cast(table["id"], pa.string()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:  # Arrow's words name neither column nor fix
        raise ManifestError(f"training manifest {path}: column 'id' holds {table.schema.field('id').type} that is not "
                            f"text ({e}): give ids as strings (or integers)") from e
    image_type = table.schema.field("image").type if "image" in table.column_names else None
    if image_type is not None and (pa.types.is_string(image_type) or pa.types.is_large_string(image_type)):
        # a cast to binary succeeded, each "image" the path's text: every row quarantined after the build
        raise ManifestError(f"training manifest {path}: column 'image' holds text (file paths or URLs?), not encoded "
                            "image bytes: name that column 'uri' (a path relative to the manifest's folder, or any "
                            "fsspec URI), or put the PNG/JPEG bytes in 'image'")
    if image_type is not None and pa.types.is_struct(image_type):
        table = _image_struct(path, table)
    if "uri" in table.column_names:
        table = table.set_column(table.column_names.index("uri"), "uri", _resolved(table["uri"], fs, base))
    return table


def iter_manifest(path: str, storage_options: dict[str, Any] | None = None,
                  batch_rows: int = 256) -> Iterator[pa.Table]:
    """A manifest's rows, about `batch_rows` at a time, in file then row order, as `read_manifest`
    gives them (img2dataset's failed downloads left out, `normalized`), without holding them all:
    the index reads a manifest of tens of GB of embedded images this way. Parquet files a row group
    at a time; a datasets folder's Arrow files a record batch at a time (datasets writes ~100-1000
    rows a batch). The caller checks the columns, the ids and emptiness over the whole
    (`read_manifest` does it on its table)."""
    fs, p, is_dir, source, arrow = manifest_sources(path, storage_options)
    base = p if is_dir else posixpath.dirname(p)
    for f in source:
        for batch in (_arrow_batches(path, fs, f) if arrow else _parquet_batches(path, fs, f, batch_rows)):
            t = _img2dataset_kept(pa.Table.from_batches([batch]))
            if t.num_rows:
                yield normalized(path, t, fs, base)


# pyarrow's read buffer for one column chunk of a Parquet manifest: the image column's pages are read
# through it as the batches need them (a page is ~1 MiB), where unbuffered a row group's whole column chunk
# was read at once (bench/bench_rowgroup_memory.py)
PARQUET_BUFFER = 8 << 20


def _parquet_batches(path: str, fs: fsspec.AbstractFileSystem, f: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    try:
        # pre_buffer=False: with it, pyarrow buffers every row group's column chunks as the batches
        # go by (RSS grew to the file's size: 600 MB for a 540 MB file of 96 row groups); without,
        # one row group at a time (~60 MB). buffer_size: else a file of one row group (pq.write_table's and
        # pandas' default, up to 1Mi rows: a whole 100k-image part) was read whole, peak RSS ~1.2x the file
        # (+739 MB for a 572 MB file), where buffered it is ~+250 MB
        yield from pq.ParquetFile(f, filesystem=fs, pre_buffer=False,
                                  buffer_size=PARQUET_BUFFER).iter_batches(batch_size=batch_rows)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise ManifestError(f"training manifest {path}: {f} is not readable Parquet: {type(e).__name__}: {e}") from e


def _arrow_batches(path: str, fs: fsspec.AbstractFileSystem, part: str) -> Iterator[pa.RecordBatch]:
    """An Arrow stream's (or file's) record batches, one at a time from the open file."""
    try:
        with fs.open(part, "rb") as f:
            yield from open_arrow(f)[1]
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise ManifestError(f"{path}: {posixpath.basename(part)} is not readable Arrow: "
                            f"{type(e).__name__}: {e}") from e


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


# Arrow's take (and sort_by, combine_chunks) concatenates a column's chunks, and a `binary` column
# has 32-bit offsets: over 2 GiB of image bytes (a few thousand LAION images at 512 px) failed with
# "offset overflow while concatenating arrays". Chunks of at most this many bytes are rebuilt.
TAKE_CHUNK_BYTES = 1 << 30
ARROW_OFFSET_LIMIT = (1 << 31) - (1 << 20)  # a table below it is taken as Arrow does it


def _taken_bytes(table: pa.Table, indices: pa.Array | pa.ChunkedArray) -> int:
    """The most bytes one binary or string column of table.take(indices) holds, from each row's length
    (4 bytes a row): the output's size, not the input's. A duplication schedule repeats rows (32 copies
    of 40 1 MiB images beside 960 others: a 1 GiB manifest, 2.2 GiB taken), and Arrow's take, chosen by
    the input's size, failed with "Take operation overflowed binary array capacity"."""
    most = 0
    for f, col in zip(table.schema, table.columns):
        if f.type in (pa.binary(), pa.string()) and len(col):
            most = max(most, pc.sum(pc.take(pc.binary_length(col), indices)).as_py() or 0)
    return most


def _narrowed(arr: pa.Array, typ: pa.DataType, start: int, stop: int) -> pa.Array:
    """Rows start:stop of a large_binary or large_string array as `typ` (binary, string: 32-bit offsets,
    counted from the piece's first byte), its bytes shared, not copied. Cast as a slice, a piece past
    the array's first 2 GiB kept its 64-bit offsets and failed ("Failed casting from large_binary to
    binary: input array too large")."""
    n = stop - start
    off = np.frombuffer(arr.buffers()[1], np.int64, n + 1, (arr.offset + start) * 8)
    piece = arr.slice(start, n)
    validity = pc.is_valid(piece).buffers()[1] if piece.null_count else None  # a bitmap from the piece's row 0
    data = arr.buffers()[2]
    data = data.slice(int(off[0]), int(off[-1] - off[0])) if data is not None else pa.py_buffer(b"")
    return pa.Array.from_buffers(typ, n, [validity, pa.py_buffer((off - off[0]).astype(np.int32)), data],
                                 null_count=piece.null_count)


def take_rows(table: pa.Table, indices) -> pa.Table:
    """table.take(indices) for tables of any size: where the input and each variable-width column of the
    output are under 2 GiB, as Arrow does it; else the variable-width columns are taken as their 64-bit
    (large_) types and cut back into chunks of at most TAKE_CHUNK_BYTES in their own types, so the
    schema is unchanged."""
    indices = pa.array(indices, pa.int64()) if not isinstance(indices, (pa.Array, pa.ChunkedArray)) else indices
    if table.nbytes < ARROW_OFFSET_LIMIT and _taken_bytes(table, indices) < ARROW_OFFSET_LIMIT:
        return table.take(indices)
    large = {pa.binary(): pa.large_binary(), pa.string(): pa.large_string()}
    wide = table.cast(pa.schema([f.with_type(large.get(f.type, f.type)) for f in table.schema]))
    taken = wide.take(indices)
    cols = []
    for f, col in zip(table.schema, taken.columns):
        if f.type not in large:
            cols.append(col)
            continue
        pieces, start = [], 0
        arr = col.combine_chunks()  # 64-bit offsets: no overflow
        n = len(arr)
        while start < n:  # rows until the chunk's bytes reach the limit (one row at least)
            lengths = pc.binary_length(arr.slice(start, min(n - start, 1 << 20))).fill_null(0).to_numpy()
            stop = start + max(1, int(np.searchsorted(np.cumsum(lengths), TAKE_CHUNK_BYTES, side="right")))
            pieces.append(_narrowed(arr, f.type, start, stop))
            start = stop
        cols.append(pa.chunked_array(pieces, f.type))
    return pa.table(cols, schema=table.schema)


def no_lone_surrogates(v: Any) -> Any:
    """A JSON string with a lone surrogate escape ("\\ud83d": an emoji cut in half, common in scraped
    captions) has no UTF-8, and Arrow refused it with a bare UnicodeEncodeError: it becomes U+FFFD, in
    lists and objects too (a list caption); other values as they are. Prompt files and imagefolder
    metadata.jsonl files are read through it."""
    if isinstance(v, str):
        return v.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(v, list):
        return [no_lone_surrogates(x) for x in v]
    if isinstance(v, dict):
        return {k: no_lone_surrogates(x) for k, x in v.items()}
    return v


def first_caption(value: Any) -> Any:
    """A caption cell of several captions an image (COCO-style list) -> its first non-empty one;
    any other value as it is."""
    if isinstance(value, list):
        return next((v for v in value if isinstance(v, str) and v.strip()), None)
    return value


def hf_dataset_parts(fs: fsspec.AbstractFileSystem, root: str, path: str, key: str | None = None) -> list[str] | None:
    """The Arrow files of a Hugging Face datasets folder written by `Dataset.save_to_disk`, in the
    order its state.json lists them; None when `root` is no such folder. A DatasetDict's folder (a
    folder per split) is refused, naming its splits: which one was trained on is not ours to guess.
    Errors name `key`=path (the setting) when given, else the training manifest."""
    subject = f"{key}={path}" if key else f"training manifest {path}"
    state, splits = posixpath.join(root, HF_STATE), posixpath.join(root, HF_DICT)
    if fs.exists(splits):
        try:
            names = json.loads(fs.cat_file(splits))["splits"]
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"{subject}: {HF_DICT} is not a datasets split list ({type(e).__name__}: {e})") from e
        raise ManifestError(f"{subject} is a Hugging Face DatasetDict (splits: {', '.join(names)}): give one split's "
                            f"folder, e.g. {posixpath.join(path, str(names[0]))}")
    if not fs.exists(state):
        return None
    try:
        files = [f["filename"] for f in json.loads(fs.cat_file(state))["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{subject}: {HF_STATE} does not list the dataset's Arrow files ({type(e).__name__}: {e}); "
                            "save it again with Dataset.save_to_disk") from e
    parts = [posixpath.join(root, f) for f in files]
    missing = [f for f in parts if not fs.exists(f)]
    if missing or not parts:
        raise ManifestError(f"{subject}: {HF_STATE} lists Arrow files that are missing ({', '.join(files) or 'none'}): "
                            "an incomplete copy? copy the whole save_to_disk folder")
    return parts


def arrow_schema(fs: fsspec.AbstractFileSystem, part: str) -> pa.Schema:
    """An Arrow stream's (or file's) schema: its first message, no rows read."""
    with fs.open(part, "rb") as f:
        try:
            return pa.ipc.open_stream(f).schema
        except pa.ArrowInvalid:
            f.seek(0)
            return pa.ipc.open_file(f).schema


def open_arrow(f) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """(schema, record batches) of an open Arrow file: datasets' IPC stream (its ArrowWriter), else the Arrow
    file format (random access), the batches read one at a time."""
    try:
        reader = pa.ipc.open_stream(f)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:  # the file format, not datasets' stream
        f.seek(0)
        reader = pa.ipc.open_file(f)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def read_arrow(path: str, fs: fsspec.AbstractFileSystem, parts: list[str],
               columns: list[str] | None = None) -> pa.Table:
    """datasets writes Arrow IPC streams (its ArrowWriter); the Arrow file format is read too. With
    `columns`, only those are kept, one record batch at a time: a save_to_disk training set given as
    prompts.path was read whole, embedded images included (~40 KB a row), for one caption column."""
    tables = []
    for part in parts:
        try:
            with fs.open(part, "rb") as f:
                whole, batches = open_arrow(f)
                schema = whole if columns is None else pa.schema([whole.field(c) for c in columns])
                tables.append(pa.Table.from_batches(
                    [b if columns is None else b.select(columns) for b in batches], schema=schema))
        except Exception as e:  # noqa: BLE001 - re-raised naming the file
            raise ManifestError(f"{path}: {posixpath.basename(part)} is not readable Arrow: "
                                f"{type(e).__name__}: {e}") from e
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid as e:
        raise ManifestError(f"{path}: its Arrow files have different columns ({e})") from e


def is_img2dataset_parquet(names: list[str]) -> bool:
    """img2dataset's output_format=parquet: key and jpg (the image bytes), no id or image column."""
    return {"key", "jpg"} <= set(names) and not {"id", "image"} & set(names)


def is_img2dataset_metadata(names: list[str]) -> bool:
    """The metadata .parquet img2dataset writes beside each shard of its other output formats (the
    images are in the .tar, or in files beside it): key and url, and no image of its own."""
    return {"key", "url"} <= set(names) and not {"id", "image", "uri", "jpg"} & set(names)


def is_img2dataset_metadata_file(fs: fsspec.AbstractFileSystem, parquet: str) -> bool:
    """Whether a .parquet file is img2dataset's metadata (its footer alone is read); an unreadable
    one is not: the manifest reader, which reads it next, names it."""
    try:
        return is_img2dataset_metadata(pq.read_schema(parquet, filesystem=fs).names)
    except Exception:  # noqa: BLE001 - see above
        return False


def img2dataset_rows(path: str, table: pa.Table) -> pa.Table:
    """img2dataset's Parquet output as a manifest: key -> id, jpg -> image, the rows whose download
    failed (jpg null, status != success: ~10-40% of a LAION part) left out, as they were never
    trained on. Any other table is returned as it is."""
    if not is_img2dataset_parquet(table.column_names):
        return table
    kept = _img2dataset_kept(table)
    if kept.num_rows == 0:
        raise ManifestError(f"training manifest {path} is img2dataset's output with no image: every one of its "
                            f"{table.num_rows} rows failed to download (see its status column)")
    if kept.num_rows < table.num_rows:
        log.info("%s: %d of img2dataset's %d rows have no image (failed downloads) and are left out", path,
                 table.num_rows - kept.num_rows, table.num_rows)
    return kept


def _img2dataset_kept(table: pa.Table) -> pa.Table:
    """img2dataset's rows with an image, key and jpg renamed id and image; any other table as it is."""
    if not is_img2dataset_parquet(table.column_names):
        return table
    kept = table if table["jpg"].null_count == 0 else table.filter(pc.is_valid(table["jpg"]))  # no copy if none
    return kept.rename_columns([{"key": "id", "jpg": "image"}.get(c, c) for c in kept.column_names])


def missing_columns(names: list[str], hf: bool = False) -> str | None:
    """What a manifest with these columns lacks, with the fix, or None. img2dataset's Parquet
    output (LAION's tooling) names them key and jpg; a Hugging Face dataset often has no id
    (`hf`: a save_to_disk folder, whose fix is the datasets call)."""
    names = list(names)
    if ("id" in names and {"image", "uri"} & set(names)) or is_img2dataset_parquet(names):
        return None
    msg = f"needs an 'id' column and an 'image' or 'uri' column (columns: {sorted(names)})"
    if is_img2dataset_metadata(names):  # the metadata beside its .tar shards or image files
        return (msg + ": this looks like img2dataset's metadata, whose images are not in it; give the folder "
                "img2dataset wrote, its .tar shards or image files with it (output_format webdataset or files), "
                "or a manifest of id and uri")
    if "id" not in names and hf:
        return msg + ": ids name the pictures in reports; " + HF_ID_FIX
    if "id" not in names:
        return (msg + ": ids name the pictures in reports; row numbers will do, "
                "table.append_column('id', pa.array([str(i) for i in range(table.num_rows)]))")
    return msg


def _image_struct(path: str, table: pa.Table) -> pa.Table:
    """An `image` column of Hugging Face datasets' Image type, struct<bytes, path> (what
    Dataset.to_parquet and the hub's Parquet files hold): image = its bytes; a row without bytes
    (an image datasets kept by path) is read from its path, as the uri. Cast as is, Arrow raised
    "Unsupported cast from struct<bytes: binary, path: string> to binary"."""
    col = table["image"]  # chunk by chunk: combined, over 2 GiB of bytes overflowed Arrow's 32-bit offsets
    names = [col.type.field(i).name for i in range(col.type.num_fields)]
    if "bytes" not in names:
        raise ManifestError(f"training manifest {path}: column 'image' is a {col.type}, not encoded image bytes nor "
                            "Hugging Face datasets' Image struct {bytes, path}: give encoded PNG/JPEG/WebP bytes")
    image = pc.struct_field(col, "bytes")
    table = table.set_column(table.column_names.index("image"), "image", image)
    if "path" in names and "uri" not in table.column_names:
        table = table.append_column("uri", pc.if_else(pc.is_null(image), pc.struct_field(col, "path"), None))
    return table


def _resolved(uris: pa.ChunkedArray, fs: fsspec.AbstractFileSystem, base: str) -> pa.Array:
    """Relative uris ("imgs/0001.png") are relative to the manifest's folder, on its filesystem: as
    written, fsspec would open them from the working directory, which is another folder on each Ray
    worker (every row then quarantined as missing, or the wrong file read). A uri with a protocol
    or an absolute path is kept."""
    uris = pc.cast(uris, pa.string()).combine_chunks()
    absolute = pc.or_(pc.match_substring(uris, "://"), pc.match_substring_regex(uris, "^[/~]"))
    relative = pc.fill_null(pc.and_(pc.invert(absolute), pc.greater(pc.utf8_length(uris), 0)), False)
    if not pc.any(relative).as_py():
        return uris  # the usual case, checked in Arrow: a 100M-row manifest is not looped over in Python
    return pa.array([fs.unstrip_protocol(posixpath.normpath(posixpath.join(base, u))) if rel else u
                     for u, rel in zip(uris.to_pylist(), relative.to_pylist())], pa.string())


def check_ids(path: str, ids: pa.ChunkedArray) -> None:
    """Every row needs its own id: matches, quarantine and the report name pictures by it. The
    message names the rows to fix (a 2B-row LAION manifest is not searched by hand)."""
    nulls = ids.null_count
    if nulls:
        rows = pc.indices_nonzero(pc.is_null(ids)).to_pylist()[:5]
        raise ManifestError(f"training manifest {path}: {nulls} row(s) have no id (null), rows {rows}"
                            f"{' ...' if nulls > 5 else ''}; give every row a unique string id")
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids).to_pylist()  # [{values, counts}], one per distinct id
        twice = sorted((c for c in counts if c["counts"] > 1), key=lambda c: -c["counts"])
        named = ", ".join(f"{c['values']!r} x{c['counts']}" for c in twice[:5])
        raise ManifestError(f"training manifest {path}: ids are not unique ({len(twice)} id(s) on several rows: "
                            f"{named}{' ...' if len(twice) > 5 else ''}); a duplicated picture is several rows "
                            "with different ids")


def load_image(row: dict, size: int | None = None, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Decode one manifest row to uint8 HxWx3 RGB, resized to size x size (bicubic) when given."""
    data = row.get("image")
    try:
        if not data:  # null or empty bytes: the uri, as the index reads the row (ingest._decode)
            if not row.get("uri"):
                raise ManifestError(f"image {row['id']!r} has neither image bytes nor a uri")
            try:
                data = read_uri(row["uri"], storage_options or {})
            except Exception as e:  # the store's (botocore's own errors are not OSError): named with its uri
                if not store_failure(e):
                    raise
                raise ManifestError(f"image {row['id']!r}: cannot read {redact_urls(row['uri'])}: "
                                    f"{type(e).__name__}: {e}. Rerun once the store answers, or check read "
                                    "access and storage options") from e
        img = decode(data)
    except ImportError as e:  # fsspec's "Please install gcsfs to access Google Storage"
        raise ManifestError(f"image {row['id']!r} at {row.get('uri')} needs a package that is not installed: "
                            f"{e}") from e
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:  # the bomb: > ~179 Mpx
        raise ManifestError(f"image {row['id']!r} cannot be decoded: {type(e).__name__}: {e}") from e
    return resize(img, size)


def expand_duplicates(table: pa.Table, schedule: list[DuplicationGroup], seed: int = 0) -> pa.Table:
    """One row per training example: scheduled images repeated, the rest once.

    Copies keep the source row's columns; copy k > 0 gets id "<id>#<k>". Added columns:
    source_id (the original id) and copies (how many rows that image has).
    """
    made = [c for c in ("source_id", "copies") if c in table.column_names]
    if made:  # an expanded manifest (a model's training_manifest.parquet): its copies are already rows
        raise ManifestError(f"the training manifest has {' and '.join(made)} columns: it is a manifest `memex train` "
                            "expanded (a model's training_manifest.parquet), whose copies would each count as an image "
                            "of their own and be duplicated again; train on its source manifest (data.path), or drop "
                            "its copy rows (ids with #<k>) and those columns")
    ids = table["id"].to_pylist()
    copies = {i: 1 for i in ids}
    free = [i for i in ids]
    random.Random(seed).shuffle(free)
    # every id a group names is kept from the random picks of the groups before it: a pick of one
    # failed as "ids in two groups", which the schedule never said, for some seeds and not others
    named = {i for g in schedule for i in g.ids}
    free = [i for i in free if i not in named]
    scheduled: set[str] = set()  # ids a group already gave copies to
    for g in schedule:
        if g.copies < 1:
            raise ManifestError(f"duplication copies must be >= 1, got {g.copies}")
        if g.count < 0:  # free[:-n] would silently take all but n images
            raise ManifestError(f"duplication count must be >= 0, got {g.count}")
        unknown = [i for i in g.ids if i not in copies]
        if unknown:
            raise ManifestError(f"duplication ids not in the manifest: {unknown[:5]}")
        seen: dict[str, int] = {}  # (list.count per id, and a set rebuilt per free id below, were quadratic:
        for i in g.ids:  # a group naming thousands of ids over a large manifest took minutes)
            seen[i] = seen.get(i, 0) + 1
        twice = sorted({i for i, n in seen.items() if i in scheduled or n > 1})
        if twice:  # a later group would silently overwrite the earlier group's copies
            raise ManifestError(f"duplication ids in two groups (or twice in one): {twice[:5]}; "
                                "each image gets one number of copies")
        chosen = list(g.ids)
        free = [i for i in free if i not in seen]
        if g.count > len(free):
            raise ManifestError(f"duplication asks for {g.count} more images but only {len(free)} are left")
        chosen += free[: g.count]
        free = free[g.count :]
        for i in chosen:
            copies[i] = g.copies
        scheduled.update(chosen)
    take, new_ids, src = [], [], []
    for row, i in enumerate(ids):
        for k in range(copies[i]):
            take.append(row)
            new_ids.append(i if k == 0 else f"{i}#{k}")
            src.append(i)
    hashed = {i for i in ids if "#" in i}  # copy k of <id> is named <id>#k: a row already named so is another
    taken = sorted(hashed.intersection(n for n, s in zip(new_ids, src) if n != s)) if hashed else []
    if taken:
        raise ManifestError(f"ids {taken[:5]} are the names the duplication schedule gives copies (<id>#<k>), and "
                            "the manifest has rows of its own by those names: rename them (no '#' in an id)")
    out = take_rows(table, take)  # (copies of 32 images can pass 2 GiB)
    out = out.set_column(out.column_names.index("id"), "id", pa.array(new_ids, pa.string()))
    n = pa.array([copies[i] for i in src], pa.int32())
    return out.append_column("source_id", pa.array(src, pa.string())).append_column("copies", n)
