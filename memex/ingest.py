"""Training-set ingestion for the audit: list the training images, then decode them batch by batch.

Four sources, on any fsspec URI (local path, s3://, memory://, ...):
  * a Parquet manifest (memex/manifest.py: id, image bytes or uri, optional caption);
  * a Hugging Face datasets folder (`Dataset.save_to_disk`: Arrow files + state.json), read as one;
  * a folder of WebDataset .tar shards (LAION's layout, memex/shards.py), or a pattern naming some
    (laion/{00000..00099}.tar, laion/0000*.tar): id = "<shard>/<member>",
    uri = `tar://<member>::<shard uri>`, caption = the sample's .txt member;
  * a folder of images (IMAGE_SUFFIXES, searched recursively; hidden and tool files are skipped,
    shards.is_hidden): id = path relative to the folder ("a/b.png"), uri = full URI with protocol,
    caption = the image's row of a Hugging Face imagefolder `metadata.jsonl` / `metadata.csv`
    (file_name + the caption column, what diffusers' fine-tuning scripts read), else the sidecar
    `<stem>.txt` beside it, else null.
img2dataset's own layouts: its webdataset output is the shards above; its default output (files:
<shard>/<key>.jpg + <key>.txt, a metadata .parquet per shard) an image folder; its parquet output
(key, jpg) a manifest.
Which one a path is: a folder with datasets' state.json (or dataset_dict.json, refused naming its
splits) -> a datasets folder; a folder holding a `.tar` (at any depth) -> shards (img2dataset's metadata
.parquet beside them is not read); a folder of images whose .parquet files are img2dataset's
metadata -> its files output, an image folder; it ends in `.parquet`, or it is a folder holding at
least one `*.parquet` file -> manifest (its Parquet parts only: the images its relative uris name
may lie beside them); otherwise a folder of images. A path that does not exist but holds a
wildcard is a pattern of shards.

Listing decodes no image (a WebDataset shard is read whole to list it: once per shard version
with a `shard_cache`, the index's), and it stamps each image file (column `stamp`: size +
ETag where the store gives one, else size + mtime), so the index key (memex/stages/index.py)
changes when a file is overwritten in place; image bytes embedded in a manifest are hashed there,
or, for the index (`images=False`), as a manifest (Parquet, or a datasets folder's Arrow files) is
read a batch at a time, and `iter_train_rows` reads them again into the index's train.pack:
the driver never holds them. Such a listing is in the manifest's own row order (file names, then
rows), not sorted by id.
`decode_rows` never raises for a bad image: unreadable,
corrupt, truncated, missing, empty or oversized images (PIL's decompression-bomb limit), and those
in a mode or sample range with no display conversion (images.decode: "UnsupportedImageError: mode
'LAB' ..."), go to a quarantine table with the reason, so one bad file out of millions does not
stop an index build. A store that fails a read (anything but a missing file, on s3/gs/local/...:
an outage, expired credentials) raises FetchError instead: the unit is retried, where a
quarantined row was left out of the index for good. http(s) uris (the open web) are quarantined.
"""

from __future__ import annotations

import csv
import ctypes
import functools
import hashlib
import io
import json
import os
import posixpath
import re
import stat
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from memex.config import MemexError
from memex.images import decode, decode_fit, decoded_pixels, fit_pixels
from memex.layout import QUARANTINE_SCHEMA, SHARD_LISTINGS
from memex.manifest import (
    HF_DICT,
    HF_STATE,
    ManifestError,
    check_ids,
    first_caption,
    is_img2dataset_metadata_file,
    is_img2dataset_parquet,
    iter_manifest,
    manifest_sources,
    missing_columns,
    no_lone_surrogates,
    part_columns,
    read_manifest,
    take_rows,
)
from memex.redact import redact_urls
from memex.shards import (
    ShardPatternError,
    ShardSampleError,
    caption_text,
    expand_shards,
    is_hidden,
    is_pattern,
    member_uri,
    pattern_root,
    read_uri,
    shard_samples,
    split_member_uri,
    store_failure,
)
from memex.storage import StorageError, Store

__all__ = ["IMAGE_SUFFIXES", "QUARANTINE_SCHEMA", "TRAINING_SCHEMA", "DecodedBatch", "FetchError", "IngestError",
           "decode_rows", "iter_batches", "list_training_set"]
# a streamed manifest's listing (list_training_set(images=False)): each row's sha256 of its image
# bytes (of b"" for none), in place of the bytes, which stay in the manifest (iter_train_rows)
IMAGE_SHA256 = "image_sha256"

TRAINING_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("uri", pa.string()),
                             ("caption", pa.string()),
                             ("stamp", pa.string())])  # file version of a uri row (_stamp); null: bytes/missing
# what images.decode reads, the one list of them (image folders, WebDataset fields, the audit's preflight):
# .jfif/.jpe are JPEG, .apng PNG, .pbm/.pgm/.ppm/.pnm Netpbm, .avif AVIF (Pillow >= 11.2's wheels); each of
# these was left out of a listing without a word. Pillow reads more (.jp2, .qoi, .tga, .ico, .psd, ...), not
# listed: formats of icons and layers, not of training images
IMAGE_SUFFIXES = (".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".avif", ".bmp", ".gif", ".tif",
                  ".tiff", ".pbm", ".pgm", ".ppm", ".pnm")
# files only memex writes (a stage's completion marker, a run or index folder's lease): memex/storage.py, lease.py
MEMEX_MARKERS = ("_SUCCESS.json", "_lease.json")
# Hugging Face's imagefolder: captions (and other columns) per file_name, beside the images
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class IngestError(MemexError, ValueError):
    """The training set is missing, unreachable, empty or malformed; the message names the path."""


WEB = ("http://", "https://")
WEB_PROTOCOLS = ("http", "https")  # fsspec's split_protocol of a WEB uri


class FetchError(IngestError):
    """A training image's bytes could not be read from a store memex is pointed at (a connection reset,
    throttling, expired credentials, a refused read): an outage, not a bad image. It fails the unit,
    which is left unmarked and retried, where a quarantine row would have left the image out of an
    index every later audit reuses."""


@dataclass
class DecodedBatch:
    ids: list[str]  # rows that decoded, in input order
    images: np.ndarray | list[np.ndarray]  # uint8 (N, size, size, 3); a list of HxWx3 arrays when size is None
    quarantine: pa.Table  # QUARANTINE_SCHEMA: id, uri, reason ("<ExceptionType>: <message>")


