"""Atomic reads and writes on any fsspec filesystem, and the one "unit complete" convention.

Every byte memex writes goes through a `Store` (run folders, the membership index, the nightly
ledger, the trend page, FAISS files):
  * a write goes to `_tmp-<uuid>-<name>` beside its target and is moved into place, so a reader
    never sees half a file under the final name. Parquet readers skip `_`-prefixed paths, so a
    killed writer's temp file is never read as data;
  * object stores have no folders, and s3fs.makedirs *creates a missing bucket*: a typo in a root
    would silently make a new bucket, so only local filesystems get folders.

A stage writes its output as numbered units in a `StageFolder` (datatrove's executor convention,
`is_rank_completed` / `mark_rank_as_completed`):

    <folder>/shard-000000.parquet          the unit's files (written first, atomically)
    <folder>/_markers/shard-000000.json    written last: the unit is complete (its metadata)
    <folder>/_SUCCESS.json                 written last of all: the whole stage is complete

Only a unit with a marker counts, so a run killed at any point resumes by redoing unmarked units
(deterministic seeds make a redone unit identical). `memex.runner` drives this loop; this module
only reads and writes. Any fsspec URI works (local paths, s3:// through s3fs, memory:// in tests).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import mimetypes
import os
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from memex.config import ConfigError, MemexError, glob_chars

SHARD_DIGITS = 6  # zero-padded to 1M units (more take more digits): 175M samples at 175 per shard
# the files of one dataset read (a stage folder's units) read at once: each is ~3 requests (info, footer, pages) one
# after another, so on S3 100,000 shards read one by one took ~100 minutes a read
READ_THREADS = 16


# arrow's messages for a Parquet page whose bytes were changed (measured on pyarrow 26: zstd, snappy, gzip)
CORRUPT_PAGE = ("corrupt", "decompress", "unexpected end of stream", "thrift", "codec failed")


class StorageError(MemexError, RuntimeError):
    """Storage is unreachable, or holds something that conflicts with this run."""


# clients whose errors are the store's or the network's, not the file's or the row's (s3fs passes botocore's on as
# they are: EndpointConnectionError, ResponseStreamingError; gcsfs, adlfs raise their transports'), except a request
# the client refuses to send as malformed
STORE_CLIENTS = ("botocore.", "aiobotocore.", "aiohttp.", "google.auth.", "google.api_core.", "azure.core.")
MALFORMED = ("ParamValidationError", "InvalidS3AddressingStyleError", "InvalidRegionError")


def client_error(e: BaseException) -> bool:
    """An error of a store's client library (matched by module: they are optional imports), not a malformed request."""
    return type(e).__module__.startswith(STORE_CLIENTS) and type(e).__name__ not in MALFORMED


def is_damage(e: BaseException) -> bool:
    """Whether reading a file memex wrote failed because the file is damaged or gone (named, with the
    recovery: remove it and its marker), rather than because storage or memory failed (never called damage:
    removing a good file a timeout could not read, or that did not fit in memory, loses work).
    Arrow reports bytes damaged inside a page as a plain OSError naming the corruption (CORRUPT_PAGE);
    fsspec's I/O failures are OSError subclasses (PermissionError, TimeoutError, ConnectionResetError),
    and s3fs passes botocore's and aiohttp's own (a dropped connection, a cut stream) on as they are."""
    if isinstance(e, (MemoryError, FileNotFoundError)):
        return not isinstance(e, MemoryError)
    if isinstance(e, OSError):
        return type(e) is OSError and any(w in str(e).lower() for w in CORRUPT_PAGE)
    return not client_error(e)


def unreadable(where: str, e: BaseException) -> str:
    """The message for a file memex wrote that storage failed to serve (is_damage: no): it is kept; rerun."""
    return (f"cannot read {where}: {type(e).__name__}: {e}. Check the storage options (endpoint, credentials) "
            "and rerun; the file was not found damaged.")


def store_failure(e: BaseException) -> bool:
    """The store or the network failed (not the file): a client library's error (botocore's EndpointConnectionError,
    an expired token's ClientError), or fsspec's OSError for a refusal or a timeout."""
    return client_error(e) or isinstance(e, (PermissionError, ConnectionError, TimeoutError))


# a path's own errors, not the store's: nothing there, or a file where a folder is (or the reverse)
MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def request_failure(e: BaseException) -> bool:
    """A Store request (exists, a read, a listing) that the store failed: store_failure, or any other OSError but a
    missing path (MISSING). s3fs raises the S3 errors it has no class for as a plain OSError with an errno: an expired
    STS token's 400 on a HEAD, which has no body to name it, is OSError(22) "Bad Request", and a 503 or 500 that
    outlived its retries OSError(16) or OSError(121); local disk and NFS give ESTALE, EIO. Not in store_failure:
    there the OSError may be a decoder's about the file (PIL's UnidentifiedImageError is one)."""
    return store_failure(e) or (isinstance(e, OSError) and not isinstance(e, MISSING))


