"""Training-set ingestion for the audit: list the training images, then decode them batch by batch.

Two sources, on any fsspec URI (local path, s3://, memory://, ...):
  * a Parquet manifest (memex/manifest.py: id, image bytes or uri, optional caption);
  * a folder of images (.png .jpg .jpeg .webp .bmp .gif, searched recursively): id = path relative
    to the folder ("a/b.png"), uri = full URI with protocol, caption = the sidecar `<stem>.txt`
    beside the image when there is one, else null.
Which one a path is: it ends in `.parquet`, or it is a folder holding at least one `*.parquet`
file (at any depth) -> manifest; otherwise a folder of images. A folder mixing Parquet and other
files is ambiguous and fails, naming the first non-Parquet file (Arrow reads every file there).

Listing is cheap (no image is decoded). `decode_rows` never raises for a bad image: unreadable,
corrupt, truncated, missing, empty or oversized images (PIL's decompression-bomb limit) go to a
quarantine table with the reason, so one bad file out of millions does not stop an index build.
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memex.config import MemexError
from memex.images import decode, fit
from memex.layout import QUARANTINE_SCHEMA
from memex.manifest import ManifestError, read_manifest

__all__ = ["IMAGE_SUFFIXES", "QUARANTINE_SCHEMA", "TRAINING_SCHEMA", "DecodedBatch", "IngestError",
           "decode_rows", "iter_batches", "list_training_set"]

TRAINING_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("uri", pa.string()),
                             ("caption", pa.string())])
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class IngestError(MemexError, ValueError):
    """The training set is missing, unreachable, empty or malformed; the message names the path."""


@dataclass
class DecodedBatch:
    ids: list[str]  # rows that decoded, in input order
    images: np.ndarray | list[np.ndarray]  # uint8 (N, size, size, 3); a list of HxWx3 arrays when size is None
    quarantine: pa.Table  # QUARANTINE_SCHEMA: id, uri, reason ("<ExceptionType>: <message>")


# ---- listing ------------------------------------------------------------------------------
def list_training_set(path: str, storage_options: dict[str, Any] | None = None,
                      caption_column: str = "caption") -> pa.Table:
    """The training set as a TRAINING_SCHEMA table (id, image, uri, caption), sorted by id.

    Extra manifest columns (source_id, copies, ...) are dropped; `caption_column` becomes
    `caption` (all null when the manifest has no such column).
    """
    opts = storage_options or {}
    try:
        fs, root = fsspec.core.url_to_fs(path, **opts)
        exists = fs.exists(root)
        is_dir = exists and fs.isdir(root)
        files = fs.find(root) if is_dir else []
    except Exception as e:  # noqa: BLE001 - bad credentials, unknown protocol, endpoint down
        raise IngestError(f"training set {path} cannot be reached: {type(e).__name__}: {e} "
                          "(check the URI and storage options / credentials)") from e
    if not exists:
        raise IngestError(f"training set {path} does not exist: "
                          "set trainset.path to a Parquet manifest or image folder")
    if root.endswith(".parquet") or any(f.endswith(".parquet") for f in files):
        return _from_manifest(path, opts, caption_column)
    if not is_dir:
        raise IngestError(f"training set {path} is a file but not a .parquet manifest: "
                          "give a Parquet manifest or a folder of images")
    return _from_folder(path, fs, root, files)


def _from_manifest(path: str, opts: dict[str, Any], caption_column: str) -> pa.Table:
    try:
        t = read_manifest(path, opts)
    except ManifestError as e:  # one error type for callers of this module; message already names the path
        raise IngestError(str(e)) from e
    n = t.num_rows

    def column(name: str, typ: pa.DataType) -> pa.Array:
        if name not in t.column_names:
            return pa.nulls(n, typ)
        return pc.cast(t[name], typ).combine_chunks()

    out = pa.table([t["id"].combine_chunks(), column("image", pa.binary()), column("uri", pa.string()),
                    column(caption_column, pa.string())], schema=TRAINING_SCHEMA)
    return out.sort_by("id")


def _from_folder(path: str, fs, root: str, files: list[str]) -> pa.Table:
    root = root.rstrip("/")
    images = sorted(f for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise IngestError(f"training set {path} holds no images ({' '.join(IMAGE_SUFFIXES)}) "
                          "and no .parquet manifest")
    sidecars = sorted({posixpath.splitext(f)[0] + ".txt" for f in images} & set(files))
    # read on threads: one round trip each on an object store. (fs.cat(list) would glob "[...]" in names.)
    with ThreadPoolExecutor(8) as pool:
        texts = dict(zip(sidecars, pool.map(fs.cat_file, sidecars)))

    def caption(f: str) -> str | None:
        data = texts.get(posixpath.splitext(f)[0] + ".txt")
        return None if data is None else data.decode("utf-8", errors="replace").strip()

    ids = [f[len(root) + 1:] for f in images]
    out = pa.table({"id": ids, "image": pa.nulls(len(images), pa.binary()),
                    "uri": [fs.unstrip_protocol(f) for f in images], "caption": [caption(f) for f in images]},
                   schema=TRAINING_SCHEMA)
    return out.sort_by("id")


def iter_batches(table: pa.Table, batch_rows: int) -> Iterator[pa.Table]:
    """Consecutive row slices of at most batch_rows rows (zero-copy)."""
    if batch_rows < 1:
        raise IngestError(f"batch_rows must be >= 1, got {batch_rows}")
    for start in range(0, table.num_rows, batch_rows):
        yield table.slice(start, batch_rows)


# ---- decoding -----------------------------------------------------------------------------
def _decode(row: dict, size: int | None, opts: dict[str, Any], preprocess: str) -> np.ndarray:
    data = row.get("image")
    if not data:
        if not row.get("uri"):
            raise IngestError("row has neither image bytes nor a uri")
        with fsspec.open(row["uri"], "rb", **opts) as f:
            data = f.read()
        if not data:
            raise IngestError(f"{row['uri']} is an empty file")
    # raises DecompressionBombError (too many pixels), UnidentifiedImageError with a reproducible
    # message, OSError (truncated): decode_rows turns each into a quarantine reason
    return decode(data) if size is None else fit(decode(data), size, preprocess)


def decode_rows(rows: pa.Table, size: int | None, storage_options: dict[str, Any] | None = None,
                workers: int = 8, preprocess: str = "center_crop") -> DecodedBatch:
    """Decode rows (columns id and image and/or uri) to RGB uint8: size x size (images.fit with
    `preprocess`: centre-cropped square, bicubic-resized), or as stored when size is None.

    Never raises for a bad image: it goes to `quarantine` and is skipped. Rows are fetched and
    decoded on `workers` threads (remote reads dominate on object stores; PIL releases the GIL
    while decoding), and the output keeps the input order.
    """
    opts = storage_options or {}
    records = rows.select([c for c in ("id", "image", "uri") if c in rows.column_names]).to_pylist()

    def one(row: dict) -> np.ndarray | str:
        try:
            return _decode(row, size, opts, preprocess)
        except Exception as e:  # noqa: BLE001 - any failure of one image quarantines that image only
            return f"{type(e).__name__}: {e}"

    if workers > 1 and len(records) > 1:
        with ThreadPoolExecutor(min(workers, len(records))) as pool:
            results = list(pool.map(one, records))
    else:
        results = [one(r) for r in records]

    ids, images, bad = [], [], []
    for row, res in zip(records, results):
        if isinstance(res, str):
            bad.append({"id": row["id"], "uri": row.get("uri"), "reason": res})
        else:
            ids.append(row["id"])
            images.append(res)
    if size is not None:
        images = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return DecodedBatch(ids, images, pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA))