# ---- listing ------------------------------------------------------------------------------
def list_training_set(path: str, storage_options: dict[str, Any] | None = None,
                      caption_column: str = "caption", key: str = "trainset.path", images: bool = True,
                      shard_cache: Store | None = None) -> pa.Table:
    """The training set as a TRAINING_SCHEMA table (id, image, uri, caption, stamp), sorted by id
    (images=False: see below).

    Extra manifest columns (source_id, copies, ...) are dropped; `caption_column` becomes
    `caption` (all null when the manifest has no such column). `stamp`: the version of each
    uri row's file (size + ETag or mtime), null for rows with image bytes, for missing files and for
    http(s) images (_uri_stamps).
    `key`: the setting `path` came from, which errors name (memex mia reads members.path, ...).
    `images=False` (the index): a manifest of embedded images (Parquet, or a datasets folder) is
    read a batch at a time, and its listing holds each image's sha256 (column IMAGE_SHA256), not
    its bytes, in the manifest's row order (`iter_train_rows` reads the bytes again in that order when the index
    writes train.pack; sorting by id would need them all at once).
    `shard_cache`: where each WebDataset shard's members and captions are kept, by the shard's URI and
    version (size + ETag/mtime): listing a shard reads all of it (its captions lie between the
    images), so without it every audit downloaded the whole set again (200 GB a night per checkpoint).
    """
    opts = storage_options or {}
    try:
        fs, root = fsspec.core.url_to_fs(path, **opts)
        fs.invalidate_cache(root)  # s3fs & co cache listings per instance: a stale one would give stale stamps
        exists = fs.exists(root)
        is_dir = exists and fs.isdir(root)
        # one recursive listing with details: sizes and mtimes/ETags of every file at no extra request
        files = fs.find(root, detail=True) if is_dir else {}
        if any(i.get("islink") for i in files.values()):  # a local folder of symlinks (DVC, git-annex, a pool)
            files = _through_links(files, root)
    except Exception as e:  # noqa: BLE001 - bad credentials, unknown protocol, endpoint down
        raise IngestError(f"{key}={path} cannot be reached: {type(e).__name__}: {e} "
                          "(check the URI and storage options / credentials)") from e
    if not exists and is_pattern(root):  # WebDataset's laion/{00000..00099}.tar, or a glob
        return _from_pattern(path, fs, root, key, shard_cache)
    if not exists:
        raise IngestError(f"{key}={path} does not exist: give a Parquet manifest or a folder of images")
    # min, not sorted(): one pass over a listing that may hold millions of files, the same file named
    ours = min((f for f in files if posixpath.basename(f) in MEMEX_MARKERS), default=None)
    if ours:  # left by a storage.root inside the training set (storage.check_outside refuses one now)
        top = posixpath.relpath(ours, root.rstrip("/")).split("/")[0]
        where = root if top == posixpath.basename(ours) else posixpath.join(root.rstrip("/"), top)
        raise IngestError(f"{key}={path} holds memex's own outputs under {where} (a storage.root that was inside "
                          "the training set): move that folder out of it")
    # hidden and tools' files are no training images (.ipynb_checkpoints/a-checkpoint.jpg: a near-duplicate of
    # a.jpg; macOS's ._a.jpg and __MACOSX/: AppleDouble metadata, quarantined as unreadable): parts below root only
    files = {f: i for f, i in files.items() if not is_hidden(f[len(root.rstrip("/")) + 1:])}
    top = {posixpath.basename(f) for f in files if posixpath.dirname(f) == root.rstrip("/")}
    if HF_STATE in top or HF_DICT in top:  # datasets' save_to_disk (its Arrow files are the manifest)
        return _from_manifest(path, opts, caption_column, key, images)
    if not is_dir and root.endswith(".arrow"):
        raise IngestError(f"{key}={path} is one Arrow file: give the folder Dataset.save_to_disk wrote "
                          f"({posixpath.dirname(path) or '.'}), whose state.json lists its files")
    if not is_dir and root.endswith(".tar"):  # one WebDataset shard: read as a folder holding only it
        return _from_shards(path, fs, posixpath.dirname(root), {root: fs.info(root)}, key, shard_cache)
    if any(f.endswith(".tar") for f in files):  # WebDataset shards (their img2dataset .parquet is metadata)
        loose = min((f for f in files if f.lower().endswith(IMAGE_SUFFIXES)), default=None)
        if loose:  # which is the training set is not ours to guess
            raise IngestError(f"{key}={path} holds both .tar shards and image files ({loose}): give a folder of "
                              "WebDataset shards or a folder of images")
        if manifest := _manifest_beside_shards(fs, files):  # was ignored: every shard image listed, raw captions
            raise IngestError(f"{key}={path} holds both .tar shards and a Parquet file that is not img2dataset's "
                              f"metadata ({fs.unstrip_protocol(manifest)}): which is the training set is not ours to "
                              f"guess. Set {key}={fs.unstrip_protocol(manifest)} if it lists the images trained on "
                              "(the shards' members as its uris), else move it out of the shards' folder")
        return _from_shards(path, fs, root, files, key, shard_cache)
    parquet = root if root.endswith(".parquet") else min((f for f in files if f.endswith(".parquet")), default=None)
    if parquet and is_dir and _img2dataset_files(fs, parquet, files):  # its default output_format=files
        return _from_folder(path, fs, root, files, key, caption_column,
                            _img2dataset_captions(fs, files, caption_column), shard_cache)
    if parquet:
        return _from_manifest(path, opts, caption_column, key, images)
    if not is_dir:
        raise IngestError(f"{key}={path} is a file but not a .parquet manifest or a .tar shard: "
                          "give a Parquet manifest, a folder of images or WebDataset .tar shards")
    return _from_folder(path, fs, root, files, key, caption_column, cache=shard_cache)


def _from_manifest(path: str, opts: dict[str, Any], caption_column: str, key: str, images: bool = True) -> pa.Table:
    if not images:
        listing = _streamed_listing(path, opts, caption_column, key)
        if listing is not None:
            return listing
    try:
        t = read_manifest(path, opts)
    except ManifestError as e:  # one error type for callers of this module; message already names the path
        raise IngestError(str(e)) from e

    # Memory: a manifest with embedded images is held once as read, and once more only where its rows
    # are not sorted by id (the sort's copy). Nothing else copies the image column, and no image
    # becomes a Python object (bench/RESULTS.md, manifest memory: it was ~5x the image bytes).
    image = _column(t, "image", pa.binary(), "encoded image bytes", path, key, caption_column)
    has_bytes = pc.fill_null(pc.greater(pc.binary_length(image), 0), False)
    out = _stamped(_listing(t, image, path, key, caption_column), has_bytes, opts)
    t = None  # the manifest's other columns (img2dataset's url, status, ...) are not kept
    order = pc.sort_indices(out["id"])
    if not in_order(order):
        out = take_rows(out, order)  # else already in id order (a manifest written sorted): no copy
    # Arrow's allocator keeps what the Parquet reader freed (~1-3x the image bytes) for reuse; the
    # driver holds the listing for the whole index stage, so that is handed back now
    pa.default_memory_pool().release_unused()
    return out


