"""Faults a run must survive, on a real local Ray head and a moto S3 behind a faulty proxy.

  * an actor of the generation pool SIGKILLed in the middle of a shard: Ray restarts it, the shard
    is redone, the samples equal a run that was never interrupted, byte for byte;
  * the worker of a Ray task (the filter stage) SIGKILLed in the middle of its unit: the task is
    retried and the candidates equal an uninterrupted run's;
  * S3 throttling (503 SlowDown), server errors (500 InternalError) and lost replies (written, but
    the client saw a 500) on writes, multipart uploads included: retried, nothing lost, nothing
    half-visible;
  * writes that keep failing: the stage fails naming the bucket and path, and a rerun without
    faults completes the run as if nothing had happened.

A unit is held (a closure around the real worker, shipped to Ray by value) only to know which
process to kill and to kill it while the unit is in flight; the units themselves are the stage's.
"""

from __future__ import annotations

import http.client
import os
import posixpath
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from memex import runner
from memex.layout import RunLayout
from memex.prompts import prompt_id
from memex.stages import filter as filter_stage
from memex.stages import generate
from memex.storage import StorageError, Store

from conftest import blocky, compose, plant_run

PROMPTS = ["a red apple", "a lighthouse at dusk", "blue logo"]
N_PER_PROMPT, SHARD = 4, 2  # 12 samples in 6 shards of one UNet batch each
N_SHARDS = len(PROMPTS) * N_PER_PROMPT // SHARD
EXPECTED_IDS = {f"{prompt_id(p)}/{i}" for p in PROMPTS for i in range(N_PER_PROMPT)}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def _overrides(tiny_models, prompt_file, root, *extra):
    return ["model=local", f"model.path={tiny_models['pixel_text']}", "prompts=file", f"prompts.path={prompt_file}",
            f"storage.root={root}", "sampling.num_inference_steps=4", f"sampling.batch_size={SHARD}",
            f"sampling.samples_per_prompt={N_PER_PROMPT}", f"sampling.shard_size={SHARD}", *extra]


def _s3_overrides(tiny_models, prompt_file, bucket, endpoint, *extra):
    return _overrides(tiny_models, prompt_file, f"s3://{bucket}/runs", "storage=s3", "+storage.options.key=testing",
                      "+storage.options.secret=testing", f"storage.options.client_kwargs.endpoint_url={endpoint}",
                      *extra)


def _generate(cfg) -> dict:
    return generate.run(cfg, generate.prepare(cfg))


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by("sample_id")


@pytest.fixture(scope="module")
def reference(ray_head, tiny_models, prompt_file, tmp_path_factory) -> pa.Table:
    """The samples of a run that nothing interrupted (local disk), sorted by sample id."""
    root = tmp_path_factory.mktemp("reference")
    s = _generate(compose(_overrides(tiny_models, prompt_file, root, "run.name=ref")))
    assert (s["shards"], s["rows"]) == (N_SHARDS, len(EXPECTED_IDS))
    return _sorted(RunLayout(str(root), "ref").samples.read())


