"""The nightly ledger: one row per audited checkpoint and config, on any fsspec storage.

    <ledger root>/rows/<finished>-<weights hash>-<config hash>-<uuid>.parquet   LEDGER_SCHEMA, one row
    <ledger root>/announced/<weights hash>-<config hash>.json   an alarm row whose night printed its ALARM
    <ledger root>/announced/_since.json   rows finished before it count as announced (ledgers older than this)
    <ledger root>/announcing/<weights hash>-<config hash>.json   the job that pages an alarm row (its id)
    <ledger root>/announcing/_lease.json   held while a job claims rows (memex/lease.py), seconds
    <ledger root>/jobs/<job id>/_lease.json   a nightly job that claimed alarm rows, while it lives

Why one file per row: an object store has no append, and two audits that finish at once must not
overwrite each other's rows. Each row is written to a `_tmp-` name and moved into place (the
storage module's atomic write), under a name no other writer can pick, so concurrent appends never
collide and a reader never sees half a row; the whole ledger is one `pyarrow.dataset` read
(readers skip `_`-prefixed temp files). A row is ~5 kB: a year of nightly audits of ten
checkpoints is ~3,650 files, one listing and a few seconds to read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import posixpath
import uuid
from typing import Any, Iterator

import pyarrow as pa

from memex.layout import LEDGER_SCHEMA
from memex.lease import Lease, hold, live_holder
from memex.redact import redact
from memex.storage import Store

ALARMS = ("over_budget", "grew")  # the gate's outcomes that page (cli: exit 3)
DONE = ("ok", *ALARMS)  # outcomes of a finished audit; "error" is retried next night


class Ledger:
    def __init__(self, root: str, storage_options: dict | None = None):
        self.store = Store(root, storage_options)
        self.rows = self.store.join("rows")

    @property
    def uri(self) -> str:
        return self.store.uri

    def append(self, row: dict) -> str:
        """Write one row atomically; returns its file name."""
        row = redact(row)  # no credential in a row (URLs with user:password@, ...): memex/redact.py
        table = pa.Table.from_pylist([row], schema=LEDGER_SCHEMA)
        finished = (row.get("finished") or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%dT%H%M%S")
        name = f"{finished}-{row['weights_sha256'][:12]}-{row['config_sha256'][:12]}-{uuid.uuid4().hex[:8]}.parquet"
        self.store.write_table(posixpath.join(self.rows, name), table)
        return name

    def read(self) -> pa.Table:
        """Every row, oldest first; rows/ that cannot be listed (refused, a stale NFS handle) is a StorageError."""
        # s3fs (gcsfs, adlfs) cache a listing per process with no expiry: a job that read the ledger
        # at its start saw none of the rows other jobs wrote while it audited for hours
        self.store.fs.invalidate_cache(self.rows)
        # Store.listing, not fs.glob: glob answers [] when local disk or NFS refuses the listing (EACCES, ESTALE), and
        # an empty ledger re-audited every checkpoint and left the growth gate with no earlier row
        files = [f for f in self.store.listing(self.rows, "*.parquet") if not posixpath.basename(f).startswith("_")]
        if not files:
            return LEDGER_SCHEMA.empty_table()
        table = self.store.read_table(files, schema=LEDGER_SCHEMA)  # a damaged row file: named, with the fix
        return table.sort_by([("finished", "ascending"), ("location", "ascending")])

    # ---- alarms announced ----------------------------------------------------------------------
    # An alarm row is final (the checkpoint is not audited again), so a night that wrote one and then
    # failed (a later audit's storage error, a kill by cron's timeout) never printed its ALARM nor called
    # the webhook, and no later night did. A row's marker is written once its ALARM line is printed; a
    # row without one is announced again by the next night of its config.
    def _marker(self, row: dict) -> str:
        return self.store.join("announced", f"{row['weights_sha256']}-{row['config_sha256']}.json")

    def start_announcing(self) -> None:
        """Rows finished before the first night that keeps markers count as announced (their nights did)."""
        since = self.store.join("announced", "_since.json")
        if self.store.read_json(since) is None:
            self.store.write_json(since, {"since": dt.datetime.now(dt.timezone.utc).isoformat()})

    def unannounced(self, config_sha256: str, rows: list[dict] | None = None) -> list[dict]:
        """This config's alarm rows (over_budget, grew) that no night announced, oldest first."""
        since = self.store.read_json(self.store.join("announced", "_since.json"))
        if since is None:
            return []
        cut = dt.datetime.fromisoformat(since["since"])
        rows = self.read().to_pylist() if rows is None else rows
        alarms = [r for r in rows if r["config_sha256"] == config_sha256 and r["outcome"] in ALARMS
                  and r["finished"] is not None and r["finished"] >= cut.replace(microsecond=0)]
        return [r for r in alarms if not self.store.exists(self._marker(r))]

    def announced(self, row: dict) -> bool:
        """Whether a night printed this row's alarm (its weights and config: a retried row is the same alarm)."""
        return self.store.exists(self._marker(row))

    def mark_announced(self, rows: list[dict]) -> None:
        for r in rows:
            self.store.write_json(self._marker(r), redact({"location": r["location"], "announced":
                                                           dt.datetime.now(dt.timezone.utc).isoformat()}))

    # ---- who pages an alarm row (nights overlap) ---------------------------------------------------
    # A whole night's job audits for hours, and the next night's job starts meanwhile: it read the first
    # one's alarm rows as "ended before announcing them" and paged them, and then their own night paged
    # them again. Each alarm row is claimed by the job that pages it (announcing/<key>.json holds its id,
    # written before the row is appended), and that job holds jobs/<id>/_lease.json (heartbeat) from its
    # first claim until its alarms are marked. Another job takes a row over only when no live job claims
    # it: its night ended, or died, before its ALARM line. Claims are checked and written under
    # announcing/_lease.json, so two live nights never both take one dead night's row.
    def _claim(self, row: dict) -> str:
        return self.store.join("announcing", f"{row['weights_sha256']}-{row['config_sha256']}.json")

    @contextlib.contextmanager
    def claiming(self, storage_cfg: Any, wait_s: float = 120.0) -> Iterator[None]:
        """Hold the claims' lease for a block of checks and claims (raises LeaseHeld after `wait_s`)."""
        with hold(self.store.child("announcing"), storage_cfg, f"the alarm claims of ledger {self.uri}", wait_s):
            yield

    def job_lease(self, job: str, storage_cfg: Any) -> Lease:
        """The lease that says job `job` lives (acquire it before its first claim; release it once its
        alarms are marked announced)."""
        return Lease(self.store.child("jobs", job), f"nightly job {job} of ledger {self.uri}",
                     getattr(storage_cfg, "lease_timeout_s", 300.0), wait_s=0)

    def claimed_by_other(self, row: dict, job: str, storage_cfg: Any) -> str | None:
        """The id of the live job other than `job` that claims this row's alarm (it pages it), else None."""
        self.store.fs.invalidate_cache(self._claim(row))  # s3fs: a listing cached before another job claimed it
        claim = self.store.read_json(self._claim(row))
        other = (claim or {}).get("job")
        if not other or other == job:
            return None
        alive = live_holder(self.store.child("jobs", other), storage_cfg, f"nightly job {other}")
        return other if alive else None

    def claim(self, row: dict, job: str) -> None:
        """Record that job `job` pages this row's alarm (its weights and config: a retried row is the same alarm)."""
        self.store.write_json(self._claim(row), redact({"job": job, "location": row["location"], "claimed":
                                                        dt.datetime.now(dt.timezone.utc).isoformat()}))

    def known_hashes(self, rows: list[dict] | None = None) -> dict[tuple[str, str], str]:
        """(location, files signature) -> weights hash, from every row: a checkpoint whose files
        have not changed since it was hashed need not be read again. `rows`: an earlier read()."""
        rows = self.read().to_pylist() if rows is None else rows
        return {(r["location"], r["files_signature"]): r["weights_sha256"] for r in rows if r["files_signature"]}

    def audited(self, config_sha256: str, rows: list[dict] | None = None) -> dict[str, dict]:
        """weights hash -> the first finished (non-error) row for this config. `rows`: an earlier read()."""
        done: dict[str, dict] = {}
        for r in self.read().to_pylist() if rows is None else rows:
            if r["config_sha256"] == config_sha256 and r["outcome"] in DONE:
                done.setdefault(r["weights_sha256"], r)
        return done