def _column(t: pa.Table, name: str, typ: pa.DataType, what: str, path: str, key: str,
            caption_column: str) -> pa.ChunkedArray:
    """Column `name` of manifest rows as `typ` (nulls when absent); a list caption gives its first."""
    if name not in t.column_names:
        return pa.chunked_array([pa.nulls(t.num_rows, typ)])
    col = t[name]
    if name == caption_column and (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        # several captions an image (COCO-style): its first one is its caption, as a prompt and in reports
        col = pa.chunked_array([pa.array([first_caption(v) for v in col.to_pylist()], pa.string())])
    if col.type == typ:
        return col
    try:
        return pc.cast(col, typ)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as e:  # Arrow's own words name neither
        raise IngestError(f"{key}={path}: column {name!r} holds {col.type}, not {typ} ({what})") from e


def _listing(t: pa.Table, image: pa.ChunkedArray, path: str, key: str, caption_column: str) -> pa.Table:
    """TRAINING_SCHEMA rows of normalized manifest rows `t` whose image column is `image` (bytes,
    or nulls for a streamed listing), their stamps not yet made (`_stamped`)."""
    uri = _column(t, "uri", pa.string(), "a file uri per row", path, key, caption_column)
    caption = _column(t, caption_column, pa.string(), f"set {key.rsplit('.', 1)[0]}.caption_column to a text column",
                      path, key, caption_column)
    return pa.table([t["id"], image, uri, caption, pa.nulls(t.num_rows, pa.string())], schema=TRAINING_SCHEMA)


def _stamped(listing: pa.Table, has_bytes: pa.ChunkedArray, opts: dict[str, Any]) -> pa.Table:
    """The listing with its uri rows' files stamped (rows with bytes: _decode reads those), in one
    pass over the whole: `_uri_stamps` lists each folder once."""
    by_uri = pc.if_else(has_bytes, pa.scalar(None, pa.string()), listing["uri"]).to_pylist()
    return listing.set_column(listing.column_names.index("stamp"), "stamp",
                              pa.array(_uri_stamps(by_uri, opts), pa.string()))


def in_order(order: pa.Array) -> bool:
    return pc.all(pc.equal(order, pa.array(np.arange(len(order), dtype=np.uint64)))).as_py() is not False


def image_bytes(images: pa.ChunkedArray) -> Iterator[memoryview | bytes]:
    """Each row's bytes as a memoryview into Arrow's buffer (b"" for null): no Python copy of a
    manifest's images, which may be most of the driver's memory (to_pylist() copied them all)."""
    for chunk in images.chunks:
        if chunk.type != pa.binary():
            chunk = chunk.cast(pa.binary())
        if len(chunk) == 0:
            continue
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, np.int32, len(chunk) + 1, chunk.offset * 4)
        data = memoryview(data_buf) if data_buf is not None else memoryview(b"")
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        for i in range(len(chunk)):
            yield data[offsets[i]:offsets[i + 1]] if valid[i] else b""


EMPTY_SHA256 = hashlib.sha256(b"").digest()  # a row without image bytes (null or empty)


def image_digests(image: pa.ChunkedArray) -> pa.Array:
    """sha256 of each row's image bytes (EMPTY_SHA256 for none): the index key hashes these."""
    return pa.array([hashlib.sha256(b).digest() for b in image_bytes(image)], pa.binary())


def _streamed_listing(path: str, opts: dict[str, Any], caption_column: str, key: str) -> pa.Table | None:
    """The listing of a manifest with embedded images (Parquet, or a datasets folder), read
    `iter_manifest` batch by batch: ids, uris, captions and each image's sha256 (IMAGE_SHA256), no
    bytes held, in the manifest's row order. A 1M-image LAION part of ~40 GB was read whole onto the driver, and
    img2dataset writes its rows in the order downloads finish, so sorting them by id would hold
    them all again: the index's gids follow this order instead (its key does not: index_key sorts
    by id first). None where the manifest is not such one: the whole read names what is wrong."""
    try:
        fs, _, _, source, arrow = manifest_sources(path, opts)
        names = part_columns(path, fs, source, arrow)  # every part's: a part with other columns is named here
    except ManifestError as e:
        raise IngestError(str(e)) from e
    except Exception:  # noqa: BLE001 - the whole read raises it, naming the file
        return None
    if is_img2dataset_parquet(names):
        names = [{"key": "id", "jpg": "image"}.get(c, c) for c in names]
    if "image" not in names or missing_columns(names, hf=arrow):
        return None  # a manifest of uris (no image bytes to stream), or one the whole read refuses
    parts: list[pa.Table] = []
    try:
        for t in iter_manifest(path, opts):
            image = _column(t, "image", pa.binary(), "encoded image bytes", path, key, caption_column)
            listing = _listing(t, pa.chunked_array([pa.nulls(t.num_rows, pa.binary())]), path, key, caption_column)
            # a copy of the small columns: an Arrow stream's batch is one buffer, images included, and
            # its id column, kept as it is, kept the images too (663 MB held for a 543 MB folder)
            listing = listing.take(pa.array(np.arange(listing.num_rows)))
            parts.append(listing.append_column(IMAGE_SHA256, image_digests(image)))
    except ManifestError as e:
        raise IngestError(str(e)) from e
    except IngestError:
        raise
    except (pa.ArrowInvalid, KeyError, ValueError):
        return None  # a batch Arrow cannot take as manifest rows: the whole read names the problem
    if not parts:
        return None  # no row (or no image at all): the whole read names which
    out = pa.concat_tables(parts)
    try:
        check_ids(path, out["id"])
    except ManifestError as e:
        raise IngestError(str(e)) from e
    return _stamped(out, pc.not_equal(out[IMAGE_SHA256], pa.scalar(EMPTY_SHA256, pa.binary())), opts)


def iter_train_rows(path: str, opts: dict[str, Any], listing: pa.Table, batch_rows: int = 256) -> Iterator[pa.Table]:
    """A streamed listing's rows with their images read again from the manifest, `batch_rows` at a
    time: (gid, id, image, uri, caption) batches of the index's copy (memex/train_rows.py), gid = the row's place in the
    listing (the manifest's order). A manifest changed since it was listed (another row, other
    bytes) raises: the index key was made from the listing."""
    gid = 0
    for t in iter_manifest(path, opts, batch_rows):
        want = listing.slice(gid, t.num_rows)
        image = _column(t, "image", pa.binary(), "encoded image bytes", path, "trainset.path", "")
        if want.num_rows != t.num_rows or not want["id"].equals(t["id"]) or \
                not image_digests(image).equals(want[IMAGE_SHA256].combine_chunks()):
            raise IngestError(f"trainset.path={path} changed while the index read it (rows from {gid} on differ "
                              "from its listing): run the audit again once it is written")
        yield pa.table({"gid": pa.array(np.arange(gid, gid + t.num_rows), pa.int64()), "id": want["id"],
                        "image": image, "uri": want["uri"], "caption": want["caption"]})
        gid += t.num_rows
    if gid != listing.num_rows:
        raise IngestError(f"trainset.path={path} changed while the index read it ({gid} rows, its listing has "
                          f"{listing.num_rows}): run the audit again once it is written")


