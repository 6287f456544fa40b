"""memex/lease.py: one process at a time in a run folder; stale and crashed holders are taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from memex.layout import RunLayout
from memex.lease import Lease, LeaseHeld, _machine, hold
from memex.storage import Store


@dataclass
class _Storage:  # the two StorageConfig keys hold() reads
    lease_timeout_s: float = 30.0
    lease_wait_s: float = 0.0


def _foreign(path, heartbeat_age: float, machine: str = "elsewhere/boot/pid:[1]", pid: int = 4242, **more) -> None:
    """A lease written by another machine whose last heartbeat was `heartbeat_age` seconds ago."""
    t = time.time() - heartbeat_age
    path.write_text(json.dumps({"host": "gpu-node-7", "pid": pid, "machine": machine, "nonce": "theirs",
                                "started": "2026-01-01 00:00:00 UTC", "started_unix": t, "heartbeat": "then",
                                "heartbeat_unix": t, "command": "memex audit", **more}))


def test_second_holder_is_refused_naming_the_owner_and_the_lease_is_released(tmp_path):
    store = RunLayout(str(tmp_path), "run").store
    with Lease(store, "run folder X", timeout_s=30):
        rec = json.loads((tmp_path / "run" / "_lease.json").read_text())
        assert rec["pid"] == os.getpid() and rec["machine"] == _machine()
        with pytest.raises(LeaseHeld, match=rf"run folder X is in use by host .* pid {os.getpid()} since .*"
                                            r"storage.lease_wait_s.*delete .*_lease.json"):
            Lease(store, "run folder X", timeout_s=30).acquire()
    assert not (tmp_path / "run" / "_lease.json").exists()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith("_tmp-")]
    with pytest.raises(RuntimeError, match="boom"):  # released on error too
        with Lease(store, "run folder X", timeout_s=30):
            raise RuntimeError("boom")
    assert not (tmp_path / "run" / "_lease.json").exists()


def test_a_stale_lease_is_taken_over_and_a_fresh_one_is_not(tmp_path):
    store = Store(str(tmp_path))
    _foreign(tmp_path / "_lease.json", heartbeat_age=5)
    with pytest.raises(LeaseHeld, match="gpu-node-7 pid 4242 since 2026-01-01 00:00:00 UTC, running `memex audit`"):
        Lease(store, "run folder X", timeout_s=30).acquire()
    _foreign(tmp_path / "_lease.json", heartbeat_age=60)  # crashed on another machine a minute ago
    with Lease(store, "run folder X", timeout_s=30) as lease:
        assert json.loads((tmp_path / "_lease.json").read_text())["nonce"] == lease.nonce
    assert not (tmp_path / "_lease.json").exists()


def test_a_lease_is_stale_by_the_holders_timeout_not_only_the_challengers(tmp_path):
    """The holder beats every min(60, its timeout / 5) s: at the default 300 s, every 60 s. A second job
    with storage.lease_timeout_s=45 took the live lease over whenever the last beat was 45-60 s old; the
    longer of the two timeouts decides now."""
    store = Store(str(tmp_path))
    _foreign(tmp_path / "_lease.json", heartbeat_age=50, timeout_s=300.0)
    with pytest.raises(LeaseHeld, match="gpu-node-7.*taken over 300 s after its last heartbeat"):  # not 45 s
        Lease(store, "run folder X", timeout_s=45).acquire()
    _foreign(tmp_path / "_lease.json", heartbeat_age=301, timeout_s=300.0)  # past the holder's own: taken over
    with Lease(store, "run folder X", timeout_s=45) as lease:
        assert json.loads((tmp_path / "_lease.json").read_text())["nonce"] == lease.nonce


def test_a_dead_process_on_this_machine_is_taken_over_at_once(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _foreign(tmp_path / "_lease.json", heartbeat_age=0, machine=_machine(), pid=int(done.stdout))
    with Lease(Store(str(tmp_path)), "run folder X", timeout_s=3600) as lease:
        assert json.loads((tmp_path / "_lease.json").read_text())["nonce"] == lease.nonce


def test_heartbeat_keeps_a_live_lease_fresh_and_a_waiter_gets_it_when_released(tmp_path):
    store = Store(str(tmp_path))
    first = Lease(store, "run folder X", timeout_s=1.0).acquire()  # heartbeat every 0.2 s
    t0 = json.loads((tmp_path / "_lease.json").read_text())["heartbeat_unix"]
    time.sleep(1.5)  # longer than the timeout: only the heartbeat keeps it from being stale
    assert json.loads((tmp_path / "_lease.json").read_text())["heartbeat_unix"] > t0
    with pytest.raises(LeaseHeld):
        Lease(store, "run folder X", timeout_s=1.0).acquire()
    threading.Timer(0.5, first.release).start()
    with Lease(store, "run folder X", timeout_s=1.0, wait_s=10) as second:  # waits for the release
        assert json.loads((tmp_path / "_lease.json").read_text())["nonce"] == second.nonce
    assert not first.lost.is_set()


def test_a_holder_whose_lease_was_taken_over_notices_and_leaves_the_new_one(tmp_path):
    store = Store(str(tmp_path))
    lease = Lease(store, "run folder X", timeout_s=30).acquire()
    _foreign(tmp_path / "_lease.json", heartbeat_age=0)  # another process took it over (we had stalled)
    assert not lease.beat() and lease.lost.is_set()
    lease.release()
    assert json.loads((tmp_path / "_lease.json").read_text())["nonce"] == "theirs"


def test_hold_is_reentrant_within_a_thread_only(tmp_path):
    store, cfg = Store(str(tmp_path / "run")), _Storage()
    with hold(store, cfg, "run folder X") as outer:
        with hold(Store(str(tmp_path / "run")), cfg, "run folder X") as inner:  # generate.run inside an audit
            assert inner is outer
        assert (tmp_path / "run" / "_lease.json").exists()
        errors = []
        t = threading.Thread(target=lambda: errors.append(pytest.raises(LeaseHeld, _enter, store, cfg)))
        t.start()
        t.join()
        assert errors
    assert not (tmp_path / "run" / "_lease.json").exists()


def _enter(store, cfg):
    with hold(store, cfg, "run folder X"):
        pass


def test_fallback_without_atomic_create_still_refuses(tmp_path):
    store = Store("memory://lease-test/run")
    with Lease(store, "run folder M", timeout_s=30, settle_s=0.01):
        with pytest.raises(LeaseHeld, match="run folder M is in use"):
            Lease(store, "run folder M", timeout_s=30, settle_s=0.01).acquire()
    assert not store.exists(store.join("_lease.json"))


def test_s3_conditional_writes(s3_server, bucket):
    store = Store(f"s3://{bucket}/runs/r1", s3_server)
    first = Lease(store, "run folder S", timeout_s=30).acquire()
    assert first.conditional  # moto answers If-None-Match / If-Match like S3
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
        Lease(Store(f"s3://{bucket}/runs/r1", s3_server), "run folder S", timeout_s=30).acquire()
    assert first.beat()
    first.release()
    assert not store.exists(store.join("_lease.json"))
    # a stale one (another machine, old heartbeat) is taken over by compare-and-swap on its ETag
    t = time.time() - 120
    store.fs.pipe_file(store.join("_lease.json"), json.dumps(
        {"host": "h", "pid": 1, "machine": "m", "started": "s", "heartbeat_unix": t, "nonce": "theirs"}).encode())
    with Lease(Store(f"s3://{bucket}/runs/r1", s3_server), "run folder S", timeout_s=30) as second:
        assert json.loads(store.fs.cat(store.join("_lease.json")))["nonce"] == second.nonce
        store.fs.pipe_file(store.join("_lease.json"), json.dumps(  # taken from us: the heartbeat notices
            {"host": "h", "pid": 1, "machine": "m", "started": "s", "heartbeat_unix": time.time(),
             "nonce": "theirs"}).encode())
        assert not second.beat()
    assert json.loads(store.fs.cat(store.join("_lease.json")))["nonce"] == "theirs"  # left to its owner


def test_a_store_with_conditional_create_only_keeps_the_lease_by_write_and_read_back(s3_server, bucket,
                                                                                   monkeypatch):
    """Some S3-compatible stores take If-None-Match (the create) and answer 501 to If-Match. Only the
    create fell back: every heartbeat failed (logged, retried), so the live lease went stale and another
    job took it over while this one worked, and the release failed. Now the overwrite and the delete
    fall back too, as the create does."""
    import errno

    store = Store(f"s3://{bucket}/runs/r1", s3_server)
    lease = Lease(store, "run folder P", timeout_s=30).acquire()
    assert lease.conditional
    fs, pipe, call = store.fs, store.fs.pipe_file, store.fs.call_s3

    def no_if_match(path, data, **kw):
        if "IfMatch" in kw:
            raise OSError(errno.ENOSYS, "501 Not Implemented: If-Match")
        return pipe(path, data, **kw)

    def no_conditional_delete(method, *a, **kw):
        if method == "delete_object" and "IfMatch" in kw:
            raise OSError(errno.ENOSYS, "501 Not Implemented: If-Match")
        return call(method, *a, **kw)

    monkeypatch.setattr(fs, "pipe_file", no_if_match)
    assert lease.beat() and not lease.conditional  # it used to raise, every heartbeat
    assert json.loads(fs.cat(store.join("_lease.json")))["nonce"] == lease.nonce
    lease.release()
    assert not store.exists(store.join("_lease.json"))
    lease = Lease(store, "run folder P", timeout_s=30).acquire()  # create still conditional; delete is not
    monkeypatch.setattr(fs, "call_s3", no_conditional_delete)
    lease.release()
    assert not store.exists(store.join("_lease.json"))


@pytest.mark.slow
def test_a_killed_holder_process_does_not_block_a_rerun(tmp_path):
    """A subprocess holds the run folder's lease: refused while it lives; after SIGKILL (no
    release, a fresh heartbeat left behind) the rerun on this machine takes it over at once."""
    code = ("import sys, time; from memex.storage import Store; from memex.lease import Lease; "
            f"Lease(Store({str(tmp_path)!r}), 'run folder X', timeout_s=3600).acquire(); print('held', flush=True); "
            "time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {p.pid} "):
            Lease(Store(str(tmp_path)), "run folder X", timeout_s=3600).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert json.loads((tmp_path / "_lease.json").read_text())["pid"] == p.pid  # left behind
    with Lease(Store(str(tmp_path)), "run folder X", timeout_s=3600) as lease:
        assert json.loads((tmp_path / "_lease.json").read_text())["nonce"] == lease.nonce


def test_generate_run_refuses_a_run_folder_another_process_works_in(tmp_path):
    """The stage's hook: generate.run (and so `memex generate`, and every audit round) takes the
    run folder's lease before any work; a live holder is named, nothing is generated."""
    from memex.stages import generate

    from conftest import compose

    layout = RunLayout(str(tmp_path), "r1")
    layout.store.write_json(layout.run_json, {})
    _foreign(tmp_path / "r1" / "_lease.json", heartbeat_age=1)
    cfg = compose(["model.path=/nowhere", f"storage.root={tmp_path}"])
    with pytest.raises(LeaseHeld, match=r"run folder .*r1 is in use by host gpu-node-7 pid 4242"):
        generate.run(cfg, "r1")
    assert not (tmp_path / "r1" / "samples").exists()