def _check_samples(table: pa.Table, reference: pa.Table) -> None:
    """Every expected sample exactly once, and every column (PNG bytes included) as the reference's."""
    ids = table["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)), "duplicate rows"
    assert set(ids) == EXPECTED_IDS, f"missing {EXPECTED_IDS - set(ids)}, unexpected {set(ids) - EXPECTED_IDS}"
    table = _sorted(table)
    for name in reference.column_names:
        assert table[name].equals(reference[name]), f"column {name} differs from the uninterrupted run"


def _final_names_only(fs, folder: str, n_units: int, suffix: str = ".parquet", temp_left: bool = False) -> None:
    """The stage folder holds the final names only: each unit's file and marker, _SUCCESS.json, and
    no temp file left behind (nothing half-written is visible). `temp_left`: a `_tmp-` file, or a
    marked unit's start count (`_attempts/`), whose delete failed for good may stay (readers skip
    `_` names; the check below proves it)."""
    fs.invalidate_cache()
    found = {p[len(folder.rstrip("/")) + 1:] for p in fs.find(folder)}
    if temp_left:
        found = {p for p in found if not posixpath.basename(p).startswith("_tmp-") and not p.startswith("_attempts/")}
    expected = ({f"shard-{i:06d}{suffix}" for i in range(n_units)}
                | {f"_markers/shard-{i:06d}.json" for i in range(n_units)} | {"_SUCCESS.json"})
    assert found - {"_settings.json"} == expected, sorted(found ^ expected)


def _wait_for(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class InThread:
    """A stage run in a thread of this driver, so the test can kill a worker while it runs."""

    def __init__(self, fn, *args):
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self.thread.start()

    def _run(self, fn, *args):
        try:
            self.result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the stage did not finish within {timeout:.0f}s"
        if self.error is not None:
            raise self.error
        return self.result


def _ship_this_module_by_value() -> None:
    """The held worker below is a closure over this test module, which Ray's workers cannot
    import (tests/ is not on their path): pickle the module's functions by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _hold(flags: Path, index: int, held: int) -> None:
    """In a worker: record this process as running unit `index`; the first time unit `held` runs,
    wait (for the SIGKILL) until the test says the kill is done."""
    flags.joinpath(f"started-{index}-{os.getpid()}").touch()
    if index == held:
        deadline = time.time() + 180
        while not flags.joinpath("killed").exists() and time.time() < deadline:
            time.sleep(0.05)


def _started(flags: Path, index: int) -> list[int]:
    return sorted(int(p.name.rsplit("-", 1)[1]) for p in flags.glob(f"started-{index}-*"))


def _kill_held(flags: Path, folder, held: int) -> int:
    """SIGKILL the process holding unit `held` (in flight, nothing of it written), then let the
    retried unit through. Returns the killed pid."""
    import psutil

    (pid,) = _wait_for(lambda: _started(flags, held), 300, f"unit {held} to start")
    assert psutil.Process(pid).name().startswith("ray::"), psutil.Process(pid).cmdline()  # a Ray worker
    assert not folder.is_complete(held)
    os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 30,
              f"worker {pid} to die")
    flags.joinpath("killed").touch()
    return pid


def test_actor_killed_mid_shard_is_restarted_and_rows_match(ray_head, tiny_models, prompt_file, tmp_path,
                                                            reference, monkeypatch):
    flags = tmp_path / "flags"
    flags.mkdir()

    real_pool = runner.run_actor_pool

    def held_pool(folder, units, worker_cls, worker_kwargs, resources):
        class Held:  # around the stage's own worker (GenerateShards): defined here, Ray ships it by value
            def __init__(self, **kwargs):
                self.worker = worker_cls(**kwargs)

            def __call__(self, index, **unit):
                out = self.worker(index, **unit)  # the shard is generated, then the actor dies
                _hold(flags, index, held=2)
                return out

        return real_pool(folder, units, Held, worker_kwargs, resources)

    _ship_this_module_by_value()
    monkeypatch.setattr(runner, "run_actor_pool", held_pool)
    cfg = compose(_overrides(tiny_models, prompt_file, tmp_path / "runs", "run.name=killed"))
    layout = RunLayout(cfg.storage.root, "killed")
    stage = InThread(_generate, cfg)
    killed = _kill_held(flags, layout.samples, held=2)
    s = stage.join(300)

    assert (s["shards"], s["generated_shards"], s["rows"]) == (N_SHARDS, N_SHARDS, len(EXPECTED_IDS))
    again = _started(flags, 2)
    assert len(again) == 2 and killed in again, again  # the unit ran again, in a new (restarted) actor process
    _check_samples(layout.samples.read(), reference)
    _final_names_only(layout.store.fs, layout.samples.path, N_SHARDS)


def test_task_worker_killed_mid_unit_is_retried(ray_head, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    varied = [blocky(rng) for _ in range(6)]
    samples = {"copies": [np.clip(varied[0].astype(int) + rng.integers(-2, 3, varied[0].shape), 0, 255)
                          .astype(np.uint8) for _ in range(6)],
               "varied": varied}
    for name in ("plain", "killed"):
        plant_run(tmp_path / "runs", name, samples, shard_size=4)
    cfg = compose([f"storage.root={tmp_path / 'runs'}", "model.path=/planted", "filter.prompts_per_task=1",
                   "filter.min_clique=5", f"resources.address={ray_head.address}"], config_name="audit")
    plain = filter_stage.run(cfg, "plain")

    flags = tmp_path / "flags"
    flags.mkdir()
    real_tasks = runner.run_tasks

    def held_tasks(folder, units, fn, resources, gpu=True, **shared):
        def held(index, **kwargs):  # around the stage's own unit (filter_chunk): Ray ships it by value
            _hold(flags, index, held=1)
            return fn(index, **kwargs)

        return real_tasks(folder, units, held, resources, gpu, **shared)

    _ship_this_module_by_value()
    monkeypatch.setattr(runner, "run_tasks", held_tasks)
    layout = RunLayout(cfg.storage.root, "killed")
    stage = InThread(filter_stage.run, cfg, "killed")
    killed = _kill_held(flags, layout.candidates, held=1)
    s = stage.join(300)

    assert s == plain and (s["prompts"], s["flagged"]) == (2, 1)
    again = _started(flags, 1)
    assert len(again) == 2 and killed in again, again  # retried in another worker process
    assert layout.candidates.read().equals(RunLayout(cfg.storage.root, "plain").candidates.read())
    _final_names_only(layout.store.fs, layout.candidates.path, 2)


# ---- S3 faults ---------------------------------------------------------------------------------

ERRORS = {503: ("SlowDown", "Please reduce your request rate."),
          500: ("InternalError", "We encountered an internal error. Please try again.")}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
              "expect", "content-length"}


class FaultyS3:
    """An HTTP proxy on 127.0.0.1 in front of moto that fails chosen write requests (PUT, POST,
    DELETE: uploads, multipart steps, copies, deletes) the way S3 does.

    `rule(n, method, target) -> None | (status, forward)` decides the n-th write (0-based):
    None forwards it; (503|500, False) answers an S3 XML error without forwarding (throttled,
    failed); (500, True) forwards it and then answers 500 all the same (written, reply lost)."""

    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.rule = lambda n, method, target: None
        self.lock = threading.Lock()
        self.writes = 0
        self.faults: list[tuple[str, str, int, bool]] = []  # (method, target, status, forwarded)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as botocore expects

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response_only(status)
                for k, v in headers:
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                if self.command == "HEAD":
                    length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                    self.send_header("Content-Length", length)
                    self.end_headers()
                else:
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def _error(self, status: int) -> None:
                code, msg = ERRORS[status]
                body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{msg}</Message>'
                        f"<Resource>{self.path}</Resource><RequestId>faulty-s3</RequestId></Error>").encode()
                self._reply(status, [("Content-Type", "application/xml")], body)

            def _handle(self) -> None:
                body = self._body()
                fault = None
                if self.command in ("PUT", "POST", "DELETE"):
                    with proxy.lock:
                        fault = proxy.rule(proxy.writes, self.command, self.path)
                        proxy.writes += 1
                        if fault:
                            proxy.faults.append((self.command, self.path, *fault))
                if fault and not fault[1]:
                    return self._error(fault[0])
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if fault:
                    return self._error(fault[0])
                self._reply(resp.status, resp.getheaders(), data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty_s3(s3_server):
    proxy = FaultyS3(s3_server["client_kwargs"]["endpoint_url"])
    yield proxy
    proxy.close()


def every_third_write(n: int, method: str, target: str):
    """One write in three fails, cycling through throttling, a server error and a lost reply.
    A lost reply only on PUT and DELETE (idempotent): a retried POST CompleteMultipartUpload
    after a lost reply finds no upload on moto (AWS answers such a retry with success)."""
    if n % 3 != 1:
        return None
    kind = ((503, False), (500, False), (500, True))[(n // 3) % 3]
    if kind[1] and method == "POST":
        return (500, False)
    return kind


def _moto_fs(s3_server):
    import s3fs

    return s3fs.S3FileSystem(**s3_server, skip_instance_cache=True)


def test_multipart_writes_survive_throttling_and_server_errors(faulty_s3, s3_server, bucket):
    """Store.write_table of a file larger than the block size goes up in parts (create, parts,
    complete, then the move into place): every kind of step fails once and is retried."""
    faulty_s3.rule = every_third_write
    options = {"key": "testing", "secret": "testing", "default_block_size": 5 * 2**20,
               "client_kwargs": {"endpoint_url": faulty_s3.url, "region_name": "us-east-1"}}
    store = Store(f"s3://{bucket}/mp", options)
    payload = np.random.default_rng(0).integers(0, 256, 13 * 2**20, dtype=np.uint8).tobytes()  # incompressible
    table = pa.table({"blob": [payload[i: i + 2**20] for i in range(0, len(payload), 2**20)]})
    store.write_table(store.join("big.parquet"), table)
    store.write_bytes(store.join("small.json"), b"{}")

    methods = {(m, "uploadId" in t or "uploads" in t) for m, t, _, _ in faulty_s3.faults}
    assert {("PUT", True), ("POST", True)} <= methods, faulty_s3.faults  # part uploads and multipart steps failed
    fs = _moto_fs(s3_server)
    assert sorted(fs.ls(f"{bucket}/mp")) == [f"{bucket}/mp/big.parquet", f"{bucket}/mp/small.json"]
    assert Store(f"s3://{bucket}/mp", s3_server).read_table(store.join("big.parquet")).equals(table)


def test_generate_to_s3_survives_throttling_and_server_errors(ray_head, tiny_models, prompt_file, faulty_s3,
                                                               s3_server, bucket, reference):
    faulty_s3.rule = every_third_write
    cfg = compose(_s3_overrides(tiny_models, prompt_file, bucket, faulty_s3.url, "run.name=flaky"))
    s = _generate(cfg)

    assert (s["shards"], s["generated_shards"], s["rows"]) == (N_SHARDS, N_SHARDS, len(EXPECTED_IDS))
    statuses = {(status, fwd) for _, _, status, fwd in faulty_s3.faults}
    assert statuses == {(503, False), (500, False), (500, True)}, faulty_s3.faults
    assert len(faulty_s3.faults) >= 10  # the actors' writes failed too, not only the driver's
    fs = _moto_fs(s3_server)
    folder = f"{bucket}/runs/flaky/samples"
    _final_names_only(fs, folder, N_SHARDS)
    _check_samples(RunLayout(f"s3://{bucket}/runs", "flaky", s3_server).samples.read(), reference)


def test_persistent_write_failures_fail_the_stage_naming_the_path_and_a_rerun_completes(
        ray_head, tiny_models, prompt_file, faulty_s3, s3_server, bucket, reference):
    # fewer retries than the default (botocore 5 with backoff): the writes here fail for good
    cfg = compose(_s3_overrides(tiny_models, prompt_file, bucket, faulty_s3.url, "run.name=broken",
                                "+storage.options.config_kwargs.retries.max_attempts=1"))
    always = lambda n, method, target: (500, False) if method in ("PUT", "POST") else None  # noqa: E731

    # failing from the first write: refused before any work, naming the run folder
    faulty_s3.rule = always
    with pytest.raises(StorageError, match=f"s3://{bucket}/runs/broken"):
        generate.prepare(cfg)

    # failing from the middle of the stage: some shards are written, then every write fails
    faulty_s3.rule = lambda n, method, target: None
    run_name = generate.prepare(cfg)
    layout = RunLayout(f"s3://{bucket}/runs", run_name, s3_server)
    fs = _moto_fs(s3_server)
    markers = f"{bucket}/runs/broken/samples/_markers"

    def first_shards_then_faults():
        def shards_done():
            fs.invalidate_cache()
            return len(fs.glob(f"{markers}/shard-*.json")) >= 2

        _wait_for(shards_done, 300, "two shards")
        faulty_s3.rule = always

    flip = threading.Thread(target=first_shards_then_faults, daemon=True)
    flip.start()
    with pytest.raises(Exception) as failed:
        generate.run(cfg, run_name)
    flip.join(10)
    message = str(failed.value)
    assert f"StorageError: cannot write s3://{bucket}/runs/broken/samples/" in message, message
    # Ray Data stops a failed pool without waiting for the units its other actors hold: one still
    # generating would write its shard once the fault clears below, after `done` is counted (seen
    # once: 3 shards generated by the rerun, not 4). The CLI's driver exits with its actors.
    _wait_for(lambda: _no_pool_task_running(ray_head.dashboard), 120, "the failed stage's units in flight to end")
    layout.store.fs.invalidate_cache()
    done = layout.samples.complete()
    assert 2 <= len(done) < N_SHARDS and layout.samples.success() is None
    folder = f"{bucket}/runs/broken/samples"
    _whole_or_absent(fs, folder, reference)

    # the fault clears: the same command resumes, redoes only the missing shards, and matches
    faulty_s3.rule = lambda n, method, target: None
    s = _generate(cfg)
    assert (s["shards"], s["generated_shards"]) == (N_SHARDS, N_SHARDS - len(done))
    _final_names_only(fs, folder, N_SHARDS, temp_left=True)
    _check_samples(layout.samples.read(), reference)
    _check_samples(pds.dataset(folder, filesystem=fs, format="parquet").to_table(), reference)  # a plain reader


def _no_pool_task_running(dashboard: str) -> bool:
    """No unit of a stage's Ray Data actor pool (tasks 'MapWorker(MapBatches(_ActorUnits)).submit') runs on
    the session's head (named: another Ray on this machine would make the address ambiguous)."""
    from ray.util.state import list_tasks

    running = list_tasks(address=dashboard, filters=[("state", "=", "RUNNING")])
    return not [t for t in running if "MapBatches(_ActorUnits)" in t.name]


def _whole_or_absent(fs, folder: str, reference: pa.Table) -> None:
    """After a failed stage: every file is a final name, a `_tmp-` one (which readers skip) or the
    start count of a unit (`_attempts/`: kept for units in flight when the stage failed), every
    shard file there is whole (readable, the reference's rows), every marker has its shard."""
    fs.invalidate_cache()
    names = [p[len(folder) + 1:] for p in fs.find(folder)]
    final = re.compile(r"shard-\d{6}\.parquet|_markers/shard-\d{6}\.json")
    assert all(final.fullmatch(n) or re.fullmatch(r"_attempts/shard-\d{6}\.json", n)
               or posixpath.basename(n).startswith("_tmp-") for n in names), names
    shards = {n for n in names if n.endswith(".parquet") and not n.startswith("_")}
    assert {n.replace("_markers/", "").replace(".json", ".parquet") for n in names if final.fullmatch(n)
            and n.startswith("_markers/")} <= shards
    ref = {r["sample_id"]: r for r in reference.to_pylist()}
    for n in shards:
        for row in pq.read_table(f"{folder}/{n}", filesystem=fs).to_pylist():
            assert row == ref[row["sample_id"]], n