def _through_links(files: dict[str, dict], root: str) -> dict[str, dict]:
    """A local listing (fsspec's find) with its symlinks followed: fsspec lists a linked folder as one entry of
    type "other" and does not descend (its images were left out, silently), and a linked file with its target's
    size but the link's mtime (_stamp follows it). Each linked folder outside `root` has its files listed under
    the link's path, as if they were there, once; a link to a folder inside `root` (latest -> v3, a link to an
    ancestor inside it) is skipped, as before: its files are listed under their own paths. So is a link to `root`'s
    own ancestor (parent -> ..): it walked the ancestor's other folders (a held-out set beside train/) into the
    training images."""
    top = os.path.realpath(root)
    out, seen = {}, set()
    for name, info in files.items():
        if not (info.get("islink") and os.path.isdir(name)):
            out[name] = info
            continue
        for d, dirs, names in os.walk(name, followlinks=True):
            real = os.path.realpath(d)
            if (real in seen or real == top or real.startswith(top.rstrip("/") + "/")
                    or top.startswith(real.rstrip("/") + "/")):  # root's ancestor (or "/")
                dirs[:] = []
                continue
            seen.add(real)
            for n in names:
                path = posixpath.join(d, n)
                try:
                    st = os.stat(path)
                except OSError:  # a dangling link: no file (the folder's own dangling links are listed as they are)
                    continue
                if stat.S_ISREG(st.st_mode):
                    out[path] = {"name": path, "size": st.st_size, "type": "file", "mtime": st.st_mtime, "islink": True}
    return out


def _stamp(info: dict) -> str:
    """A file's version from its fsspec listing entry: size + ETag (S3, GCS, Azure: changes with
    the content) where the store gives one, else size + modification time (local "mtime", s3
    "LastModified", memory "created"), else size + a content id (hf://'s "blob_id"), else the size alone.
    A local symlink's is its target's: the link's own mtime stayed the same when the file it points at was
    written over (a shared image pool), and the old index was reused."""
    if info.get("islink") and info.get("name"):
        try:  # the later of the link's and its target's: a link made after its target (DVC, git-annex: the
            # usual case) keeps the stamp it had, and so its index key; a target written since changes it
            st = os.stat(info["name"])
            info = {**info, "size": st.st_size, "mtime": max(st.st_mtime, info.get("mtime") or 0)}
        except OSError:  # dangling: as listed (the decoder quarantines it)
            pass
    for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(k) is not None:
            return f"{info.get('size')} {k}={info[k]}"
    # after those, so no file that has one is stamped otherwise (its index key stays the same): Hugging Face's
    # hf:// gives none of them but its blob's git id (an LFS file's pointer holds the content's sha256), its LFS
    # sha256, its last commit. By size alone a tar shard rewritten in place (tar pads to 10,240-byte records)
    # kept its stamp, and so its kept listing and its index
    for k, field in (("blob_id", None), ("lfs", "sha256"), ("last_commit", "oid")):
        v = info.get(k)
        if field is not None and v is not None:  # huggingface_hub's BlobLfsInfo, LastCommitInfo: dicts, or not
            v = v.get(field) if isinstance(v, dict) else getattr(v, field, None)
        if v is not None:
            return f"{info.get('size')} {k}={v}"
    return f"{info.get('size')}"


# a parent folder with fewer uris than this is stamped with one info() per file rather than a
# listing of the whole folder (which may hold millions of files the manifest does not name)
_LS_MIN_URIS = 8


def _uri_stamps(uris: list[str | None], opts: dict[str, Any]) -> list[str | None]:
    """_stamp of each uri's file (None: no uri, or no such file: the decoder quarantines it).

    Batched by parent folder: one `ls(detail=True)` per folder, on 16 threads. Magnitude, for a
    LAION-style manifest of 1M uris in img2dataset folders of 10k files on S3: 100 folders x 10
    LIST pages = ~1k requests (seconds), against 1M HEAD requests for one `info()` per file
    (~10-40 min at 8-32 requests in flight). Folders with < _LS_MIN_URIS of the uris use info().

    An http(s) image (LAION's url column as the uri) is left unstamped (None): a web server lists no
    folders (most answer 403, which failed the whole listing, where a dead link is quarantined at its
    decode), and one HEAD per image every audit was 1M requests to other people's hosts for 1M URLs.
    The index key still hashes each URL, so what is lost is noticing a changed picture at the same URL:
    the index built from its earlier picture is reused. The right trade: a web image is seldom replaced
    at its URL (a new one gets a new URL), and telling would cost a request an image an audit.
    A tar shard on the web (an http(s) uri's member) is still stamped, one HEAD a shard (few), never
    listed: its version keys its members' offsets (row_bytes), which a rewritten shard moves.
    """
    out: list[str | None] = [None] * len(uris)
    filesystems: dict[str, Any] = {}
    groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for j, u in enumerate(uris):
        if not u:
            continue
        if split := split_member_uri(u):  # a shard's member: the shard's version (fsspec's tar:// filesystem,
            u = split[1]  # made for the first shard, stamped every row None: a shard overwritten in place kept its key)
        proto = fsspec.core.split_protocol(u)[0] or "file"
        if proto in WEB_PROTOCOLS and not split:  # see above: the URL itself is its key
            continue
        if proto not in filesystems:
            try:
                filesystems[proto] = fsspec.core.url_to_fs(u, **opts)[0]
            except ImportError as e:  # a package missing is this machine's fault, not the rows': every row would
                # be quarantined with the same ImportError, and the audit go on without them
                raise IngestError(f"training image uris such as {u} need a package that is not installed: {e} "
                                  "(install it here and in the workers' image, docker/Dockerfile)") from e
            except Exception:  # noqa: BLE001 - unknown protocol: unstamped, the decoder quarantines these rows
                filesystems[proto] = None
        fs = filesystems[proto]
        if fs is not None:
            p = fs._strip_protocol(u)
            groups.setdefault((proto, posixpath.dirname(p)), []).append((j, p))

    def info(fs, p: str) -> str | None:
        try:
            return _stamp(fs.info(p))
        except FileNotFoundError:
            return None

    def stamp_group(item) -> list[tuple[int, str | None]]:
        (proto, parent), members = item
        fs = filesystems[proto]
        fs.invalidate_cache(parent)  # a cached listing would give stale stamps
        paths = sorted({p for _, p in members})  # once each: a tar shard's thousands of members are one file
        if len(paths) < _LS_MIN_URIS or proto in WEB_PROTOCOLS:  # a web server lists no folders (403)
            got = {p: info(fs, p) for p in paths}
        else:
            try:
                entries = {e["name"].rstrip("/"): e for e in fs.ls(parent, detail=True)}
            except FileNotFoundError:
                return [(j, None) for j, _ in members]
            # a name the listing spells otherwise (./, //) is looked up on its own rather than guessed
            got = {p: _stamp(entries[p]) if p in entries else info(fs, p) for p in paths}
        return [(j, got[p]) for j, p in members]

    try:
        with ThreadPoolExecutor(16) as pool:
            for part in pool.map(stamp_group, groups.items()):
                for j, s in part:
                    out[j] = s
    except Exception as e:  # noqa: BLE001 - credentials, endpoint down: the listing fails, naming the cause
        raise IngestError(f"training images cannot be listed (for their sizes and versions): "
                          f"{type(e).__name__}: {e} (check the uris and storage options / credentials)") from e
    return out


