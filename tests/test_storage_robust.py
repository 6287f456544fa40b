"""Storage under a folder path holding glob wildcards, a store that stops answering, and stage folders read
concurrently (memex/storage.py, memex/config.py).

S3 is moto's server on 127.0.0.1 (conftest's s3_server); the unreachable store is a closed 127.0.0.1 port."""

import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memex.config import ConfigError, StorageConfig, check_model_name, check_run_name, validate_storage
from memex.storage import StageFolder, StorageError, Store

from conftest import free_port

SCHEMA = pa.schema([("x", pa.int64()), ("name", pa.string())])


def _table(i: int, rows: int = 5) -> pa.Table:
    return pa.table({"x": np.arange(i * rows, (i + 1) * rows), "name": [f"u{i}-{r}" for r in range(rows)]},
                    schema=SCHEMA)


@pytest.mark.parametrize("root", ["runs[1]", "sd[ema]", "a*b", "what?"])
def test_a_stage_folder_under_a_root_with_glob_characters_completes(tmp_path, root):
    """`runs/sd[ema]` was a character class in complete()'s glob: the units and markers were written and none
    was found ("did not complete; rerun", every rerun); `a*b` also counted the units of a folder `aXb` beside it.
    The temp files of a killed write were never swept."""
    sibling = root.replace("*", "X").replace("?", "X")
    if sibling != root:  # a folder the wildcard matches: its unit 7 is not this folder's
        StageFolder(Store(str(tmp_path / sibling / "r")), "samples", schema=SCHEMA).write_shard(7, _table(7))
    store = Store(str(tmp_path / root / "r"))
    folder = StageFolder(store, "samples", schema=SCHEMA)
    for i in range(3):
        folder.write_shard(i, _table(i))
    assert folder.complete() == [0, 1, 2]
    assert folder.read().equals(pa.concat_tables([_table(i) for i in range(3)]))
    assert folder.is_complete(1) and folder.read_marker(2)["rows"] == 5
    (tmp_path / root / "r" / "samples" / "_tmp-abc-shard-000003.parquet").write_bytes(b"cut")
    (tmp_path / root / "r" / "samples" / "_attempts").mkdir()
    (tmp_path / root / "r" / "samples" / "_attempts" / "shard-000001.json").write_text("{}")
    (tmp_path / root / "r" / "_tmp-def-run.json").write_text("{")
    assert folder.sweep_temp() == 2 and store.sweep_temp("") == 1
    assert not list((tmp_path / root / "r").rglob("_tmp-*"))


def test_an_s3_root_with_glob_characters_writes_and_completes(s3_server, bucket):
    """s3fs's mv expanded the temp file's path as a glob: every atomic write under s3://bucket/runs[1] was a
    FileNotFoundError."""
    store = Store(f"s3://{bucket}/runs[1]/r", s3_server)
    folder = StageFolder(store, "samples", schema=SCHEMA)
    for i in range(2):
        folder.write_shard(i, _table(i))
    store.write_json(store.join("run.json"), {"a": 1})
    assert store.read_json(store.join("run.json")) == {"a": 1}
    assert folder.complete() == [0, 1]
    assert folder.read().num_rows == 10
    assert not [p for p in store.fs.find(f"{bucket}/") if "_tmp-" in p]  # each temp file removed after its copy
    head = store.fs.call_s3("head_object", Bucket=bucket, Key="runs[1]/r/run.json")
    assert head["ContentType"].startswith("application/json")  # (the copy keeps the temp file's)


@pytest.mark.parametrize("check,key", [(check_run_name, "run.name"), (check_model_name, "model.name")])
@pytest.mark.parametrize("name,chars,fix", [("a[1]", "[ ]", "a-1"), ("sd*", "*", "sd"), ("x?y", "?", "x-y")])
def test_run_and_model_names_with_glob_characters_are_refused_naming_the_key(check, key, name, chars, fix):
    with pytest.raises(ConfigError) as e:
        check(name)
    msg = str(e.value)
    assert msg.startswith(f"{key}={name} holds {chars}:") and f"e.g. {key}={fix}" in msg and "\n" not in msg
    check("sd-ema")  # (a plain name is fine)


def test_storage_root_with_glob_characters_is_refused(tmp_path, monkeypatch):
    """The rounds, the ledger's rows and the report's run list are found by glob in other modules too: a root
    holding a wildcard is refused before any work, also a relative one that resolves under such a folder."""
    with pytest.raises(ConfigError, match=r"^storage.root=s3://b/runs\[1\] holds \[ \].*storage.root=s3://b/runs-1"):
        validate_storage(StorageConfig(root="s3://b/runs[1]"))
    cwd = tmp_path / "proj[2]"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(ConfigError, match=r"^storage.root=runs \(.*proj\[2\]/runs\) holds \[ \]"):
        validate_storage(StorageConfig(root="runs"))
    validate_storage(StorageConfig(root=str(tmp_path / "runs")))


