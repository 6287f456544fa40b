"""The nightly ledger: concurrent appends from several processes (local disk) and threads (S3 on
moto) all land, and a reader never sees a half-written row."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
from concurrent.futures import ThreadPoolExecutor

from memex.layout import LEDGER_SCHEMA
from memex.ledger import Ledger

N = 40


def _row(writer: int, i: int, outcome: str = "ok") -> dict:
    now = dt.datetime(2026, 11, 29, 2, 0, tzinfo=dt.timezone.utc)  # every row finishes "at once"
    return {"location": f"/ckpt/w{writer}/checkpoint-{i}", "series": f"/ckpt/w{writer}", "step": i, "base": "",
            "weights_sha256": f"{writer:04d}{i:060d}", "files_signature": "s" * 64, "config_sha256": "c" * 64,
            "run": f"runs/w{writer}-{i}",
            "report": f"runs/w{writer}-{i}/report/index.html", "samples": 8, "extracted": i % 3,
            "extracted_generations": i % 5, "flagged_prompts": 1, "started": now, "finished": now,
            "outcome": outcome, "message": ""}


def _append_many(root: str, writer: int) -> None:
    ledger = Ledger(root)
    for i in range(N):
        ledger.append(_row(writer, i))


def test_concurrent_appends_from_processes_all_land(tmp_path):
    root = str(tmp_path / "_nightly")
    procs = [mp.get_context("spawn").Process(target=_append_many, args=(root, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    table = Ledger(root).read()
    assert table.schema == LEDGER_SCHEMA and table.num_rows == 3 * N
    assert len(set(table["weights_sha256"].to_pylist())) == 3 * N


def test_concurrent_appends_on_s3_and_error_rows_are_not_audited(s3_server, bucket):
    root = f"s3://{bucket}/_nightly"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda w: [Ledger(root, s3_server).append(_row(w, i)) for i in range(N // 4)], range(4)))
    ledger = Ledger(root, s3_server)
    ledger.append(_row(9, 0, outcome="error"))
    assert ledger.read().num_rows == 4 * (N // 4) + 1
    done = ledger.audited("c" * 64)
    assert len(done) == 4 * (N // 4) and _row(9, 0)["weights_sha256"] not in done  # errors are retried
    assert ledger.audited("d" * 64) == {}


def test_rows_another_job_wrote_since_are_read_on_s3(s3_server, bucket):
    """s3fs keeps a listing per process with no expiry: a nightly job that read the ledger when it
    started then saw none of the rows other jobs wrote while it audited for hours (plan mode: every
    job starts at once), so the growth gate compared with an older step and a checkpoint another job
    had finished was audited again. Each read lists the bucket anew."""
    root = f"s3://{bucket}/_nightly_cache"
    ledger = Ledger(root, s3_server)
    ledger.append(_row(0, 0))
    assert ledger.read().num_rows == 1  # the listing is now in this process's s3fs cache
    other_job = Ledger(root, {**s3_server, "skip_instance_cache": True})  # another process's client
    other_job.append(_row(1, 0))
    assert ledger.read().num_rows == 2
    assert _row(1, 0)["weights_sha256"] in ledger.audited("c" * 64)