def store_failed(verb: str, uri: str, e: BaseException) -> str:
    """The message for a read or write the store failed (store_failure): the URI, what to check, and that a rerun
    loses nothing."""
    return (f"cannot {verb} {uri}: {type(e).__name__}: {e}. Check storage.options (endpoint_url, credentials: an "
            "expired token, the profile), the network, and the folder's permissions, then rerun: it resumes, nothing "
            "written is lost (finished units keep their markers).")


def damaged(where: str, kind: str, e: Exception, markers: list[str] | None = None) -> str:
    """The message for a file memex wrote that no longer reads: say which, and how to recover.
    `markers`: the unit markers of the damaged files, named in the fix."""
    fix = (f"Remove it and its marker{'s' if len(markers) > 1 else ''} ({', '.join(markers[:3])})" if markers else
           "Remove it, and for a unit's file (shard-<n>.parquet) its marker (_markers/shard-<n>.json) too,")
    return (f"{where} is not readable {kind} ({type(e).__name__}: {e}). It was changed, truncated or removed after "
            f"memex wrote it (an interrupted copy or sync, an edit by hand). {fix} and rerun the command: what "
            "was removed is written again and the rest is kept.")


def _fsync(path: str, directory: bool = False) -> None:
    """Flush a local file's (or folder's: its entries) writes to the disk. A filesystem that cannot
    (some network and 9p/drvfs mounts refuse fsync on a folder: EINVAL, ENOTSUP) leaves it to its
    own guarantees: the write itself already succeeded."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS, errno.EBADF, errno.EACCES, errno.EPERM):
            raise


def marker_of(path: str) -> str | None:
    """A unit file's marker (`.../samples/shard-000012.parquet` -> `.../samples/_markers/shard-000012.json`)."""
    folder, name = posixpath.split(path)
    stem, ext = posixpath.splitext(name)
    return posixpath.join(folder, "_markers", stem + ".json") if ext == ".parquet" and "-" in stem else None


def check_outside(out_key: str, out_uri: str, in_key: str, in_uri: str, options: dict[str, Any]) -> None:
    """Where memex writes (`out_key`) is neither the folder it reads images from (`in_key`) nor
    inside it. storage.root defaults to ./runs, so an audit started in its image folder with
    trainset.path=. wrote the index and samples into the training set, and the next run read those
    Parquet files as its manifest ("needs an 'id' column ... columns: [caption, gid, ...]")."""
    try:
        fs_out, out = fsspec.core.url_to_fs(out_uri, **options)
        fs_in, src = fsspec.core.url_to_fs(in_uri, **options)
    except Exception:  # noqa: BLE001 - an unreachable or unknown URI: the checks that open it name it
        return
    out, src = out.rstrip("/"), src.rstrip("/")
    if fs_out.protocol == fs_in.protocol and (out == src or out.startswith(src + "/")):
        raise ConfigError(f"{out_key}={out_uri} ({out}) is inside {in_key}={in_uri} ({src}): the Parquet files and "
                          f"images memex writes there would be read as training data by the next run; set "
                          f"{out_key} to a folder outside it")


def protocol_of(uri: str) -> str | None:
    """`s3://b/x` -> "s3"; a plain path (or a Windows drive letter) -> None."""
    head, sep, _ = str(uri).partition("://")
    return head.lower() if sep and len(head) > 1 else None


