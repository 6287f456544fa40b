"""One process at a time in a folder: a lease file with an owner and a heartbeat.

    with hold(store, cfg.storage, "run folder s3://b/runs/x"):   # <folder>/_lease.json
        ...                                                     # the audit's stages

Two identical audits started into one run folder would otherwise both compute everything. Their
results would agree (units are deterministic and written atomically, settings are claimed: see
memex/storage.py), so the lease saves compute and confusion; correctness never depends on it.

The lease file (`_lease.json`: pyarrow and the stages skip `_` names) records the owner (host, pid,
start time, command) and a heartbeat time that a daemon thread rewrites every `timeout_s / 5`
seconds (at most every 60 s). Another process that finds it:
  * refuses, naming the owner, since when and how to take over (`LeaseHeld`), or with
    `wait_s` > 0 (storage.lease_wait_s) polls until it is free or that time has passed;
  * takes it over when it is stale: no heartbeat for `timeout_s` (storage.lease_timeout_s), or at
    once when the owner ran on this same machine (hostname, boot id and pid namespace all equal)
    and its pid is gone (a crashed or killed audit never blocks a rerun on its own machine).
Heartbeat times are the owner's clock: hosts that share a folder need clocks within a fraction
of `timeout_s` (NTP). The lease is deleted on exit, on error too; a process killed with SIGKILL
leaves it behind, to be taken over as above.

How "create if absent" is made atomic:
  * local disk: the record is written to a temp file and hard-linked to the lease name (`link`
    fails when the name exists), so a reader never sees a half-written lease;
  * S3 (s3fs): conditional writes: put_object with If-None-Match: * creates, If-Match: <ETag>
    takes a stale lease over and refreshes the heartbeat (compare-and-swap), delete with If-Match
    releases. AWS S3 and MinIO support them; a server that answers 501 gets the fallback below;
  * any other filesystem (and S3 servers without conditional writes): exists? -> write -> wait
    `settle_s` -> read back and check the nonce. Two processes that both find the folder free
    within a few milliseconds of each other can both win; the settle time makes the later writer
    win, unless it wrote more than `settle_s` after the first one read back.
Taking a stale lease over off S3 re-reads it just before deleting it: two processes taking over
the same stale lease in the same instant can both go on. A holder whose lease was taken over
(it stalled for longer than timeout_s) logs an error at its next heartbeat and carries on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Iterator, NoReturn

from fsspec.implementations.local import LocalFileSystem

from memex.storage import StorageError, Store, client_error, store_failed

log = logging.getLogger("memex.lease")
LEASE_NAME = "_lease.json"
DEFAULT_TIMEOUT_S = 300.0
_live: set[str] = set()  # nonces of the leases this process holds now


class LeaseHeld(StorageError):
    """Another live process holds the lease."""


def _machine() -> str:
    """This machine and pid namespace: pids mean the same process only where this is equal."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _precondition_failed(e: BaseException) -> bool:
    """s3fs's translation of S3's 412 (If-Match / If-None-Match did not hold)."""
    if isinstance(e, FileExistsError):
        return True
    cause = getattr(e, "__cause__", None)
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
        return True
    return code is None and getattr(e, "errno", None) == errno.EINVAL and "pre-condition" in str(e)


def _not_implemented(e: BaseException) -> bool:
    cause = getattr(e, "__cause__", None)
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code in ("NotImplemented", "501") or getattr(e, "errno", None) == errno.ENOSYS