def _manifest_beside_shards(fs, files: dict[str, dict]) -> str | None:
    """The first .parquet among .tar shards that is not img2dataset's metadata (a user's manifest), or None.
    img2dataset writes <shard>.parquet beside each <shard>.tar: those are taken as its metadata unread (a
    footer read each is ~10k requests an audit for a LAION part on S3); only the others' footers are read."""
    tars = {f[:-len(".tar")] for f in files if f.endswith(".tar")}
    return min((f for f in files if f.endswith(".parquet") and f[:-len(".parquet")] not in tars
                and not is_img2dataset_metadata_file(fs, f)), default=None)


def _img2dataset_files(fs, parquet: str, files: dict[str, dict]) -> bool:
    """img2dataset's default output (output_format=files): <shard>/<key>.jpg with <key>.txt (the
    caption, read as the image folder's sidecar) beside, and a metadata <shard>.parquet per shard
    holding no image. Told from a manifest with images beside it by that Parquet's schema."""
    return any(f.lower().endswith(IMAGE_SUFFIXES) for f in files) and is_img2dataset_metadata_file(fs, parquet)


def _img2dataset_captions(fs, files: dict[str, dict], caption_column: str) -> dict[str, Any]:
    """Image path stem (<folder>/<shard>/<key>) -> caption, from each shard's metadata .parquet: one
    read a shard (10k images) instead of a request per image for its <key>.txt. On object storage
    that is the listing's cost: ~1M sidecar GETs for a LAION part of 1M images."""
    out: dict[str, Any] = {}
    for parquet in sorted(f for f in files if f.endswith(".parquet")):
        try:
            t = pq.read_table(parquet, columns=["key", caption_column], filesystem=fs)
        except Exception:  # noqa: BLE001 - no such column, or not readable: the sidecar .txt files are read
            continue
        shard = posixpath.splitext(parquet)[0]
        for k, c in zip(t["key"].to_pylist(), t[caption_column].to_pylist()):
            out[f"{shard}/{k}"] = c
    return out


def pattern_shards(path: str, fs, pattern: str, key: str) -> dict[str, dict]:
    """Shard path -> info of the shards a pattern names (memex/shards.py: braces, then globs); the
    audit's preflight calls it too. A pattern of anything but .tar shards, or naming a missing
    shard, raises naming `key`."""
    if not pattern.endswith(".tar"):
        raise IngestError(f"{key}={path} does not exist; as a pattern, memex reads only WebDataset shards "
                          "(laion/{00000..00099}.tar, laion/0000*.tar): give a folder of images or a manifest whole")
    try:
        return expand_shards(fs, pattern)
    except ShardPatternError as e:
        raise IngestError(f"{key}={path} {e}") from e


def _from_pattern(path: str, fs, pattern: str, key: str, shard_cache: Store | None = None) -> pa.Table:
    """The shards a pattern names, ids relative to the folder above its first wildcard, as that
    folder given whole would give them."""
    return _from_shards(path, fs, pattern_root(pattern), pattern_shards(path, fs, pattern, key), key, shard_cache)


SHARD_LISTING_SCHEMA = pa.schema([("member", pa.string()), ("caption", pa.string())])  # what a listing is read as
# as written: each image member's data offset and size in the shard too, which its one sequential read sees for
# free, so that a member is later read by one ranged read without a scan of the shard's headers (~the whole
# shard through s3fs: shards.kept_offsets). A listing kept before has none: it lists as it did, and reads of its
# shard's members scan. Not in SHARD_LISTING_VERSION: raising it would read every shard of every set again
SHARD_LISTING_FILE_SCHEMA = pa.schema([("member", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),
                                       ("caption", pa.string())])
# in the name of each kept shard listing: raised when the rules of shards.shard_samples change, so a listing kept
# under the earlier ones (its name: the shard's URI and version only) is not served for an unchanged shard.
# 2: a sample's image is its member whose whole field is an image suffix (0001.depth.png was 0001's), several
# dotted image members of one key a row each, hidden members skipped, AVIF/Netpbm/APNG/.jpe fields listed
SHARD_LISTING_VERSION = 2


def shard_listing_name(tar_uri: str, stamp: str) -> str:
    """The file a shard's listing is kept in under the listings folder: by its URI, version (_stamp) and
    SHARD_LISTING_VERSION."""
    return hashlib.sha256(f"{tar_uri}\x1f{stamp}\x1fv{SHARD_LISTING_VERSION}".encode()).hexdigest()[:32] + ".parquet"


def index_listings(index_uri: str | None) -> str | None:
    """The shard listings folder of an index folder's URI (<root>/<key> -> <root>/_shard_listings, where
    stages/index.py keeps them), which the index's own rows (uris, no stamps) read tar members' offsets from."""
    if not index_uri or "/" not in index_uri:
        return None
    return posixpath.join(posixpath.dirname(index_uri.rstrip("/")), SHARD_LISTINGS)


