"""A node-local storage.root on a Ray cluster of more than one node is refused (issue 16, item 2).

The decision is pure (memex/storage.py `unreachable_storage`); the runner only counts alive nodes.
No Ray is started here: `ray.nodes()` is replaced by a fake."""

import pytest

from memex import runner
from memex.config import ConfigError, StorageConfig
from memex.storage import protocol_of, unreachable_storage

LOCAL = ["runs", "/data/runs", "file:///data/runs", "local:///data/runs", "C:/runs"]


@pytest.mark.parametrize("root", LOCAL + ["s3://b/runs", "gs://b/runs"])
@pytest.mark.parametrize("shared", [False, True])
def test_one_node_takes_any_root(root, shared):
    assert unreachable_storage(root, shared, 1) is None
    assert unreachable_storage(root, shared, 0) is None  # no count (ray.nodes() empty): not refused


@pytest.mark.parametrize("root", LOCAL)
def test_local_root_on_two_nodes_is_refused_naming_both_fixes(root):
    msg = unreachable_storage(root, False, 2)
    assert msg and root in msg and "2 nodes" in msg
    assert "s3://" in msg and "storage.shared_mount=true" in msg


@pytest.mark.parametrize("root", LOCAL)
def test_shared_mount_takes_a_local_root_on_two_nodes(root):
    assert unreachable_storage(root, True, 2) is None


@pytest.mark.parametrize("root", ["s3://b/runs", "S3://b/runs", "gs://b/runs", "gcs://b/runs"])
@pytest.mark.parametrize("shared", [False, True])
def test_object_storage_on_two_nodes_is_fine(root, shared):
    assert unreachable_storage(root, shared, 2) is None


@pytest.mark.parametrize("nodes", [0, 1, 2])
@pytest.mark.parametrize("shared", [False, True])
def test_memory_under_ray_is_refused_whatever_the_nodes_and_flag(shared, nodes):
    """Ray's workers are other processes even on one node: the driver never saw their units (the
    audit failed after its index stage, "train.parquet is not readable")."""
    msg = unreachable_storage("memory://runs", shared, nodes)
    assert msg and "s3://" in msg and "memory" in msg and "resources.executor=local" in msg


@pytest.mark.parametrize("nodes", [1, 2])
def test_a_local_root_under_ray_client_is_refused_on_any_cluster(nodes, monkeypatch):
    """resources.address=ray://head:10001 on a one-node cluster: the units wrote to the head's disk at the
    laptop's path, the driver saw no marker ("did not complete; rerun"), and every rerun redid them all."""
    msg = unreachable_storage("runs", False, nodes, client=True)
    assert msg and "Ray Client" in msg and "s3://" in msg and "ray job submit" in msg
    assert unreachable_storage("s3://b/runs", False, nodes, client=True) is None
    assert unreachable_storage("runs", True, nodes, client=True) is None
    _fake_nodes(monkeypatch, [True])
    monkeypatch.setattr(runner, "ray_client", lambda: True)
    with pytest.raises(ConfigError, match="Ray Client"):
        runner.check_storage_reachable("runs", False)


def test_ray_client_is_not_connected_here():
    assert runner.ray_client() is False


def test_protocol_of():
    assert protocol_of("s3://b/x") == "s3"
    assert protocol_of("file:///x") == "file"
    assert protocol_of("runs") is None
    assert protocol_of("C:/runs") is None


def test_storage_config_default_is_not_a_shared_mount():
    assert StorageConfig().shared_mount is False


def _fake_nodes(monkeypatch, alive: list[bool]) -> None:
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": str(i), "Alive": a} for i, a in enumerate(alive)])


def test_runner_counts_only_alive_nodes(monkeypatch):
    _fake_nodes(monkeypatch, [True, False, True])
    assert runner.alive_nodes() == 2


def test_runner_check_raises_naming_the_flag_on_two_alive_nodes(monkeypatch):
    _fake_nodes(monkeypatch, [True, True])
    with pytest.raises(ConfigError, match=r"storage\.shared_mount"):
        runner.check_storage_reachable("runs", False)
    runner.check_storage_reachable("runs", True)
    runner.check_storage_reachable("s3://b/runs", False)


def test_runner_check_passes_with_one_alive_node_and_a_dead_one(monkeypatch):
    _fake_nodes(monkeypatch, [True, False])
    runner.check_storage_reachable("runs", False)


def test_init_with_storage_checks_after_ray_is_up(monkeypatch):
    """`runner.init(resources, storage)`, as audit.run and generate.run call it before any work."""
    import ray

    from memex.config import ResourcesConfig

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # Ray already up: no start here
    _fake_nodes(monkeypatch, [True, True])
    with pytest.raises(ConfigError, match=r"storage\.shared_mount"):
        runner.init(ResourcesConfig(), StorageConfig(root="runs"))
    runner.init(ResourcesConfig(), StorageConfig(root="runs", shared_mount=True))
    runner.init(ResourcesConfig())  # no storage: no check (the units' own calls)