def unreachable_storage(root: str, shared_mount: bool, alive_nodes: int, client: bool = False,
                        key: str = "storage.root") -> str | None:
    """Why the nodes of a Ray cluster cannot share `root`, or None when they can (pure: the runner
    passes the count of alive nodes). One node: anything goes. More: a local path (no protocol,
    file://, local://) is each node's own disk, so units written on a worker never reach the driver,
    unless `shared_mount` says every node mounts it (NFS). memory:// is one process's only, and Ray's
    tasks and actors are other processes even on one node: refused whatever the count. `client`: the
    driver is connected through Ray Client (resources.address=ray://...), off the cluster: a local path is
    then the laptop's disk for the driver and a node's for the units, whatever the count. `key`: the setting
    that names `root` (storage.root, or index.root, where the index units write)."""
    proto = protocol_of(root)
    if proto == "memory":  # was "train.parquet is not readable" from the driver after the index stage
        return (f"{key}={root} is in one process's memory, and Ray runs the units in other processes "
                f"(the driver would never see what they write): use a folder, object storage (storage=s3 "
                f"{key}=s3://bucket/runs), or resources.executor=local (no Ray, one process)")
    local = proto in (None, "file", "local") and not shared_mount
    if client and local:  # every unit wrote to the cluster's disk, and the driver found no marker, rerun after rerun
        return (f"{key}={root} is a local path, and the driver runs off the cluster (Ray Client, a ray:// "
                "address): the units would write to the cluster's disks and the driver would read its own. Use "
                f"object storage (storage=s3 {key}=s3://bucket/runs), submit the command as a job (ray job "
                "submit), or, if this machine and every node mount this path, set storage.shared_mount=true")
    if alive_nodes <= 1:
        return None
    if local:
        return (f"{key}={root} is a local path, but Ray has {alive_nodes} nodes: each would write its "
                "units to its own disk and the shards would be lost. Use object storage (storage=s3 "
                f"{key}=s3://bucket/runs), or, if every node mounts this path (NFS), set "
                "storage.shared_mount=true")
    return None