def test_run_json_is_claimed_under_the_run_folders_lease(tmp_path, tiny_models):
    """generate.prepare read run.json, then wrote it, outside the lease: two jobs starting one run.name
    with other settings could both find none and both write theirs, the last one winning, and the job
    holding the lease then generated under the other's settings. Now the claim waits for the lease:
    a live holder is named and run.json is not written."""
    from memex.stages import generate

    from conftest import compose

    (tmp_path / "r1").mkdir()
    _foreign(tmp_path / "r1" / "_lease.json", heartbeat_age=1)  # another job, starting the same run name
    cfg = compose(["model=local", f"model.path={tiny_models['latent_text']}", f"storage.root={tmp_path}",
                   "run.name=r1"])
    with pytest.raises(LeaseHeld, match=r"run folder .*r1 is in use by host gpu-node-7 pid 4242"):
        generate.prepare(cfg)
    assert not (tmp_path / "r1" / "run.json").exists() and not (tmp_path / "r1" / "prompts.parquet").exists()
    (tmp_path / "r1" / "_lease.json").unlink()
    assert generate.prepare(cfg) == "r1" and (tmp_path / "r1" / "run.json").exists()
    assert not (tmp_path / "r1" / "_lease.json").exists()  # released


def test_own_leases_are_recognised_after_a_lost_reply_or_a_failed_release(tmp_path):
    store = Store(str(tmp_path))
    lease = Lease(store, "run folder X", timeout_s=3600)
    # our create landed but its reply was lost (S3: the retried If-None-Match put answers 412)
    _foreign(tmp_path / "_lease.json", heartbeat_age=0, machine=_machine(), pid=os.getpid())
    rec = json.loads((tmp_path / "_lease.json").read_text())
    (tmp_path / "_lease.json").write_text(json.dumps({**rec, "nonce": lease.nonce}))
    with lease:
        assert lease.beat()
    # left behind by this very process (a release that failed): not held by any live lease here
    (tmp_path / "_lease.json").write_text(json.dumps({**rec, "nonce": "orphan"}))
    with Lease(store, "run folder X", timeout_s=3600) as again:
        assert json.loads((tmp_path / "_lease.json").read_text())["nonce"] == again.nonce