@pytest.fixture
def unreachable():
    """s3fs options for a store that does not answer: a closed port on 127.0.0.1, one attempt a request."""
    url = f"http://127.0.0.1:{free_port()}"
    return {"key": "testing", "secret": "testing", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}


def test_an_unreachable_store_is_a_storage_error_naming_the_uri_and_the_fix(unreachable):
    """botocore's EndpointConnectionError is no OSError: write_json, read_json, read_marker, complete() and
    read() let it out as a traceback, with no URI and no fix."""
    store = Store("s3://bucket/runs/r", unreachable)
    folder = StageFolder(store, "samples", schema=SCHEMA)
    calls = {"write_json": lambda: store.write_json(store.join("run.json"), {"a": 1}),
             "read_json": lambda: store.read_json(store.join("run.json")),
             "read_marker": lambda: folder.read_marker(0),
             "is_complete": lambda: folder.is_complete(0),
             "complete": folder.complete,
             "read": folder.read,
             "read_table": lambda: store.read_table([folder.file(0), folder.file(1)], schema=SCHEMA)}
    for what, call in calls.items():
        with pytest.raises(StorageError) as e:
            call()
        msg = str(e.value)
        assert "s3://bucket/runs/r" in msg and "EndpointConnectionError" in msg, (what, msg)
        assert "storage.options" in msg and "rerun" in msg and "finished units keep their markers" in msg, (what, msg)


class _InFlight:
    """Requests the moto server is answering at once: the most seen, and how many it answered."""

    def __init__(self, delay: float):
        self.delay, self.now, self.most, self.count, self.lock = delay, 0, 0, 0, threading.Lock()

    def wrap(self, call):
        def answer(app, environ, start_response):
            with self.lock:
                self.now += 1
                self.count += 1
                self.most = max(self.most, self.now)
            try:
                time.sleep(self.delay)  # a request's latency, so that overlapping requests overlap
                return call(app, environ, start_response)
            finally:
                with self.lock:
                    self.now -= 1
        return answer


@pytest.mark.parametrize("schema", [SCHEMA, None])
def test_a_stage_folder_on_s3_is_read_concurrently_as_the_same_table(s3_server, bucket, monkeypatch, schema):
    """read() opened the units one after another (pq.ParquetDataset: info, then open, per file): ~3 serial
    requests a shard, 100 minutes a read at 100,000 shards. The table is the same, in unit order."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication

    store = Store(f"s3://{bucket}/runs/r", s3_server)
    folder = StageFolder(store, "samples", schema=schema)
    for i in range(20):
        folder.write_shard(i, _table(i, rows=3 + i % 4))
    paths = [folder.file(i) for i in folder.complete()]
    before = pq.ParquetDataset(paths, filesystem=store.fs, schema=schema).read()  # the read before
    filtered = pq.ParquetDataset(paths, filesystem=store.fs, schema=schema,
                                 filters=[("x", ">", 20)]).read(columns=["name"])

    inflight = _InFlight(0.02)
    monkeypatch.setattr(DomainDispatcherApplication, "__call__", inflight.wrap(DomainDispatcherApplication.__call__))
    store.fs.invalidate_cache()
    assert folder.read().equals(before)
    assert inflight.most >= 4, f"at most {inflight.most} of {inflight.count} requests at once: read one by one"
    assert folder.read(columns=["name"], filters=[("x", ">", 20)]).equals(filtered)
    assert before.equals(pa.concat_tables([_table(i, rows=3 + i % 4) for i in range(20)]))  # (unit order)


def test_damaged_units_of_a_concurrent_read_are_each_named(tmp_path):
    """Every file is read alone now: the damaged ones are known, counted past the three named ("and maybe more"
    before, whatever their number)."""
    store = Store(str(tmp_path / "r"))
    folder = StageFolder(store, "samples", schema=SCHEMA)
    for i in range(20):
        folder.write_shard(i, _table(i))
    for i in (3, 7, 11, 15):
        p = tmp_path / "r" / "samples" / f"shard-{i:06d}.parquet"
        p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(StorageError) as e:
        folder.read()
    msg = str(e.value)
    assert msg.startswith(", ".join(folder.file(i) for i in (3, 7, 11)) + " (and 1 more) is not readable Parquet")
    assert f"{folder.path}/_markers/shard-000003.json" in msg and "Remove them" not in msg and "shard-000015" not in msg