class Lease:
    """The lease `<store>/_lease.json` on one folder. `acquire()` takes it (or raises `LeaseHeld`),
    a daemon thread keeps its heartbeat fresh, `release()` deletes it; also a context manager."""

    def __init__(self, store: Store, what: str, timeout_s: float = DEFAULT_TIMEOUT_S, wait_s: float | None = 0.0,
                 heartbeat_s: float | None = None, name: str = LEASE_NAME, settle_s: float = 1.0):
        """`what`: the folder in messages ("run folder s3://..."). `wait_s`: how long to wait for a
        live holder (0: refuse at once; None: as long as it lives)."""
        if timeout_s <= 0:
            raise ValueError("lease timeout_s must be > 0")
        self.store, self.what, self.timeout_s, self.wait_s = store, what, float(timeout_s), wait_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(60.0, self.timeout_s / 5)
        self.settle_s = settle_s
        self.path = store.join(name)
        self.local = isinstance(store.fs, LocalFileSystem)
        protocols = store.fs.protocol if isinstance(store.fs.protocol, (tuple, list)) else (store.fs.protocol,)
        self.conditional = "s3" in protocols  # S3 conditional writes (off again on a 501)
        self.nonce = uuid.uuid4().hex
        self.record: dict[str, Any] = {}
        self.etag: str | None = None  # S3: the ETag of our last write (compare-and-swap)
        self.lost = threading.Event()  # set when another process took the lease over
        self._active = False  # held: between acquire and release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()

    # ---- the record --------------------------------------------------------------------------
    def _new_record(self) -> dict:
        now = time.time()
        return {"host": socket.gethostname(), "pid": os.getpid(), "machine": _machine(),
                "started": _iso(now), "started_unix": now, "heartbeat": _iso(now), "heartbeat_unix": now,
                "timeout_s": self.timeout_s, "nonce": self.nonce,
                # the program only: its overrides may hold credentials (storage.options)
                "command": os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"}

    def _read(self) -> tuple[dict | None, str | None]:
        """The lease on storage and its ETag (S3); (None, None) when there is none. An unreadable
        lease counts as owned by nobody known, last beating when it was written."""
        self.store.fs.invalidate_cache(self.path)  # s3fs may answer info() from an old listing
        try:
            info = self.store.fs.info(self.path)
            data = self.store.read_bytes(self.path)
        except FileNotFoundError:
            return None, None
        except Exception as e:
            self._raise_refused("read", e)
        etag = info.get("ETag") if self.conditional else None
        try:
            rec = json.loads(data)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
            rec["heartbeat_unix"] = float(rec["heartbeat_unix"])
        except (ValueError, KeyError, TypeError):
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
            mtime = mtime.timestamp() if isinstance(mtime, dt.datetime) else float(mtime)
            rec = {"host": "?", "pid": None, "machine": "?", "started": "?", "heartbeat_unix": mtime,
                   "nonce": None, "unreadable": True}
        return rec, etag

    def _timeout(self, rec: dict) -> float:
        """Seconds without a heartbeat before `rec` may be taken over: the longer of this job's and its holder's."""
        return max(self.timeout_s, float(rec.get("timeout_s") or 0))

    def _stale(self, rec: dict, now: float | None = None) -> str | None:
        """Why `rec` may be taken over, or None while its owner lives."""
        age = (now or time.time()) - rec["heartbeat_unix"]
        # the holder's own timeout too: it beats every timeout / 5 (at most 60 s) of *its* timeout, so a job
        # with a shorter one took over a live holder between its beats
        timeout = self._timeout(rec)
        if age > timeout:
            return f"no heartbeat for {age:.0f} s (storage.lease_timeout_s={timeout:g}, the holder's or this job's)"
        if rec.get("machine") == _machine() and isinstance(rec.get("pid"), int):
            if not _pid_alive(rec["pid"]):
                return f"its process {rec['pid']} on this machine is gone"
            if rec["pid"] == os.getpid() and rec.get("nonce") not in _live:
                return "this process left it behind (its release failed)"
        return None

    def describe(self, rec: dict) -> str:
        age = time.time() - rec["heartbeat_unix"]
        if rec.get("unreadable"):
            return f"an unreadable lease file {self.store.uri_of(self.path)} (written {age:.0f} s ago)"
        cmd = f", running `{rec['command']}`" if rec.get("command") else ""
        return (f"host {rec.get('host')} pid {rec.get('pid')} since {rec.get('started')}{cmd} "
                f"(last heartbeat {age:.0f} s ago)")

    # ---- storage primitives ------------------------------------------------------------------
    def _raise_refused(self, verb: str, e: Exception) -> NoReturn:
        """Raise `e` (being handled) as a StorageError naming the lease file when the folder or the store refused
        the request: a read-only folder or mount, another user's folder (EACCES, EPERM, EROFS), an S3 error past
        its retries. They were raised raw: `memex train` into a read-only output folder printed a 39-line traceback
        where every Store write names the folder and what to check. A lease there or not (FileExistsError,
        FileNotFoundError) is the caller's to tell, and is raised as it is."""
        if isinstance(e, (FileExistsError, FileNotFoundError)) or not (isinstance(e, OSError) or client_error(e)):
            raise e
        raise StorageError(store_failed(verb, self.store.uri_of(self.path), e)) from e

    def _create(self, data: bytes) -> bool:
        """Create the lease file if absent, atomically where the filesystem allows; True if created."""
        if self.local:
            try:
                return self._create_local(data)
            except OSError as e:
                self._raise_refused("write", e)
        fs = self.store.fs
        if self.conditional:
            # a HEAD first: an S3-compatible store that ignores If-None-Match (no 412, no 501) let the PUT replace
            # a live holder's lease, and both jobs worked in one folder; now no worse than the fallback below
            if self.store.exists(self.path):
                return False
            try:
                self.etag = fs.pipe_file(self.path, data, mode="create").get("ETag")
                fs.invalidate_cache(self.path)
                return True
            except Exception as e:  # noqa: BLE001 - classified below
                if _precondition_failed(e):
                    return False
                if not _not_implemented(e):
                    self._raise_refused("write", e)
                self._no_conditional(e, "writes")
        if self.store.exists(self.path):
            return False
        self.store.write_bytes(self.path, data)
        return True

    def _create_local(self, data: bytes) -> bool:
        """_create on local disk: the record written to a temp file, hard-linked to the lease name."""
        self.store.mkdirs(self.store.path)
        tmp = self.store.join(f"_tmp-{uuid.uuid4().hex}{LEASE_NAME}")
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network filesystems): exclusive open
            try:
                with open(self.path, "xb") as f:
                    f.write(data)
                return True
            except FileExistsError:
                return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _replace(self, data: bytes, etag: str | None) -> bool:
        """Overwrite the lease (a takeover or a heartbeat): on S3 only if it still has `etag`."""
        if self.conditional:
            try:
                self.etag = self.store.fs.pipe_file(self.path, data, IfMatch=etag).get("ETag")
                self.store.fs.invalidate_cache(self.path)
                return True
            except Exception as e:  # noqa: BLE001 - classified below
                if _precondition_failed(e) or isinstance(e, FileNotFoundError):
                    return False
                if not _not_implemented(e):
                    self._raise_refused("write", e)
                # a store with If-None-Match but not If-Match (some S3-compatible ones): every heartbeat
                # failed, so the live lease went stale and was taken over, and the release failed too
                self._no_conditional(e, "overwrite")
        self.store.write_bytes(self.path, data)
        return True

    def _no_conditional(self, e: BaseException, what: str) -> None:
        log.warning("%s: the store has no conditional %s (%s); the lease falls back to write and read back",
                    self.store.uri, what, e)
        self.conditional = False

    def _delete(self, etag: str | None) -> None:
        fs = self.store.fs
        if self.conditional:
            bucket, key, _ = fs.split_path(self.path)
            with contextlib.suppress(FileNotFoundError):
                try:
                    fs.call_s3("delete_object", Bucket=bucket, Key=key, **({"IfMatch": etag} if etag else {}))
                    fs.invalidate_cache(self.path)
                    return
                except Exception as e:  # noqa: BLE001
                    if _precondition_failed(e):
                        fs.invalidate_cache(self.path)
                        return
                    if not _not_implemented(e):
                        self._raise_refused("delete", e)
                    self._no_conditional(e, "delete")
            fs.invalidate_cache(self.path)
        try:
            fs.rm_file(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self._raise_refused("delete", e)

    def _mine(self) -> bool:
        if not self.conditional and not self.local:
            time.sleep(self.settle_s)  # the window in which a racing writer's record can still land
        rec, etag = self._read()
        if rec is None or rec.get("nonce") != self.nonce:
            return False
        if self.conditional:
            self.etag = etag
        return True

    # ---- acquire / heartbeat / release -------------------------------------------------------
    def try_acquire(self) -> dict | None:
        """Take the lease if free or stale; returns None when taken, else the live holder's record."""
        for _ in range(10):  # each pass changes the state seen (created, deleted, taken over)
            self.record = self._new_record()
            data = json.dumps(self.record, indent=2).encode()
            if self._create(data):
                if self._mine():
                    return None
                continue
            rec, etag = self._read()
            if rec is None:
                continue  # released meanwhile
            if rec.get("nonce") == self.nonce:  # our write landed, its reply was lost (the retry found it)
                self.etag = etag
                return None
            why = self._stale(rec)
            if why is None:
                return rec
            log.warning("%s: taking over the lease of %s: %s", self.what, self.describe(rec), why)
            if self.conditional:
                if self._replace(data, etag):
                    return None
                continue
            again, _ = self._read()  # just before deleting: still the stale one?
            if again is not None and again.get("nonce") == rec.get("nonce") and self._stale(again):
                self._delete(None)
        rec, _ = self._read()
        if rec is None:
            raise StorageError(f"{self.what}: could not take the lease {self.store.uri_of(self.path)}")
        return rec

    def acquire(self) -> "Lease":
        deadline = None if self.wait_s is None else time.monotonic() + self.wait_s
        poll = min(5.0, max(0.05, self.heartbeat_s / 2))
        announced = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise LeaseHeld(self._refusal(holder))
            if not announced:
                log.warning("%s is in use by %s: waiting%s", self.what, self.describe(holder),
                            "" if deadline is None else f" up to {self.wait_s:g} s")
                announced = True
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
        self._active = True
        _live.add(self.nonce)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat_loop, name=f"memex-lease-{self.nonce[:8]}", daemon=True)
        self._thread.start()
        return self

    def _refusal(self, rec: dict) -> str:
        return (f"{self.what} is in use by {self.describe(rec)}: another audit works in it. Wait for it to "
                "finish (storage.lease_wait_s=SECONDS waits), or use another run.name. If that process is gone, "
                f"its lease is taken over {self._timeout(rec):g} s after its last heartbeat (storage.lease_timeout_s, "
                "the holder's or this job's, the longer), "
                f"at once on its own machine; to take over now, delete {self.store.uri_of(self.path)}.")

    def beat(self) -> bool:
        """Refresh the heartbeat; False (and `lost` set) when another process took the lease over."""
        with self._write_lock:
            if not self._active or self.lost.is_set():
                return False
            now = time.time()
            rec = {**self.record, "heartbeat": _iso(now), "heartbeat_unix": now}
            data = json.dumps(rec, indent=2).encode()
            current, etag = self._read()
            ok = current is not None and current.get("nonce") == self.nonce
            if ok and self.conditional:
                # compare-and-swap on the ETag just read (ours: a put whose answer was lost counts too)
                ok = self._replace(data, etag)
                if not ok:  # still ours: the write landed and its reply was lost
                    current, _ = self._read()
                    ok = current is not None and current.get("nonce") == self.nonce
            elif ok:
                self._replace(data, None)
            if ok:
                self.record = rec
                return True
            log.error("%s: the lease was taken over by %s while this process worked (no heartbeat for "
                      "storage.lease_timeout_s?): both now compute the same units", self.what,
                      self.describe(current) if current else "nobody (deleted)")
            self.lost.set()
            return False

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.beat():
                    return
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried; the work goes on
                log.warning("%s: lease heartbeat failed (%s: %s); retrying", self.what, type(e).__name__, e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        _live.discard(self.nonce)
        with self._write_lock:
            active, self._active = self._active, False
            if not active or self.lost.is_set():
                return
            rec, etag = self._read()
            if rec is not None and rec.get("nonce") == self.nonce:
                self._delete(etag)  # S3: only while it still has that ETag

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        try:
            self.release()
        except Exception as e:  # noqa: BLE001 - the work is done (or its own error matters more): the
            # lease left behind goes stale, and is taken over at once on this machine once this process is gone
            log.warning("%s: could not release the lease %s (%s: %s)", self.what, self.store.uri_of(self.path),
                        type(e).__name__, e)


def live_holder(store: Store, storage_cfg: Any, what: str) -> str | None:
    """Who holds `<store>/_lease.json` now, described, or None when nobody live does (no lease, or a
    stale one). Reads only: a re-match checks that no audit is still writing its source folder."""
    lease = Lease(store, what, getattr(storage_cfg, "lease_timeout_s", DEFAULT_TIMEOUT_S))
    rec, _ = lease._read()
    return None if rec is None or lease._stale(rec) else lease.describe(rec)


# leases this process holds, per folder and thread: a stage inside an audit re-enters the audit's
_held: dict[tuple[str, int], list] = {}
_held_lock = threading.Lock()
FROM_CONFIG: Any = object()  # hold(): wait storage.lease_wait_s


@contextlib.contextmanager
def hold(store: Store, storage_cfg: Any, what: str, wait_s: float | None = FROM_CONFIG) -> Iterator[Lease]:
    """Hold `<store>/_lease.json` for the block, with storage.lease_timeout_s and (unless `wait_s`
    is given) storage.lease_wait_s. Re-entrant within a thread: `generate.run` inside an audit
    uses the audit's lease."""
    key = (store.uri, threading.get_ident())
    with _held_lock:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield entry[0]
        finally:
            with _held_lock:
                entry[1] -= 1
        return
    timeout = getattr(storage_cfg, "lease_timeout_s", DEFAULT_TIMEOUT_S)
    wait = getattr(storage_cfg, "lease_wait_s", 0.0) if wait_s is FROM_CONFIG else wait_s
    with Lease(store, what, timeout, wait) as lease:
        with _held_lock:
            _held[key] = [lease, 1]
        try:
            yield lease
        finally:
            with _held_lock:
                _held.pop(key, None)