def test_s3_lease_survives_throttling_and_lost_replies(s3_server, bucket):
    """Through tests/test_faults.py's faulty proxy (one write in three: 503, 500, or written with
    its reply lost, so botocore's retry of a conditional put meets its own first write)."""
    from test_faults import FaultyS3, every_third_write

    proxy = FaultyS3(s3_server["client_kwargs"]["endpoint_url"])
    proxy.rule = every_third_write
    opts = {**s3_server, "client_kwargs": {"endpoint_url": proxy.url, "region_name": "us-east-1"}}
    try:
        for i in range(2):  # 5+ writes each: every kind of fault comes up
            store = Store(f"s3://{bucket}/runs/r{i}", opts)
            with Lease(store, "run folder F", timeout_s=30) as lease:
                assert lease.beat() and lease.beat()
                with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
                    Lease(Store(f"s3://{bucket}/runs/r{i}", opts), "run folder F", timeout_s=30).acquire()
            assert not Store(f"s3://{bucket}/runs/r{i}", s3_server).exists(store.join("_lease.json"))
        assert {(status, fwd) for _, _, status, fwd in proxy.faults} == {(503, False), (500, False), (500, True)}
    finally:
        proxy.close()


def test_a_store_that_ignores_conditional_writes_does_not_overwrite_a_live_lease(s3_server, bucket, monkeypatch):
    """An S3-compatible store that silently ignores If-None-Match (no 412, no 501): the conditional create
    replaced a live holder's lease, the second job read its own nonce back and worked in the same folder
    (sweeping the first's temp files). A lease that is there is now seen before the PUT."""
    store = Store(f"s3://{bucket}/runs/r1", s3_server)
    pipe = store.fs.pipe_file
    monkeypatch.setattr(store.fs, "pipe_file", lambda path, data, mode="overwrite", **kw: pipe(path, data))
    first = Lease(store, "run folder I", timeout_s=30).acquire()
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
        Lease(Store(f"s3://{bucket}/runs/r1", s3_server), "run folder I", timeout_s=30).acquire()
    assert json.loads(store.fs.cat(store.join("_lease.json")))["nonce"] == first.nonce
    first.release()