@pytest.mark.slow
def test_audit_against_an_endpoint_nobody_answers_fails_in_one_line_naming_the_keys(tmp_path):
    """An S3 endpoint with nothing listening (a wrong endpoint_url, a VPN down): one line naming the
    folder and the keys to check, no botocore traceback, and nothing written anywhere."""
    import subprocess

    from conftest import BIN, free_port

    port = free_port()  # bound and released: nothing listens on it
    r = subprocess.run([str(BIN / "memex"), "audit", "storage=s3", "storage.root=s3://nowhere/runs",
                        "+storage.options.key=k", "+storage.options.secret=s",
                        f"storage.options.client_kwargs.endpoint_url=http://127.0.0.1:{port}",
                        "+storage.options.config_kwargs.retries.max_attempts=1", "prompts.limit=2"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("memex: error: cannot reach index folder s3://nowhere/runs/_index/"), r.stderr[-2000:]
    assert f"127.0.0.1:{port}" in last and "storage.options (endpoint_url, credentials)" in last
    assert list(tmp_path.iterdir()) == []  # no local run folder or log left behind


def test_a_local_root_inside_a_ray_jobs_working_dir_copy_is_refused(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the driver in Ray's copy of the checkout, deleted once the
    job is done: the default storage.root (`runs`, relative), MLflow's sqlite:///mlflow.db and wandb's
    ./wandb landed in it, and the results went with it. Refused in a job (Ray's job supervisor sets
    $RAY_JOB_CONFIG_JSON_ENV_VAR); an absolute path outside the copy, object storage or a tracking
    server pass, and so does everything outside a job."""
    import json

    from memex import tracking
    from memex.config import TrackerConfig, TrackerKind, WandbMode
    from memex.storage import RAY_JOB_CONFIG, in_job_working_dir

    job = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}, "metadata": {}})
    cwd = str(tmp_path / "working_dir_files" / "_ray_pkg_abc")
    why = in_job_working_dir("runs", "storage.root", job, cwd)
    assert why and why.startswith(f"storage.root=runs is inside this Ray job's copy of its working_dir ({cwd})")
    assert in_job_working_dir(f"{cwd}/out", "storage.root", job, cwd)
    assert in_job_working_dir("/fsx/runs", "storage.root", job, cwd) is None
    assert in_job_working_dir("s3://b/runs", "storage.root", job, cwd) is None
    assert in_job_working_dir("runs", "storage.root", None, cwd) is None  # not a job
    assert in_job_working_dir("runs", "storage.root", json.dumps({"runtime_env": {}}), cwd) is None  # no copy
    assert in_job_working_dir("runs", "storage.root", job, "/fsx") is None  # the entrypoint cd'ed out of the copy
    assert in_job_working_dir("~/runs", "storage.root", job, cwd) is None  # fsspec expands it: the home folder
    assert in_job_working_dir("file:/fsx/mlruns", "tracker.tracking_uri", job, cwd) is None

    (tmp_path / "working_dir_files" / "_ray_pkg_abc").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(RAY_JOB_CONFIG, job)
    for var in ("MLFLOW_TRACKING_URI", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"^storage.root=runs is inside this Ray job's copy"):
        runner.check_storage_reachable("runs")
    with pytest.raises(ConfigError, match=r"^tracker.tracking_uri=mlflow.db is inside this Ray job's copy"):
        tracking.check(TrackerConfig(kind=TrackerKind.mlflow))
    with pytest.raises(ConfigError, match=r"^tracker.dir=\(unset: this folder\) is inside this Ray job's copy"):
        tracking.check(TrackerConfig(kind=TrackerKind.wandb))
    tracking.check(TrackerConfig(kind=TrackerKind.mlflow, tracking_uri="http://mlflow:5000"))
    tracking.check(TrackerConfig(kind=TrackerKind.mlflow, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))
    tracking.check(TrackerConfig(kind=TrackerKind.wandb, dir="/fsx/wandb"))
    tracking.check(TrackerConfig(kind=TrackerKind.mlflow, tracking_uri="databricks"))
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # online needs a key (tracking._check_wandb_key): a made-up one
    tracking.check(TrackerConfig(kind=TrackerKind.wandb, mode=WandbMode.online))  # uploads as it goes
    monkeypatch.delenv(RAY_JOB_CONFIG)
    tracking.check(TrackerConfig(kind=TrackerKind.mlflow))  # a laptop's working folder is its own


def test_a_local_index_root_is_refused_like_a_local_storage_root(monkeypatch):
    """index.root is where the index units write train.pack, shards/ and dups/: the audit checked only
    storage.root, so with storage.root on S3 and index.root a local path, under Ray Client (or on several
    nodes) the units wrote the index to the cluster's disks and the driver read its own. Both are checked."""
    import ray

    from memex.config import ResourcesConfig

    monkeypatch.setattr(runner, "_UNCHECKED", [])
    monkeypatch.setattr(runner, "_STORAGE", [])
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    _fake_nodes(monkeypatch, [True])
    monkeypatch.setattr(runner, "ray_client", lambda: True)
    s3 = StorageConfig(root="s3://b/runs")
    with pytest.raises(ConfigError, match=r"index.root=/data/index is a local path, and the driver runs off the "
                                          r"cluster .* \(storage=s3 index.root=s3://bucket/runs\)"):
        runner.init(ResourcesConfig(), s3, "/data/index")
    runner.init(ResourcesConfig(), s3, "s3://b/index")  # both on object storage: fine
    runner.init(ResourcesConfig(), s3)  # index.root unset: under storage.root
    _fake_nodes(monkeypatch, [True, True])
    monkeypatch.setattr(runner, "ray_client", lambda: False)
    with pytest.raises(ConfigError, match=r"index.root=/data/index is a local path, but Ray has 2 nodes"):
        runner.init(ResourcesConfig(), s3, "/data/index")