def _from_shards(path: str, fs, root: str, files: dict[str, dict], key: str,
                 shard_cache: Store | None = None) -> pa.Table:
    """A folder of WebDataset tar shards (memex/shards.py): a row per image member, id
    "<shard>/<member>", its caption the sample's .txt, stamped with its shard's version. A shard
    whose version is in `shard_cache` is not read (see list_training_set)."""
    root = root.rstrip("/")
    tars = sorted(f for f in files if f.endswith(".tar"))
    check_utf8_names(tars, f"{key}={path}", "shard file name(s)", f"rename them to UTF-8 ({CONVMV} {path})")

    def samples(tar: str) -> list[tuple[str, str | None]]:
        stamp, cached = _stamp(files[tar]), None
        # a stamp of the size alone (a store that gives no version) is none: tar pads a shard to 10,240-byte
        # records, so one rewritten in place (other captions) kept its size, and its stale listing was served.
        # Read every time, as _sidecar_texts does
        if shard_cache is not None and "=" in stamp:
            cached = shard_cache.join(shard_listing_name(fs.unstrip_protocol(tar), stamp))
            try:
                if shard_cache.exists(cached):
                    t = shard_cache.read_table(cached, schema=SHARD_LISTING_SCHEMA)
                    # kept before captions lost their byte order mark: the same text as a fresh listing's
                    return [(m, None if c is None else caption_text(c))
                            for m, c in zip(t["member"].to_pylist(), t["caption"].to_pylist())]
            except StorageError:  # damaged (a partial copy): listed again below, and rewritten
                pass
        try:
            got = shard_samples(fs, tar, IMAGE_SUFFIXES)
        except ShardSampleError as e:  # a sample of two images: the shard's content, not the store's
            raise IngestError(f"{key}={path}: {e}") from e
        except (tarfile.TarError, EOFError) as e:  # the shard's bytes (read as an uncompressed stream, mode r|)
            raise IngestError(f"{key}={path}: shard {fs.unstrip_protocol(tar)} is not a readable tar "
                              f"({type(e).__name__}: {e}): download it again, or move it out") from e
        except Exception as e:  # the store's (a 503 after retries, a timeout, no read access): "move it out"
            # would have dropped a sound shard's images from the audit
            raise StorageError(f"{key}={path}: cannot read shard {fs.unstrip_protocol(tar)} ({type(e).__name__}: "
                               f"{e}): a storage problem, not a damaged shard; rerun to retry it, or check read "
                               "access and storage.options") from e
        # tarfile reads a name that is not UTF-8 (a Latin-1 tar) as surrogate escapes, which Arrow cannot hold
        check_utf8_names([m for m, *_ in got], f"{key}={path}: shard {fs.unstrip_protocol(tar)}",
                         "member name(s)", f"pack it again with UTF-8 names (extract it, {CONVMV} <that folder>, "
                         "tar it again)")
        if cached is not None:  # atomic: a killed write leaves no listing a later audit trusts
            shard_cache.write_table(cached, pa.table(dict(zip(("member", "caption", "offset", "size"), zip(*got))),
                                                     schema=SHARD_LISTING_FILE_SCHEMA) if got else
                                    SHARD_LISTING_FILE_SCHEMA.empty_table())
        return [(m, c) for m, c, *_ in got]

    with ThreadPoolExecutor(8) as pool:  # a sequential read of each shard, on threads
        found = list(pool.map(samples, tars))
    rows = [(f"{tar[len(root) + 1:]}/{member}", member_uri(member, fs.unstrip_protocol(tar)), caption,
             _stamp(files[tar])) for tar, got in zip(tars, found) for member, caption in got]
    if not rows:
        raise IngestError(f"{key}={path} holds .tar shards without image members ({' '.join(IMAGE_SUFFIXES)})")
    ids, uris, captions, stamps = (list(c) for c in zip(*rows))
    return pa.table({"id": ids, "image": pa.nulls(len(ids), pa.binary()), "uri": uris, "caption": captions,
                     "stamp": stamps}, schema=TRAINING_SCHEMA).sort_by("id")


def metadata_columns(fs, file: str) -> list[str]:
    """The columns of an imagefolder metadata file from its first row only (it may hold a row per
    training image): the audit's preflight asks whether its captions are there."""
    with fs.open(file, "rb") as f:
        line = next((ln for ln in (raw.decode("utf-8-sig", errors="replace").strip() for raw in f) if ln), "")
    try:
        return list(json.loads(line)) if file.endswith(".jsonl") else next(csv.reader([line]))
    except (json.JSONDecodeError, TypeError, StopIteration):
        return []


def read_folder_metadata(fs, file: str) -> list[dict]:
    """The rows of a Hugging Face imagefolder metadata file (metadata.jsonl: a JSON object a line;
    metadata.csv: a header row), each with a file_name relative to the file's folder."""
    text = fs.cat_file(file).decode("utf-8-sig", errors="replace")
    if file.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        rows = []
        # line ends only (\n, \r\n, \r; none can be raw inside a JSON string): str.splitlines also breaks at
        # U+2028/U+2029 and \x85, which JSON strings may hold raw (json.dumps(ensure_ascii=False) of a LAION
        # caption): the line was refused as "Unterminated string"
        for n, line in enumerate(re.split(r"\r\n?|\n", text), 1):
            if not line.strip():
                continue
            try:
                # a lone surrogate escape ("\ud83d": an emoji cut in half, common in scraped captions) as
                # U+FFFD, as in a prompt file: Arrow refused the whole listing with a bare UnicodeEncodeError
                rows.append(no_lone_surrogates(json.loads(line)))
            except json.JSONDecodeError as e:
                raise IngestError(f"{file} line {n} is not valid JSON: {e}") from e
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not r.get("file_name"):
            raise IngestError(f"{file} row {n} has no file_name: an imagefolder metadata file names each image's "
                              "file (relative to its folder) in file_name")
    return rows


