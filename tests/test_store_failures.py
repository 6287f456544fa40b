"""A store that fails a request is a StorageError naming the URI and what to check, not a raw OSError's traceback nor
an empty answer (memex/storage.py, memex/ledger.py, memex/lease.py): S3's refusals and errors that s3fs raises as a
plain OSError (an expired token's bodyless 400 on a HEAD, a 503 or a 500 past the retries), a listing local disk or
NFS refuses (EACCES, ESTALE), a folder this process may not write. A missing file is still missing, and a damaged one
still named as damaged.

S3 is conftest's moto server on 127.0.0.1, behind a proxy here that answers the requests a rule picks with an error."""

import datetime as dt
import errno
import http.client
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from memex.lease import Lease, hold
from memex.ledger import Ledger
from memex.storage import StageFolder, StorageError, Store

SCHEMA = pa.schema([("x", pa.int64())])
HOP_BY_HOP = ("connection", "transfer-encoding", "content-length", "keep-alive")


class FaultyProxy:
    """moto behind a proxy: `rule(method, path) -> (status, code, message) | None` answers a request with an S3 error
    (a HEAD's with no body, as S3's own: s3fs then knows only the status)."""

    def __init__(self, upstream: str):
        self.upstream = upstream.split("://", 1)[1].split(":")
        self.rule = lambda method, path: None
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                fault = proxy.rule(self.command, self.path)
                if fault:
                    status, code, message = fault
                    error = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}'
                             "</Message></Error>").encode()
                    self.send_response_only(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(error)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(error)
                    return
                conn = http.client.HTTPConnection(proxy.upstream[0], int(proxy.upstream[1]), timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response_only(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def options(self) -> dict:
        # no retries by botocore (a 5xx retried 4 times, with backoff): the error past the retries at once
        return {"key": "testing", "secret": "testing", "skip_instance_cache": True,
                "client_kwargs": {"endpoint_url": self.url, "region_name": "us-east-1"},
                "config_kwargs": {"retries": {"max_attempts": 1}}}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty(s3_server):
    proxy = FaultyProxy(s3_server["client_kwargs"]["endpoint_url"])
    yield proxy
    proxy.close()


def objects(fault):
    return lambda method, path: None if "list-type" in path else fault


def listings(fault):
    return lambda method, path: fault if "list-type" in path else None


def _storage_error(call, uri: str, verb: str) -> StorageError:
    with pytest.raises(StorageError) as e:
        call()
    text = str(e.value)
    assert text.startswith(f"cannot {verb} {uri}") and "storage.options" in text and "rerun" in text, text
    assert isinstance(e.value.__cause__, OSError) and "not readable" not in text, text  # not called damage
    return e.value


# (s3fs's exception for each: OSError(22) "Bad Request", PermissionError, OSError(16), OSError(121))
FAULTS = {"an expired token (400, no body on a HEAD)": (400, "ExpiredToken", "The provided token has expired."),
          "refused (403)": (403, "AccessDenied", "Access Denied"),
          "unavailable past the retries (503)": (503, "ServiceUnavailable", "Please try again."),
          "a server error past the retries (500)": (500, "InternalError", "We encountered an internal error.")}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_an_s3_request_the_store_fails_is_a_storage_error_naming_the_uri(faulty, bucket, fault):
    """Reads, existence checks and listings of a run folder: an expired token's 400, a 503 or a 500 came back from
    exists() and read_json() as a raw OSError ("[Errno 22] Bad Request"), and every one from a stage folder's read()
    and read_table() (a 403's PermissionError too): a Python traceback at the CLI, where the rest name the URI and
    storage.options. Nothing is called damaged, and once the store answers again everything reads as before."""
    store = Store(f"s3://{bucket}/runs/r", faulty.options)
    folder = StageFolder(store, "samples", schema=SCHEMA)
    for i in range(3):
        folder.write_shard(i, pa.table({"x": [i]}, schema=SCHEMA))
    store.write_json(store.join("run.json"), {"a": 1})
    run_json, shard = store.join("run.json"), folder.file(1)

    faulty.rule = objects(fault)
    _storage_error(lambda: store.exists(run_json), f"s3://{run_json}", "reach")
    _storage_error(lambda: store.read_json(run_json), f"s3://{run_json}", "reach")
    _storage_error(lambda: store.read_bytes(run_json), f"s3://{run_json}", "read")
    _storage_error(lambda: folder.read_marker(0), f"s3://{folder.marker(0)}", "reach")
    _storage_error(lambda: store.read_table(shard), f"s3://{shard}", "read")
    _storage_error(folder.read, f"s3://{folder.path}", "read")

    faulty.rule = listings(fault)
    _storage_error(lambda: store.listing(folder.path), f"s3://{folder.path}", "list")
    _storage_error(folder.complete, f"s3://{folder.path}/_markers", "list")

    faulty.rule = lambda method, path: None
    assert folder.read().num_rows == 3 and store.read_json(run_json) == {"a": 1}


def test_a_missing_file_on_s3_is_still_missing_and_a_missing_unit_still_named(faulty, bucket):
    """The store's failures are told apart from a path that is not there: read_json None, read_bytes
    FileNotFoundError, an empty listing; a unit whose marker lists a file that is gone is named, with its recovery."""
    store = Store(f"s3://{bucket}/runs/r", faulty.options)
    folder = StageFolder(store, "samples", schema=SCHEMA)
    folder.write_shard(0, pa.table({"x": [0]}, schema=SCHEMA))
    assert store.read_json(store.join("absent.json")) is None and not store.exists(store.join("absent.json"))
    with pytest.raises(FileNotFoundError):
        store.read_bytes(store.join("absent.json"))
    assert store.listing(store.join("absent")) == []
    store.fs.rm_file(folder.file(0))
    with pytest.raises(StorageError, match=r"shard-000000.parquet is not readable Parquet.*Remove it and its marker"):
        folder.read()


def _row(i: int) -> dict:
    now = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    return {"location": f"/ckpt/{i}", "series": "s", "step": i, "base": "", "weights_sha256": f"{i:064x}",
            "files_signature": "x", "config_sha256": "c" * 64, "run": "r", "report": "r", "samples": 1,
            "extracted": 0, "extracted_generations": 0, "flagged_prompts": 0, "started": now, "finished": now,
            "outcome": "ok", "message": ""}


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   OSError(errno.ESTALE, "Stale file handle")], ids=["EACCES", "ESTALE"])
def test_a_ledger_whose_rows_cannot_be_listed_is_an_error_not_an_empty_ledger(tmp_path, monkeypatch, error):
    """fs.glob answers [] when local disk or NFS refuses to list rows/ (another service account's folder, a stale
    NFS handle): the ledger read as empty, so nightly audited every checkpoint again and the growth gate compared
    with no earlier row. The listing fails here as local disk fails it (os.scandir: modes do not stop root)."""
    ledger = Ledger(str(tmp_path / "_nightly"))
    for i in range(3):
        ledger.append(_row(i))
    real = os.scandir

    def scandir(path="."):
        if str(path).rstrip("/").endswith("/rows"):
            raise type(error)(error.errno, error.strerror, str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(StorageError, match=f"cannot list {tmp_path}/_nightly/rows: {type(error).__name__}"):
        ledger.read()
    with pytest.raises(StorageError):
        ledger.audited("c" * 64)
    monkeypatch.undo()
    assert ledger.read().num_rows == 3 and len(ledger.audited("c" * 64)) == 3


def test_a_ledger_on_s3_whose_listing_is_refused_is_a_storage_error(faulty, bucket):
    """S3's 403 to the listing of rows/ (a role without s3:ListBucket, an expired token) was a raw PermissionError."""
    ledger = Ledger(f"s3://{bucket}/runs/_nightly", faulty.options)
    for i in range(2):
        ledger.append(_row(i))
    faulty.rule = listings((403, "AccessDenied", "Access Denied"))
    _storage_error(ledger.read, f"s3://{bucket}/runs/_nightly/rows", "list")
    faulty.rule = lambda method, path: None
    assert ledger.read().num_rows == 2


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder this process may not write in: mode 0o555, or for root (whom modes do not stop) immutable (chattr +i);
    where neither works, Lease's own open() refused in it, as a read-only mount refuses it (EROFS)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        yield folder
        folder.chmod(0o755)
        return
    folder.chmod(0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        try:
            yield folder
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        return
    import builtins

    import memex.lease

    def refused(path, *a, **kw):
        if str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return builtins.open(path, *a, **kw)

    monkeypatch.setattr(memex.lease, "open", refused, raising=False)
    yield folder


def test_a_lease_in_a_folder_this_process_may_not_write_is_a_storage_error(read_only):
    """`memex train` into a read-only output folder (and an audit's run folder, the index's) printed a 39-line traceback
    ending in open()'s PermissionError for the lease's temp file, where every Store write names the folder and what
    to check."""
    lease_uri = f"{read_only}/_lease.json"
    error = _storage_error(lambda: Lease(Store(str(read_only)), f"output={read_only}").acquire(), lease_uri, "write")
    assert "permissions" in str(error)
    with pytest.raises(StorageError, match=f"cannot write {lease_uri}: "):
        with hold(Store(str(read_only)), None, f"output={read_only}"):
            pass
    assert not os.path.exists(lease_uri) and not list(read_only.iterdir())


def test_a_lease_in_a_folder_that_cannot_be_made_is_a_storage_error(read_only):
    """The folder is made first (the training output, a new run folder): refused, it was os.makedirs's raw error."""
    inner = read_only / "out"
    if os.access(read_only, os.W_OK):  # (Lease's own open() refused: the folder can be made)
        pytest.skip("the folder cannot be made read-only here")
    _storage_error(lambda: Lease(Store(str(inner)), f"output={inner}").acquire(), f"{inner}/_lease.json", "write")
    assert not inner.exists()