# set by Ray's job supervisor in a submitted job's driver: its runtime_env (working_dir) as JSON
RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_job_working_dir(path: str | None, key: str, job_config: str | None, cwd: str) -> str | None:
    """Why a local `path` is lost under `ray job submit --working-dir`, or None (pure: the caller passes
    $RAY_JOB_CONFIG_JSON_ENV_VAR and the working folder). The job's driver runs in Ray's copy of the
    working dir, which Ray deletes once the job is done: a relative path (storage.root's default `runs`,
    MLflow's sqlite:///mlflow.db, wandb's ./wandb) lands in it, and the results with it. None: here."""
    if not job_config or protocol_of(path or "") not in (None, "file", "local"):
        return None
    try:
        working_dir = (json.loads(job_config).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return None
    # Ray unpacks the working dir under .../runtime_resources/working_dir_files/_ray_pkg_<hash>: an entrypoint
    # that cd'ed elsewhere (bash -c "cd /fsx && python ...") writes there, not into the copy
    if not working_dir or "_ray_pkg_" not in cwd:
        return None
    local = (path or ".").split("://", 1)[-1]
    local = local[len("file:"):] if local.startswith("file:") else local  # MLflow's file:/abs/mlruns
    where = os.path.abspath(os.path.join(cwd, os.path.expanduser(local)))
    if where != cwd and not where.startswith(cwd.rstrip("/") + "/"):
        return None
    return (f"{key}={path if path is not None else '(unset: this folder)'} is inside this Ray job's copy of its "
            f"working_dir ({cwd}), which Ray deletes once the job is done: give object storage (s3://bucket/...) "
            "or an absolute path outside it that the nodes share")


def differences(a: dict, b: dict, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, old, new) of every leaf that differs: `sampling.guidance_scale: was 7.5, now 3.0`
    rather than both whole sampling sections, ten keys each."""
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            yield from differences(x, y, f"{prefix}{k}.")
        elif x != y:
            yield f"{prefix}{k}", x, y


def differences_text(a: dict, b: dict, limit: int | None = None) -> str:
    """`differences` as one line, "k: was x, now y; ...", the first `limit` of them and a count of the rest."""
    diffs = list(differences(a, b))
    shown = diffs if limit is None else diffs[:limit]
    more = len(diffs) - len(shown)
    return "; ".join(f"{k}: was {x!r}, now {y!r}" for k, x, y in shown) + (f"; and {more} more" if more else "")


def as_recorded(settings: dict) -> dict:
    """Settings as a settings file records them (json: tuples become lists, enums and paths strings), so a
    comparison with one read back is exact."""
    return json.loads(json.dumps(settings, default=str))


class _Damaged(Exception):
    """Store._read_files: these files (in read order) are damaged; `error` is the first one's."""

    def __init__(self, paths: list[str], error: BaseException):
        super().__init__(paths)
        self.paths, self.error = paths, error


class Store:
    """A folder on any fsspec filesystem. Paths given to its methods are filesystem paths
    (`store.join(...)`, no protocol); `uri_of` turns one back into a URI a user can paste."""

    def __init__(self, uri: str, options: dict[str, Any] | None = None):
        self.options = dict(options or {})
        self.fs, path = fsspec.core.url_to_fs(uri, **self.options)
        self.protocol = uri.split("://", 1)[0] if "://" in uri else "file"
        self.path = path.rstrip("/") or "/"

    @property
    def uri(self) -> str:
        return self.uri_of(self.path)

    def uri_of(self, path: str) -> str:
        """s3://bucket/runs/name for object stores, /abs/path for local disk."""
        return path if self.protocol == "file" else f"{self.protocol}://{path}"

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def child(self, *parts: str) -> "Store":
        """The sub-folder `parts` as a Store on the same filesystem (no new connection)."""
        sub = object.__new__(Store)
        sub.options, sub.fs, sub.protocol, sub.path = self.options, self.fs, self.protocol, self.join(*parts)
        return sub

    # ---- reads ---------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        """Whether `path` exists; the store failing to answer (store_failure) is a StorageError naming it."""
        try:
            return self.fs.exists(path)
        except Exception as e:
            if request_failure(e):
                raise StorageError(store_failed("reach", self.uri_of(path), e)) from e
            raise

    def read_bytes(self, path: str) -> bytes:
        """The bytes at `path` (FileNotFoundError when there is none); a store failure is a StorageError."""
        try:
            with self.fs.open(path, "rb") as f:
                return f.read()
        except Exception as e:
            if request_failure(e):
                raise StorageError(store_failed("read", self.uri_of(path), e)) from e
            raise

    def read_json(self, path: str) -> dict | None:
        """The JSON object at `path`, or None when there is none. Unparseable bytes (a truncated
        copy, an edit by hand) raise a StorageError naming the file: memex's own writes are atomic."""
        if not self.exists(path):
            return None
        try:
            return json.loads(self.read_bytes(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StorageError(damaged(self.uri_of(path), "JSON", e)) from e

    def listing(self, folder: str, pattern: str = "*", deep: bool = False) -> list[str]:
        """The paths in `folder` (deep: below it too) whose name matches the shell `pattern`, sorted; none when the
        folder is missing. Not fs.glob(join(folder, pattern)): glob reads the folder's own path as a pattern too,
        and fsspec has no escape for it, so a `[`, `*` or `?` in storage.root matched nothing (`runs/sd[ema]` is a
        character class): a stage found no marker of units it had written. A store failure is a StorageError."""
        try:
            found = self.fs.find(folder, withdirs=True) if deep else self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:
            if request_failure(e):
                raise StorageError(store_failed("list", self.uri_of(folder), e)) from e
            raise
        top = folder.rstrip("/")
        return sorted(p for p in (str(n).rstrip("/") for n in found)
                      if p != top and fnmatch.fnmatchcase(posixpath.basename(p), pattern))

    def read_table(self, path: str | list[str], schema: pa.Schema | None = None, columns: list[str] | None = None,
                   filters=None) -> pa.Table:
        """One Parquet file, or several read as one dataset (`schema` unifies them). A file that is
        not Parquet, or is missing though a marker lists it, raises a StorageError naming it and its
        recovery; a store that fails to serve it (is_damage: no), a StorageError naming what to check,
        the original error its __cause__."""
        paths = path if isinstance(path, list) else [path]
        where = self.uri_of(paths[0] if len(paths) == 1 else posixpath.dirname(paths[0])) if paths else self.uri
        try:
            if isinstance(path, list):
                return self._read_files(path, schema, columns, filters)
            return pq.read_table(path, filesystem=self.fs, schema=schema, columns=columns, filters=filters)
        except _Damaged as d:  # files read one each (_read_files): the damaged ones are known
            bad, e = d.paths, d.error
            where = ", ".join(self.uri_of(p) for p in bad[:3]) + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "")
            markers = [self.uri_of(m) for m in map(marker_of, bad[:3]) if m and self.fs.exists(m)]
            raise StorageError(damaged(where, "Parquet", e, markers)) from e
        except Exception as e:
            if (failure := self.read_failure(paths, where, e)) is None:
                raise
            raise failure from e

    def read_failure(self, paths: list[str], where: str, e: Exception) -> StorageError | None:
        """The StorageError a failed read of Parquet `paths` raises, or None for an error that is no storage's
        (raised as it is). Bytes damaged inside a page come back as arrow's OSError ("Corrupt snappy compressed
        data", zstd's "Unexpected end of stream"), like a network failure read through fsspec: only the former is
        named as damaged, with its recovery (removing a file a timeout could not read would be wrong).
        PermissionError, TimeoutError, ConnectionResetError, s3fs's OSError(22) of an expired token, botocore's
        own errors: a storage failure, whatever it says (raised raw, it was a traceback at the CLI)."""
        if isinstance(e, (pa.ArrowInvalid, pa.ArrowTypeError, OSError)):
            if not is_damage(e):
                return StorageError(store_failed("read", where, e))
            # one path (several are read one each by _read_files, which names the damaged ones: _Damaged)
            markers = [self.uri_of(m) for m in map(marker_of, paths) if m and self.fs.exists(m)]
            return StorageError(damaged(", ".join(map(self.uri_of, paths)), "Parquet", e, markers))
        return StorageError(store_failed("read", where, e)) if client_error(e) else None

    def _read_files(self, paths: list[str], schema: pa.Schema | None, columns: list[str] | None,
                    filters) -> pa.Table:
        """Several Parquet files as one table, in their order: the table pq.ParquetDataset(paths) read (its schema
        `schema`, else the first file's), each file read by one of READ_THREADS threads. ParquetDataset opened them
        one after another, ~3 requests each (info, footer, pages): on S3, 40 shards at 100 ms took 10 s, 100,000
        ~100 minutes. A damaged file raises _Damaged naming every damaged one; a store failure is raised as it is,
        at once (the reads not started are dropped), for read_table to name."""
        if not paths:
            return pq.ParquetDataset(paths, filesystem=self.fs, schema=schema, filters=filters).read(columns=columns)
        if schema is None:  # ParquetDataset's: the first file's (each file is cast to it)
            try:
                schema = pq.read_schema(paths[0], filesystem=self.fs)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
                if is_damage(e):
                    raise _Damaged([paths[0]], e) from e
                raise

        local = isinstance(self.fs, LocalFileSystem)  # (arrow reads it natively)

        def one(p: str) -> pa.Table:
            if local:
                return pq.read_table(p, filesystem=self.fs, schema=schema, columns=columns, filters=filters)
            # the file opened as arrow's fsspec handler opens it, less arrow's own info() first: one request fewer
            with self.fs.open(p, "rb") as f:
                return pq.read_table(f, schema=schema, columns=columns, filters=filters)

        pool = ThreadPoolExecutor(max_workers=min(READ_THREADS, len(paths)), thread_name_prefix="memex-read")
        tables, bad, first = [], [], None
        try:
            futures = [pool.submit(one, p) for p in paths]
            for p, f in zip(paths, futures):
                try:
                    tables.append(f.result())
                except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
                    if not is_damage(e):
                        raise
                    bad.append(p)
                    first = first or e
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if bad:
            raise _Damaged(bad, first)
        return pa.concat_tables(tables)

    def sweep_temp(self, *folders: str, deep: bool = False) -> int:
        """Remove the `_tmp-` files a killed process's writes left in these folders of the store ("" is its
        root; deep: their sub-folders too), e.g. a shadow model's weights a kill cut short, which no run
        read or removed. Not a write-probe, nor a lease's own temp file (its heartbeat writes one now).
        Only under the folder's lease, while no other process writes there. Returns how many."""
        fs, found = self.fs, []
        for folder in folders:
            where = self.join(folder) if folder else self.path
            fs.invalidate_cache(where)
            found += [p for p in self.listing(where, "_tmp-*", deep=deep)
                      if not posixpath.basename(p).startswith("_tmp-probe-") and not p.endswith("_lease.json")]
        for p in found:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(p)
        return len(found)

    # ---- atomic writes -------------------------------------------------------------------
    def delete(self, path: str) -> None:
        """Remove one file; one already gone is fine."""
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def mkdirs(self, path: str) -> None:
        if isinstance(self.fs, LocalFileSystem):  # never on object stores: see the module doc
            self.fs.makedirs(path, exist_ok=True)

    @contextlib.contextmanager
    def atomic(self, path: str) -> Iterator[str]:
        """Yields a temp path beside `path`; on success it is moved onto `path`, on error removed."""
        self.mkdirs(posixpath.dirname(path))
        tmp = posixpath.join(posixpath.dirname(path), f"_tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
        try:
            yield tmp
            if self.protocol == "file":
                _fsync(tmp)  # the bytes on disk before the name: else a power cut could keep the rename (and the
                # marker written next) over a file whose blocks never reached the disk (ext4, xfs)
            self._move(tmp, path)
            if self.protocol == "file":
                _fsync(posixpath.dirname(path), directory=True)  # the rename itself
        except BaseException as e:
            with contextlib.suppress(Exception):  # the original error matters more than the cleanup
                if self.fs.exists(tmp):
                    self.fs.rm_file(tmp)
            # s3fs raises S3 errors that outlived its retries as OSError, unnamed; botocore's own (an unreachable
            # endpoint, an expired token) as they are
            if isinstance(e, OSError) or client_error(e):
                raise StorageError(store_failed("write", self.uri_of(path), e)) from e
            raise

    def _move(self, tmp: str, path: str) -> None:
        """Move the temp file `tmp` onto `path`. Local disk: a rename. Elsewhere fsspec's mv expands its source as a
        glob (copy, then rm), so a `[` in storage.root made every write on S3 a FileNotFoundError: a path holding a
        wildcard is copied and deleted as the one file it is (what s3fs's mv does for a plain path)."""
        if isinstance(self.fs, LocalFileSystem) or not glob_chars(tmp):
            self.fs.mv(tmp, path)
            return
        self.fs.cp_file(tmp, path)
        self.fs.rm_file(tmp)

    @contextlib.contextmanager
    def writing(self, path: str) -> Iterator[Any]:
        """An open binary file for a large write made in parts, which appears whole or not at all. Local
        disk (and memory://): a temp file moved into place (`atomic`). S3 and GCS: the final key itself,
        whose upload in parts is visible only once completed, and discarded on error (s3fs aborts the
        multipart upload). There atomic()'s move is a copy: s3fs copies an object over 5 GB in serial
        50 MiB parts, ~4,000 requests for the 200 GB train.pack of 5M training images. A SIGKILL leaves
        an incomplete upload, invisible (the bucket's lifecycle rule for incomplete uploads removes it)."""
        if self.protocol not in ("s3", "s3a", "gs", "gcs"):
            with self.atomic(path) as tmp, self.fs.open(tmp, "wb") as f:
                yield f
            return
        f = self.fs.open(path, "wb")
        try:
            yield _GrowingParts(f) if self.protocol in ("s3", "s3a") else f
        except BaseException:
            with contextlib.suppress(Exception):  # the original error matters more than the cleanup
                f.discard()
            f.closed = True  # close() would complete the upload with the part written so far
            raise
        try:
            f.close()
        except Exception as e:  # s3fs raises S3 errors that outlived its retries as OSError, unnamed
            if isinstance(e, OSError) or client_error(e):
                raise StorageError(store_failed("write", self.uri_of(path), e)) from e
            raise

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.atomic(path) as tmp:
            self.fs.pipe_file(tmp, data, **self._content_type(path))

    def _content_type(self, path: str) -> dict[str, str]:
        """S3: the object's Content-Type from the final name (the move keeps the temp file's). s3fs's
        pipe_file sets none, so S3 served report/index.html as binary/octet-stream and browsers (and a
        static website on the bucket) downloaded the report instead of showing it."""
        if self.protocol not in ("s3", "s3a"):
            return {}
        kind = mimetypes.guess_type(path)[0]
        if kind is None:
            return {}
        return {"ContentType": kind + ("; charset=utf-8" if kind.startswith("text/") or kind.endswith("json") else "")}

    def write_json(self, path: str, obj: dict) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def write_table(self, path: str, table: pa.Table, row_group_size: int | None = None) -> None:
        with self.atomic(path) as tmp:
            pq.write_table(table, tmp, filesystem=self.fs, compression="zstd", row_group_size=row_group_size)

    def write_batches(self, path: str, schema: pa.Schema, tables: Iterator[pa.Table],
                      row_group_size: int | None = None) -> None:
        """One Parquet file from tables made one after another (bounded memory), atomically: the
        file appears complete or not at all, also when making a table raises."""
        with self.atomic(path) as tmp:
            with self.fs.open(tmp, "wb") as f, pq.ParquetWriter(f, schema, compression="zstd") as writer:
                for t in tables:
                    writer.write_table(t.cast(schema), row_group_size=row_group_size)

    def holds(self, path: str, settings: dict) -> bool:
        """Whether `path` records exactly these settings, as claim would compare them."""
        return self.read_json(path) == as_recorded(settings)

    def claim(self, path: str, settings: dict, what: str, fix: str, added: tuple[str, ...] = ()) -> None:
        """Record the settings a folder is written with at `path`, or refuse other ones, changing
        nothing: resuming with different settings would mix two experiments in one dataset.
        `added`: keys recorded since folders existed; a folder written before them (none of them, the rest
        equal) adopts them, as it was, so it still resumes."""
        settings = as_recorded(settings)
        existing = self.read_json(path)
        if existing is not None and any(k in settings for k in added) and not any(k in existing for k in added) \
                and existing == {k: v for k, v in settings.items() if k not in added}:
            self.write_json(path, settings)
            existing = settings
        if existing is None:
            self.write_json(path, settings)
        elif existing != settings:
            detail = differences_text(existing, settings)
            raise StorageError(f"{what} was written with other settings ({detail}). Nothing was changed. {fix}")

    def check_reachable(self, what: str, keys: str) -> None:
        """One request to the store (does this folder exist?): an unreachable endpoint or refused
        credentials fail here in one line naming the URI and the config `keys` to check, instead of
        as botocore's traceback from the first read. A missing folder is fine (it is made later)."""
        try:
            self.fs.exists(self.path)
        except Exception as e:  # noqa: BLE001 - re-raised with the URI and the fix
            raise StorageError(f"cannot reach {what} {self.uri}: {type(e).__name__}: {e}. Check {keys}.") from e

    def check_writable(self, what: str, keys: str) -> None:
        """Make this folder (local disk) and write + delete a probe file: an unreachable store
        fails here, naming the URI and the config `keys` to check, not mid-run."""
        try:
            self.mkdirs(self.path)
            probe = self.join(f"_tmp-probe-{uuid.uuid4().hex}")
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001 - re-raised with the URI and the fix
            raise StorageError(f"cannot write to {what} {self.uri}: {type(e).__name__}: {e}. Check {keys}.") from e


# A stage folder's settings key to name in the refusal's sweep example: the run folder is named by
# the generation settings only, so `-m match.threshold=0.1,0.15` reaches the same folder twice;
# filter and match settings are swept over one run's generations with run.samples_from.
SWEEP_EXAMPLE = {"candidates": "filter.edge_threshold", "matches": "match.threshold", "triage": "triage.seeds",
                 "previews": "triage.seeds"}


def unit_name(index: int, prefix: str = "shard") -> str:
    return f"{prefix}-{index:0{SHARD_DIGITS}d}"


# S3 takes at most 10,000 parts an upload, and s3fs sends one each time its buffer passes the block size
# (default_block_size, 50 MiB): a pack over ~488 GiB (12M LAION images at 40 KB; LAION-Aesthetics' 12M at
# ~80 KB is ~1 TB) failed at its 10,001st part, after hours of copying. Parts need not be equal (only the
# last may be under 5 MiB), so the block doubles every PARTS_PER_SIZE parts, four times: 2,000 parts of
# each of 50, 100, 200, 400 and 800 MiB hold ~3 TiB; the buffer (the driver's memory) grows with it.
PARTS_PER_SIZE = 2000
SIZE_DOUBLINGS = 4


class _GrowingParts:
    """An s3fs file open for writing whose block size grows with its number of parts (above)."""

    def __init__(self, f: Any):
        self._f, self._first = f, f.blocksize

    def write(self, data) -> int:
        n = self._f.write(data)
        parts = len(getattr(self._f, "parts", None) or ())  # (s3fs starts the list at its first part)
        self._f.blocksize = self._first << min(parts // PARTS_PER_SIZE, SIZE_DOUBLINGS)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class StageFolder:
    """A stage's output folder of numbered units, each complete once its marker exists."""

    def __init__(self, store: Store, name: str, prefix: str = "shard", schema: pa.Schema | None = None,
                 row_group_size: int | None = None):
        self.store, self.name, self.prefix, self.schema = store, name, prefix, schema
        self.row_group_size = row_group_size  # of its Parquet units (None: pyarrow's, one group a unit)
        self.path = store.join(name)

    def file(self, index: int, suffix: str = ".parquet", kind: str = "") -> str:
        """Path of a unit's file: <folder>/[<kind>-]shard-000000<suffix>."""
        return posixpath.join(self.path, (f"{kind}-" if kind else "") + unit_name(index, self.prefix) + suffix)

    def marker(self, index: int) -> str:
        return posixpath.join(self.path, "_markers", unit_name(index, self.prefix) + ".json")

    def attempts(self, index: int) -> str:
        """<folder>/_attempts/shard-000000.json: how often the current command started the unit."""
        return posixpath.join(self.path, "_attempts", unit_name(index, self.prefix) + ".json")

    @property
    def success_path(self) -> str:
        return posixpath.join(self.path, "_SUCCESS.json")

    @property
    def settings_path(self) -> str:
        return posixpath.join(self.path, "_settings.json")

    # ---- completion (datatrove: is_rank_completed / mark_rank_as_completed) ------------
    # Markers and _SUCCESS.json are written by other processes (Ray workers, another job), and s3fs & co
    # answer exists() and glob() from listings cached per process with no expiry: each read below drops
    # the cached listing of what it reads first (no request; a no-op on local disk).
    def _fresh(self, path: str) -> str:
        self.store.fs.invalidate_cache(path)
        return path

    def sweep_temp(self) -> int:
        """Remove the `_tmp-` files that writes of a killed process left in this folder, its _markers/
        and _attempts/ (each up to a whole unit: a FAISS shard, a Parquet shard; nothing reads or reuses
        them, and every kill left new ones), and the _attempts/ of marked units. Returns how many. Only
        while no other process writes here: the runner calls it before it dispatches the folder's units,
        under the folder's lease."""
        fs, ls = self.store.fs, self.store.listing  # (not fs.glob: storage.root's path may hold a `[`)
        found = [p for sub in ("", "_markers", "_attempts")
                 for p in ls(self._fresh(posixpath.join(self.path, sub).rstrip("/")), "_tmp-*")]
        # and the start counts of units already marked: a kill between a unit's marker and its
        # clear_starts left one, which no later run removed (the unit is never started again)
        done = {unit_name(i, self.prefix) + ".json" for i in self.complete()}
        found += [p for p in ls(self._fresh(posixpath.join(self.path, "_attempts")), "*.json")
                  if posixpath.basename(p) in done]
        for p in found:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(p)
        return len(found)

    def is_complete(self, index: int) -> bool:
        return self.store.exists(self._fresh(self.marker(index)))

    def read_marker(self, index: int) -> dict | None:
        return self.store.read_json(self._fresh(self.marker(index)))

    def count_start(self, index: int, command: str) -> int:
        """One more start of unit `index` by the command run `command` (a token per run); returns
        how many times that run has started it, this one included. A new run counts from 1.
        `clear_starts` once the unit is marked: a complete folder holds no _attempts/ file."""
        last = self.store.read_json(self.attempts(index)) or {}
        starts = last.get("starts", 0) + 1 if last.get("command") == command else 1
        self.store.write_json(self.attempts(index), {"command": command, "starts": starts})
        return starts

    def clear_starts(self, index: int) -> None:
        self.store.delete(self.attempts(index))

    def mark_complete(self, index: int, meta: dict) -> None:
        """Called after every file of the unit is in place: from now on the unit counts."""
        self.store.write_json(self.marker(index), meta)

    def complete(self) -> list[int]:
        """Indices of the complete units, ascending."""
        markers = self.store.listing(self._fresh(posixpath.join(self.path, "_markers")), f"{self.prefix}-*.json")
        n = len(self.prefix) + 1  # the whole number: past 10**6 units unit_name writes 7 digits or more
        names = (posixpath.basename(m)[n: -len(".json")] for m in markers)
        return sorted(int(d) for d in names if d.isdigit())  # (not a stray "shard-000001 (1).json" copy)

    def success(self) -> dict | None:
        """The stage's summary once every unit is complete, else None."""
        return self.store.read_json(self._fresh(self.success_path))

    def mark_success(self, summary: dict) -> None:
        self.store.write_json(self.success_path, summary)

    # ---- Parquet units ---------------------------------------------------------------------
    def write_shard(self, index: int, table: pa.Table, meta: dict | None = None) -> dict:
        """A one-table unit: the file atomically, then its marker; returns the marker."""
        self.store.write_table(self.file(index), table, row_group_size=self.row_group_size)
        marker = {"rows": table.num_rows, "file": posixpath.basename(self.file(index)), **(meta or {})}
        self.mark_complete(index, marker)
        return marker

    def read(self, columns: list[str] | None = None, filters=None) -> pa.Table:
        """Every complete Parquet unit as one table (files without a marker are ignored); `filters`:
        pyarrow row filters, e.g. [("gid", "in", gids)]."""
        paths = [self.file(i) for i in self.complete()]
        if not paths:
            empty = self.schema.empty_table() if self.schema is not None else pa.table({})
            return empty.select(columns) if columns else empty
        return self.store.read_table(paths, schema=self.schema, columns=columns, filters=filters)

    def claim(self, settings: dict, where: str, added: tuple[str, ...] = ()) -> None:
        """This stage's settings (filter thresholds, match settings) in `where`, or refuse others
        (`added`: Store.claim's)."""
        key, run = SWEEP_EXAMPLE.get(self.name), posixpath.basename(self.store.path.rstrip("/"))
        if key == "triage.seeds":  # decides the generations: a sweep generates anew
            sweep = f" A sweep over it (memex audit -m) needs a run folder per value: run.name='<name>-${{{key}}}'."
        elif key:  # match and filter settings: the generations of this run, re-matched (memex/stages/rematch.py)
            sweep = (f" A sweep over these settings (memex audit -m) needs a run folder per value: add "
                     f"run.samples_from={run}, which matches this run's generations again without generating, "
                     f"in <run>-m<hash> per value (run.name='{run}-${{{key}}}' names them).")
        else:
            sweep = ""
        self.store.claim(self.settings_path, settings, f"{self.name}/ in {where}",
                         f"Use another run.name, or delete {self.store.uri_of(self.path)} to redo the stage.{sweep}",
                         added)