def _from_folder(path: str, fs, root: str, files: dict[str, dict], key: str, caption_column: str,
                 by_stem: dict[str, Any] | None = None, cache: Store | None = None) -> pa.Table:
    """A folder of images; `by_stem`: captions already known by image path without extension
    (img2dataset's metadata), whose sidecar .txt files are then not read; `cache`: where the sidecars'
    texts are kept, a file per folder (_sidecar_texts)."""
    root = root.rstrip("/")
    images = sorted(f for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise IngestError(f"{key}={path} holds no images ({' '.join(IMAGE_SUFFIXES)}) "
                          "and no .parquet manifest")
    # before their sidecars' names (the same stems) are read or kept
    check_utf8_names(images, f"{key}={path}", "image file name(s)", f"rename them to UTF-8 ({CONVMV} {path})")
    metadata: dict[str, Any] = {}  # image file -> its metadata row's caption (None: the row has none)
    if by_stem:
        metadata = {f: by_stem.get(posixpath.splitext(f)[0]) for f in images}
    for m in sorted(f for f in files if posixpath.basename(f) in METADATA_FILES):
        for n, r in enumerate(read_folder_metadata(fs, m), 1):
            # several captions an image (a JSON list, COCO-style): the first, as for a manifest's list column
            # (its Python repr, "['a red cat', 'a cat']", was the prompt)
            text = first_caption(r.get(caption_column))
            if isinstance(text, dict):
                raise IngestError(f"{m} row {n}: {caption_column} is a JSON object, not a caption (text, or a list "
                                  "of texts): set trainset.caption_column to the field that holds the caption")
            metadata[posixpath.normpath(posixpath.join(posixpath.dirname(m), r["file_name"]))] = text
    sidecars = sorted({posixpath.splitext(f)[0] + ".txt" for f in images if metadata.get(f) is None} & set(files))
    texts = _sidecar_texts(fs, sidecars, files, cache)

    def caption(f: str) -> str | None:
        if metadata.get(f) is not None:
            return str(metadata[f]).strip()
        data = texts.get(posixpath.splitext(f)[0] + ".txt")
        return None if data is None else caption_text(data)

    ids = [f[len(root) + 1:] for f in images]
    out = pa.table({"id": ids, "image": pa.nulls(len(images), pa.binary()),
                    "uri": [fs.unstrip_protocol(f) for f in images], "caption": [caption(f) for f in images],
                    "stamp": [_stamp(files[f]) for f in images]},
                   schema=TRAINING_SCHEMA)
    return out.sort_by("id")


# renames a folder's Latin-1 file names (an old archive's, a Windows share's) to UTF-8, in place
CONVMV = "convmv -f latin1 -t utf-8 -r --notest"


def shown_name(name: str) -> str:
    """A file name as text any log or terminal holds: bytes that are not UTF-8 (Python's surrogate escapes of
    them, os.fsdecode) as \\xNN, "caf\\xe9.png"."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file system gives (not an escaped byte)
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def check_utf8_names(names: Sequence[str], where: str, what: str, fix: str) -> None:
    """Refuse file names that are not UTF-8 (a local file or a tar member named in Latin-1, read by Python as
    surrogate escapes): Arrow's string columns cannot hold them, and the index stopped with a bare
    UnicodeEncodeError naming no file. Names the first few, escaped (shown_name)."""
    bad = []
    for n in names:  # (~0.1 s for 1M names)
        try:
            n.encode("utf-8")
        except UnicodeEncodeError:
            bad.append(n)
    if bad:
        raise IngestError(f"{shown_name(where)}: {len(bad)} {what} are not UTF-8, which memex's tables cannot hold "
                          f"(e.g. {', '.join(shown_name(n) for n in bad[:3])}): {shown_name(fix)}")


SIDECAR_SCHEMA = pa.schema([("file", pa.string()), ("text", pa.binary())])


# a folder with fewer sidecars is read as before, a GET each: its kept file costs ~5 requests to find and read
# (~8 more to write), so a few captions gain nothing; img2dataset's folders hold 10,000
_KEEP_MIN_SIDECARS = 64


def _sidecar_texts(fs, sidecars: list[str], files: dict[str, dict], cache: Store | None) -> dict[str, bytes]:
    """Sidecar .txt path -> its bytes. Each folder's are kept in `cache` (the index's, beside the shard
    listings) under the hash of its sidecars' names and versions (size + ETag/mtime), so an audit reads a
    folder's captions in a few requests while none of them changed: the listing runs on every audit (every
    checkpoint of a nightly), and read one GET a file that was ~1M requests for a 1M-image S3 folder.
    A folder with a changed, added or removed sidecar is read again whole; one with fewer than
    _KEEP_MIN_SIDECARS, or on a store that gives no version (size alone would serve an edit of the same
    length from the kept file), is read every time."""
    by_dir: dict[str, list[str]] = {}
    for f in sidecars:
        by_dir.setdefault(posixpath.dirname(f), []).append(f)

    def kept_file(d: str, names: list[str]) -> str | None:
        stamps = [_stamp(files[n]) for n in names]
        if cache is None or len(names) < _KEEP_MIN_SIDECARS or not all("=" in st for st in stamps):
            return None
        sig = json.dumps([fs.unstrip_protocol(d), names, stamps])
        return cache.join(f"captions-{hashlib.sha256(sig.encode()).hexdigest()[:32]}.parquet")

    def look(item) -> tuple[list[str], str | None, dict | None]:
        d, names = item
        kept = kept_file(d, names)
        if kept is not None:
            try:
                if cache.exists(kept):
                    t = cache.read_table(kept, schema=SIDECAR_SCHEMA)
                    return names, kept, dict(zip(t["file"].to_pylist(), t["text"].to_pylist()))
            except StorageError:  # damaged (a partial copy): read again below, and rewritten
                pass
        return names, kept, None

    # on threads, as the GETs: one round trip each on an object store. (fs.cat(list) would glob "[...]" in names.)
    with ThreadPoolExecutor(8) as pool:
        looked = list(pool.map(look, by_dir.items()))
        out: dict[str, bytes] = {}
        for _, _, got in looked:
            out.update(got or {})
        todo = [n for names, _, got in looked if got is None for n in names]
        out.update(zip(todo, pool.map(fs.cat_file, todo)))
        write = [(names, kept) for names, kept, got in looked if got is None and kept is not None]
        # atomic: a killed write leaves no file a later audit trusts
        list(pool.map(lambda w: cache.write_table(w[1], pa.table({"file": w[0], "text": pa.array(
            [out[n] for n in w[0]], pa.binary())})), write))
    return out


def iter_batches(table: pa.Table, batch_rows: int) -> Iterator[pa.Table]:
    """Consecutive row slices of at most batch_rows rows (zero-copy)."""
    if batch_rows < 1:
        raise IngestError(f"batch_rows must be >= 1, got {batch_rows}")
    for start in range(0, table.num_rows, batch_rows):
        yield table.slice(start, batch_rows)


# ---- decoding -----------------------------------------------------------------------------
# Why not reduce to `size` itself: the same picture stored at 1600 and at 400 px then decoded 1/8 and
# 1/4 (other box filters) was 0.065 RMS apart at 32 px, past index.dup_threshold = 0.05, against
# 0.003 from full decodes. Reduced no further than to 448 px (and 2 x size), the worst of such pairs
# (logos, photos, noise at 32 and 224 px) is within 0.0013 of full decodes' (bench/RESULTS.md).
DRAFT_MIN_SIDE = 448


# what a row's image is read from: `stamp` (a listing's) keys a tar member's shard offsets (row_bytes)
ROW_COLUMNS = ("id", "image", "uri", "stamp")


def row_bytes(row: dict, opts: dict[str, Any], version: str | None = None) -> bytes:
    """A row's encoded image: its bytes, or its uri's (raises IngestError naming the row's gap).
    `version`: the index's URI, for its rows (stages/index.py, match.py): it keys a tar member's shard
    offsets when the row has no `stamp` (the index's key hashes the listing's stamps), so a shard rewritten in
    place is looked up again, and it locates the index root's kept shard listings, whose offsets make a member
    one ranged read with no scan of its shard (index_listings, shards.kept_offsets)."""
    data = row.get("image")
    if not data:
        if not row.get("uri"):
            raise IngestError("row has neither image bytes nor a uri")
        try:
            key, listings = row.get("stamp") or version, index_listings(version)
            data = read_uri(row["uri"], opts, key, listings)
        except Exception as e:  # the store's I/O (shards.store_failure: fsspec's OSErrors, and botocore's own,
            # which s3fs lets through and which were quarantined for good, the index then built without them)
            # fails the unit; the row's own faults stay quarantined: a missing file, a uri no filesystem reads,
            # one botocore refuses as malformed (s3://bad bucket!/x), a damaged tar shard
            if row["uri"].startswith(WEB) or not store_failure(e):  # the open web (LAION URLs): dead links and
                raise  # refusals are the images' own, as img2dataset treats them; quarantined
            raise FetchError(f"cannot read training image {redact_urls(row['uri'])}: {type(e).__name__}: {e}. "
                             "Nothing of this unit was kept: rerun to retry it (a storage outage, expired "
                             "credentials), or grant read access to the object, or remove its row") from e
        if not data:
            raise IngestError(f"{row['uri']} is an empty file")
    return data


def _per_row(records: Sequence, fn, workers: int) -> list:
    """fn(row) for each row, in order, on up to `workers` threads; a row whose fn raises gives its reason
    ("TypeName: message") instead: any failure of one image sets that image aside only, but an outage
    (FetchError) and a MemoryError, which are not the image's, raise."""
    def one(row: dict):
        try:
            return fn(row)
        except FetchError:  # an outage: the unit fails and is retried (quarantined, it was left out for good)
            raise
        except MemoryError as e:  # this process's memory, not the image's fault: quarantined, it was left out of
            # the index for good (every later audit reuses the index); failed, the unit is retried on a rerun
            raise MemoryError(f"reading or decoding a training image ran out of memory ({e or 'MemoryError'}): "
                              "nothing of this unit was kept, and a rerun retries it. Lower index.decode_batch "
                              "(the training images a step of an index shard holds) or run the workers where "
                              "more memory is free (memex sets none of its own: resources.* gives CPUs and GPUs "
                              "only)") from e
        except Exception as e:  # noqa: BLE001 - the caller quarantines or names the row
            return f"{type(e).__name__}: {e}"

    if workers > 1 and len(records) > 1:
        with ThreadPoolExecutor(min(workers, len(records))) as pool:
            return list(pool.map(one, records))
    return [one(r) for r in records]


def fetch_bytes(rows: pa.Table, storage_options: dict[str, Any] | None = None,
                workers: int = 8, version: str | None = None) -> tuple[dict, pa.Table]:
    """({id: encoded image}, QUARANTINE_SCHEMA table of the rows that could not be read) for rows with
    columns id and image and/or uri: the images read from their uris on `workers` threads where the
    row holds none. Nothing is decoded (match keeps a shard's neighbours encoded: memex/stages/match.py).
    `version`: row_bytes's."""
    opts = storage_options or {}
    records = rows.select([c for c in ROW_COLUMNS if c in rows.column_names]).to_pylist()
    remote = sum(not r.get("image") for r in records)  # threads for the reads from uris only
    results = _per_row(records, lambda row: row_bytes(row, opts, version), workers if remote > 1 else 1)
    good = {r["id"]: res for r, res in zip(records, results) if not isinstance(res, str)}
    bad = [{"id": r["id"], "uri": r.get("uri"), "reason": res}
           for r, res in zip(records, results) if isinstance(res, str)]
    return good, pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA)


# Decoded pixels one decode_rows call holds at once over its threads (images.decoded_pixels: width x
# height from the header, a JPEG's at its DCT scale; images.fit_pixels adds preprocess=pad's canvases). A
# decode holds ~7 bytes a pixel at its peak (images._rgb_box), so ~450 MB here; an image over the budget
# is decoded alone. LAION's images (~0.3 MP, a few MP at most) never wait: 8 threads of them are far below
# it. Eight 24 MP PNGs decoded at once added 2.7 GB (bench/bench_huge_images.py): eight 96 MP ones, ~11 GB,
# enough to OOM-kill a worker.
DECODE_PIXEL_BUDGET = 64 << 20


# glibc's malloc hands a thread's freed blocks of 128 KiB to 32 MiB (PIL's 16 MiB image blocks, a strip's
# arrays) back to that thread's own heap, not to the system, once a block that size was freed: 8 threads
# that each decoded one huge image, one after another, kept up to 8 images' worth resident (24 MP PNGs
# decoded one at a time on 8 threads peaked 0.66 GB higher). malloc_trim(0) after each decode this large
# returns them before the next starts (0.2-2 ms). A no-op where the C library has none (macOS, musl).
TRIM_PIXELS = 4 << 20


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PixelBudget:
    """A count of decoded pixels shared by threads: hold(n) waits until n more fit under `limit`, or
    until nothing else is held (an image over the limit is decoded alone, never refused)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        with self._cond:
            self._cond.wait_for(lambda: self.held == 0 or self.held + pixels <= self.limit)
            self.held += pixels
        try:
            yield
        finally:
            with self._cond:
                self.held -= pixels
                self._cond.notify_all()


def _decode(row: dict, size: int | None, opts: dict[str, Any], preprocess: str,
            aspect: tuple[int, int] | None = None, alpha: str = "white", version: str | None = None,
            budget: PixelBudget | None = None) -> np.ndarray:
    data = row_bytes(row, opts, version)  # read before the budget's wait: reads from a store stay concurrent
    # fitted to `size` next: a JPEG is decoded at a reduced DCT scale (images.decode) that keeps both
    # sides >= max(2 x size, DRAFT_MIN_SIDE), whence bicubic makes the input as from a full decode
    min_side = None if size is None else max(2 * size, DRAFT_MIN_SIDE)
    # raises DecompressionBombError (too many pixels: from the header, before any pixel is decoded),
    # UnidentifiedImageError with a reproducible message, OSError (truncated), UnsupportedImageError
    # naming the mode: decode_rows turns each into a quarantine reason
    try:
        # fitted: with preprocess=pad its white canvases too (a 16000x2000 PNG's square is 8x its pixels)
        pixels = decoded_pixels(data, min_side) if size is None else fit_pixels(data, min_side, preprocess, aspect)
    except Image.DecompressionBombError as e:
        raise Image.DecompressionBombError(
            f"{e} PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS pixels; this one is left out (quarantined): "
            "to have it read, store it downscaled below that") from None
    with budget.hold(pixels) if budget is not None else nullcontext():
        try:
            return decode(data, alpha=alpha) if size is None else \
                decode_fit(data, size, preprocess, aspect, min_side, alpha)
        finally:
            if pixels >= TRIM_PIXELS:  # before the next decode may start: _trim_heap says why
                _trim_heap()


def decode_rows(rows: pa.Table, size: int | None, storage_options: dict[str, Any] | None = None,
                workers: int = 8, preprocess: str = "center_crop",
                aspect: tuple[int, int] | None = None, alpha: str = "white",
                version: str | None = None, pixel_budget: int | None = None) -> DecodedBatch:
    """Decode rows (columns id and image and/or uri) to RGB uint8: size x size (images.fit with
    `preprocess` and the generations' `aspect`: centre-cropped square, bicubic-resized), or as stored
    when size is None. alpha: images.decode's (trainset.alpha). version: row_bytes's.

    Never raises for a bad image: it goes to `quarantine` and is skipped. Rows are fetched and
    decoded on `workers` threads (remote reads dominate on object stores; PIL releases the GIL
    while decoding), and the output keeps the input order. pixel_budget (DECODE_PIXEL_BUDGET when
    None): the most decoded pixels the threads hold at once (PixelBudget; an image over it alone), so a
    batch of huge images is decoded a few at a time.
    """
    opts = storage_options or {}
    table = rows.select([c for c in ROW_COLUMNS if c in rows.column_names])
    budget = PixelBudget(DECODE_PIXEL_BUDGET if pixel_budget is None else pixel_budget)
    # a row's encoded bytes copied out of the table by the thread that decodes it (the whole batch's
    # to_pylist held every image's bytes twice, the table's and Python's, for the whole batch)
    results = _per_row(range(table.num_rows), lambda i: _decode(
        table.slice(i, 1).to_pylist()[0], size, opts, preprocess, aspect, alpha, version, budget), workers)
    records = table.select([c for c in ("id", "uri") if c in table.column_names]).to_pylist()

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
