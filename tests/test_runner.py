"""memex/runner.py: a unit that fails on Ray fails its stage with one line naming the root cause,
and the full traceback in a file in the run folder (issue 14)."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from memex import runner
from memex.config import ConfigError, ExecutorKind, MemexError, ResourcesConfig, validate_resources
from memex.storage import StageFolder, StorageError, Store

RES = ResourcesConfig(num_cpus=1)


def _ship_this_module_by_value() -> None:
    """Ray's workers cannot import this test module (tests/ is not on their path): pickle it by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _traceback_of(message: str) -> Path:
    m = re.search(r"\(full traceback: (.+)\)$", message)
    assert m, message
    return Path(m.group(1))


def _one_line(message: str, stage: str, cause: str) -> str:
    assert "\n" not in message, message
    assert message.startswith(f"{stage} failed: {cause}"), message
    text = _traceback_of(message).read_text()
    assert "Traceback (most recent call last)" in text
    return text


# ---- units that fail -------------------------------------------------------------------------
def raise_oserror(index: int) -> None:
    open(f"/nonexistent/memex-unit-{index}/weights.safetensors", "rb")


def fail_first_finish_second(index: int) -> dict:
    if index == 0:
        raise OSError("unit 0 cannot read its input")
    import time

    time.sleep(3)  # still running when unit 0's failure reaches the driver
    return {"ok": index}


def raise_chained(index: int) -> None:
    try:
        raise KeyError("unet.conv_in.weight")
    except KeyError as e:
        raise RuntimeError("could not build the model") from e


def raise_storage_error(index: int) -> None:
    raise StorageError(f"cannot write s3://bucket/runs/r/samples/shard-{index:06d}.parquet: disk full")


class CorruptModel:
    """A worker whose model fails to load in the actor's __init__ (the stage's model, once per actor)."""

    def __init__(self, path: str):
        raise OSError(f"Error while deserializing header: HeaderTooLarge ({path})")

    def __call__(self, index: int) -> dict:
        return {}


class FailingUnit:
    def __init__(self):
        pass

    def __call__(self, index: int) -> dict:
        raise ValueError(f"unit {index}: NaN in the latents")


@pytest.fixture
def folder(tmp_path):
    return StageFolder(Store(str(tmp_path / "run")), "samples")


def test_a_task_that_raises_fails_the_stage_in_one_line(ray_head, folder, tmp_path):
    _ship_this_module_by_value()
    with pytest.raises(runner.UnitFailed) as e:
        runner.run_tasks(folder, {0: {}, 1: {}}, raise_oserror, RES)
    text = _one_line(str(e.value), "generate", "FileNotFoundError: [Errno 2] No such file or directory: "
                                               "'/nonexistent/memex-unit-")
    assert _traceback_of(str(e.value)).parent == tmp_path / "run" / "logs"  # in the run folder
    assert "in raise_oserror" in text and "open(f\"/nonexistent/memex-unit-" in text  # the original traceback
    assert folder.complete() == []


def test_a_failed_stage_leaves_its_other_units_to_finish(ray_head, folder):
    """Not ray.cancel: in Ray 2.60 cancelling a task as it finishes aborted the driver (a RAY_CHECK in
    TaskManager::CompletePendingTask killed a pytest worker of this suite). The other unit completes
    and is marked, so a rerun skips it."""
    import time

    _ship_this_module_by_value()
    with pytest.raises(runner.UnitFailed, match="unit 0 cannot read its input"):
        runner.run_tasks(folder, {0: {}, 1: {}}, fail_first_finish_second, RES)
    deadline = time.monotonic() + 60
    while folder.complete() != [1] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert folder.complete() == [1] and folder.read_marker(1)["ok"] == 1


def test_the_innermost_cause_of_a_chain_is_named(ray_head, folder):
    _ship_this_module_by_value()
    with pytest.raises(runner.UnitFailed) as e:
        runner.run_tasks(folder, {0: {}}, raise_chained, RES)
    text = _one_line(str(e.value), "generate", "KeyError: 'unet.conv_in.weight'")
    assert "RuntimeError: could not build the model" in text


def test_a_memex_error_in_a_task_keeps_its_type_and_message(ray_head, folder):
    _ship_this_module_by_value()
    with pytest.raises(StorageError) as e:
        runner.run_tasks(folder, {3: {}}, raise_storage_error, RES)
    _one_line(str(e.value), "generate", "StorageError: cannot write s3://bucket/runs/r/samples/shard-000003.parquet: "
                                        "disk full")


def test_call_all_fails_in_one_line(ray_head):
    _ship_this_module_by_value()
    with pytest.raises(runner.UnitFailed) as e:
        runner.call_all(raise_oserror, [{"index": 7}], RES)
    _one_line(str(e.value), "raise_oserror", "FileNotFoundError")


def test_an_actor_whose_init_raises_fails_the_stage_in_one_line(ray_head, folder):
    """A corrupt model raising in the actor's __init__: Ray reports an ActorDiedError (hundreds of
    lines); the stage fails with the cause, and the traceback of __init__ is in the file."""
    _ship_this_module_by_value()
    with pytest.raises(MemexError) as e:
        runner.run_actor_pool(folder, {0: {}, 1: {}}, CorruptModel, {"path": "/models/bad"}, RES)
    text = _one_line(str(e.value), "generate", "OSError: Error while deserializing header: HeaderTooLarge "
                                               "(/models/bad)")
    assert "in __init__" in text and "raise OSError(" in text
    assert folder.complete() == []


def test_an_actor_call_that_raises_fails_the_stage_in_one_line(ray_head, folder):
    _ship_this_module_by_value()
    with pytest.raises(MemexError) as e:
        runner.run_actor_pool(folder, {0: {}}, FailingUnit, {}, RES)
    text = _one_line(str(e.value), "generate", "ValueError: unit 0: NaN in the latents")
    assert "in __call__" in text


class Loaded:
    """A resident worker: what it loaded, in which process, and how many calls it served."""

    def __init__(self, data: str):
        self.data, self.calls = data, 0

    def __call__(self, x: int, plus: int = 0) -> tuple:
        self.calls += 1
        return self.data, x + plus, self.calls, os.getpid()


def test_a_resident_worker_is_built_once_called_many_times_and_released(ray_head):
    import time

    import ray

    _ship_this_module_by_value()
    with runner.Resident(Loaded, {"data": "shards"}, RES, gpu=False) as w:
        out = [w(x, plus=1) for x in range(4)]
        actor = w._worker
    assert [o[:3] for o in out] == [("shards", x + 1, x + 1) for x in range(4)]  # one worker kept its state
    assert len({o[3] for o in out}) == 1 and out[0][3] != os.getpid()  # in one Ray worker, not here
    assert w._worker is None
    # leaving the block killed it (and freed its resources). ray.kill is asynchronous: a call sent
    # right after it can still reach the actor first (seen once in CI), so the death is waited for (a worker
    # that never dies hangs here until pytest-timeout fails the test)
    while True:
        try:
            ray.get(actor.__call__.remote(0), timeout=60)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.2)
    assert runner.Resident(Loaded, {"data": "x"}, RES)._worker is None  # nothing is started before a call


def test_a_resident_worker_whose_init_raises_fails_in_one_line(ray_head, tmp_path):
    _ship_this_module_by_value()
    w = runner.Resident(CorruptModel, {"path": "/index/bad"}, RES, label="match", store=Store(str(tmp_path / "run")))
    with pytest.raises(MemexError) as e:
        w(0)
    text = _one_line(str(e.value), "match", "OSError: Error while deserializing header: HeaderTooLarge (/index/bad)")
    assert "in __init__" in text and w._worker is None  # released: a later call builds a new one
    assert _traceback_of(str(e.value)).parent == tmp_path / "run" / "logs"  # in the run folder it works for


def test_a_resident_worker_call_that_raises_keeps_a_memex_type(ray_head):
    _ship_this_module_by_value()
    with runner.Resident(FailingUnit, {}, RES, label="match") as w, pytest.raises(MemexError) as e:
        w(3)
    _one_line(str(e.value), "match", "ValueError: unit 3: NaN in the latents")


LONG_LIVED_DRIVER = """
import gc, json, sys, tempfile, time
import ray
from ray.util.state import list_actors
from memex import runner
from memex.config import MemexError, ResourcesConfig
from memex.storage import StageFolder, Store

class FailingUnit:
    def __call__(self, index):
        raise ValueError("unit failed")

def alive():  # this driver's pool actors (the session's other drivers may hold theirs)
    mine = [("state", "=", "ALIVE"), ("job_id", "=", ray.get_runtime_context().get_job_id())]
    return [a.actor_id for a in list_actors(address=sys.argv[2], filters=mine, limit=1000,
                                            raise_on_missing_output=False) if "_ActorUnits" in a.class_name]

ray.init(address=sys.argv[1], log_to_driver=False)
gc.disable()  # only release_failed_pools may collect
try:
    runner.run_actor_pool(StageFolder(Store(tempfile.mkdtemp()), "samples"), {0: {}}, FailingUnit, {},
                          ResourcesConfig(num_cpus=1))
except MemexError:
    pass
time.sleep(2)
before = alive()
runner.release_failed_pools()
deadline = time.monotonic() + 30
while alive() and time.monotonic() < deadline:
    time.sleep(0.5)
print(json.dumps({"before": before, "after": alive()}))
"""


def test_a_failed_pools_actors_end_once_its_error_is_handled(ray_head):
    """A driver that goes on after a failed pool (memex nightly): Ray Data leaves the pool's actors
    to the garbage collector, and release_failed_pools ends them at once. In a driver process of its
    own with automatic collection off, as `memex nightly` is one (pytest's own process keeps a
    failure's objects alive for its report)."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-c", LONG_LIVED_DRIVER, ray_head.address, ray_head.dashboard],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["before"], "the failed pool's actor ended by itself: Ray Data now releases it, drop the workaround"
    assert r["after"] == []


# ---- the cause, from Ray's texts (no Ray) ---------------------------------------------------
ACTOR_DIED = """The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker(MapBatches(W)).__init__()\x1b[39m (pid=1, ip=10.0.0.1, actor_id=ab, repr=MapWorker(MapBatches(W)))
FileNotFoundError: [Errno 2] No such file or directory: '/m/unet'

The above exception was the direct cause of the following exception:

\x1b[36mray::MapWorker(MapBatches(W)).__init__()\x1b[39m (pid=1, ip=10.0.0.1, actor_id=ab, repr=MapWorker(MapBatches(W)))
  File "/x/memex/models.py", line 9, in load_model
    raise ModelError("model.path=/m cannot be loaded") from e
memex.models.ModelError: model.path=/m cannot be loaded"""  # noqa: E501

USER_CODE = """\x1b[36mray::MapWorker(MapBatches(W2)).submit()\x1b[39m (pid=2, ip=10.0.0.1)
  File "/t.py", line 20, in __call__
    raise ValueError("unit blew up")
ValueError: unit blew up

The above exception was the direct cause of the following exception:

\x1b[36mray::MapWorker(MapBatches(W2)).submit()\x1b[39m (pid=2, ip=10.0.0.1)
ray.exceptions.UserCodeException: UDF failed to process a data block."""


def test_root_cause_from_ray_texts():
    assert runner.exception_lines(USER_CODE) == [("ValueError", "unit blew up"),
                                                 ("ray.exceptions.UserCodeException",
                                                  "UDF failed to process a data block.")]
    assert runner.root_cause(Exception(USER_CODE))[:2] == ("ValueError", "unit blew up")
    # a memex error in the chain wins: its message is written for users
    assert runner.root_cause(Exception(ACTOR_DIED))[:2] == ("memex.models.ModelError", "model.path=/m cannot be loaded")
    assert runner.root_cause(Exception(ACTOR_DIED.split("\n\nThe above")[0]))[:2] == (
        "FileNotFoundError", "[Errno 2] No such file or directory: '/m/unet'")


def test_failed_keeps_a_memex_type_seen_only_as_text(tmp_path):
    from memex.models import ModelError

    err = runner.failed(Exception(ACTOR_DIED), "generate", Store(str(tmp_path / "run")))
    assert isinstance(err, ModelError)
    assert str(err).startswith("generate failed: ModelError: model.path=/m cannot be loaded (full traceback: ")
    assert "The above exception" in _traceback_of(str(err)).read_text()


# ---- resources.executor=local: the same units, markers and resume, in this process, no Ray ----------
LOCAL = ResourcesConfig(executor=ExecutorKind.local)


class CountingWorker:
    """A model-like worker: how many were built, and in which process its units ran."""

    built = 0

    def __init__(self, scale: int):
        type(self).built += 1
        self.scale = scale

    def __call__(self, index: int, value: int) -> pa.Table:
        return pa.table({"unit": [index], "x": [value * self.scale], "pid": [os.getpid()]})


def test_local_executor_runs_the_units_here_builds_one_worker_and_resumes(folder):
    import ray

    ray_before = ray.is_initialized()
    CountingWorker.built = 0
    assert runner.run_actor_pool(folder, {0: {"value": 1}, 1: {"value": 2}}, CountingWorker, {"scale": 10}, LOCAL) == 2
    units = {0: {"value": 1}, 1: {"value": 2}, 2: {"value": 3}}
    assert runner.run_actor_pool(folder, units, CountingWorker, {"scale": 10}, LOCAL) == 1  # only unit 2 is left
    assert runner.run_actor_pool(folder, units, CountingWorker, {"scale": 10}, LOCAL) == 0
    assert CountingWorker.built == 2  # once per call that had units to do; none when all were complete
    rows = sorted(folder.read().to_pylist(), key=lambda r: r["unit"])
    assert rows == [{"unit": i, "x": 10 * (i + 1), "pid": os.getpid()} for i in range(3)]
    assert sorted(folder.complete()) == [0, 1, 2] and folder.read_marker(2)["rows"] == 1
    assert ray.is_initialized() == ray_before  # no Ray started (nor connected to) for any of it


def double(index: int, value: int) -> dict:
    if value < 0:
        raise_storage_error(index)
    return {"doubled": 2 * value}


def test_local_executor_tasks_raise_the_units_own_error_and_keep_what_was_done(folder):
    with pytest.raises(StorageError, match="shard-000001.parquet: disk full"):  # the unit's error, not UnitFailed
        runner.run_tasks(folder, {0: {"value": 1}, 1: {"value": -1}, 2: {"value": 3}}, double, LOCAL)
    assert folder.complete() == [0] and folder.read_marker(0)["doubled"] == 2
    assert runner.run_tasks(folder, {0: {"value": 1}, 1: {"value": 2}, 2: {"value": 3}}, double, LOCAL) == 2
    assert [folder.read_marker(i)["doubled"] for i in range(3)] == [2, 4, 6]
    assert runner.call_all(lambda value: value + 1, [{"value": v} for v in (5, 1, 3)], LOCAL) == [6, 2, 4]


def test_local_executor_resident_worker_lives_in_this_process_and_is_dropped_on_close():
    import ray

    ray_before = ray.is_initialized()
    with runner.Resident(Loaded, {"data": "shards"}, LOCAL) as w:
        assert [w(x)[1:] for x in range(3)] == [(x, x + 1, os.getpid()) for x in range(3)]
    assert w._worker is None and ray.is_initialized() == ray_before
    assert w(5)[2] == 1  # a call after close builds a new worker


def test_local_executor_with_a_ray_address_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match="resources.address=127.0.0.1:6379 .*resources.executor=local"):
        validate_resources(ResourcesConfig(executor=ExecutorKind.local, address="127.0.0.1:6379"))


def test_an_address_nothing_listens_at_fails_in_one_line_before_ray_init():
    """ray.init retries an unreachable GCS for over 7 minutes (Ray 2.60); the driver probes the port
    first. Called through _start: with the probe gone this would hang in ray.init (or, where this
    process already runs Ray, fail with Ray's own RuntimeError), not raise RayStartError."""
    import socket

    from conftest import free_port

    port = free_port()  # closed again: nothing listens there
    with pytest.raises(runner.RayStartError) as e:
        runner._start(ResourcesConfig(address=f"127.0.0.1:{port}"))
    msg = str(e.value)
    assert "\n" not in msg and f"cannot reach Ray at 127.0.0.1:{port}" in msg and "ray start --head" in msg
    with pytest.raises(runner.RayStartError, match=r"resources.address=nonsense is not a Ray address"):
        runner.probe_address("nonsense")
    from ray._private.services import resolve_ip_for_localhost

    with socket.socket() as s:  # something that accepts connections passes the probe
        s.bind((resolve_ip_for_localhost("127.0.0.1"), 0))  # where Ray (and the probe) take 127.0.0.1
        s.listen()
        runner.probe_address(f"127.0.0.1:{s.getsockname()[1]}")
    for address in ("local", "auto", "ray://head:10001"):  # left to Ray as given
        runner.probe_address(address)


# ---- a worker no node fits: Ray would wait for one forever ---------------------------------------
def twice(x: int) -> int:
    return 2 * x


def test_shortfall_names_the_keys_no_node_meets():
    nodes = [{"CPU": 8.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert runner.shortfall({"CPU": 4.0, "GPU": 1.0}, nodes) is None
    assert runner.shortfall({"CPU": 2.0, "GPU": 0.5}, nodes) is None  # a fraction of a GPU fits
    assert runner.shortfall({"CPU": 16.0}, nodes) == "resources.num_cpus=16 asks for 16 CPUs per worker"
    assert runner.shortfall({"CPU": 4.0, "GPU": 2.0}, nodes) == "resources.num_gpus=2 asks for 2 GPUs per worker"
    # each amount on some node, never both on one: both keys are named
    assert runner.shortfall({"CPU": 6.0, "GPU": 1.0}, nodes) == \
        "resources.num_cpus=6 and resources.num_gpus=1 ask for 6 CPUs and 1 GPU per worker"
    assert runner.shortfall({"GPU": 1.0}, []) == "resources.num_gpus=1 asks for 1 GPU per worker"


# these refusals are for a machine whose Ray has no GPU (the session's head detects any it has)
NO_GPU = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a refusal for a machine with no GPU")


def _count_waits(monkeypatch) -> list[tuple[float, bool]]:
    """(timeout_seconds, ready) of every wait for a worker's placement group (runner.check_fits's wait for an
    autoscaler's node): what a refusal waited for, counted instead of timed."""
    from ray.util.placement_group import PlacementGroup

    waits, real = [], PlacementGroup.wait

    def wait(self, timeout_seconds=30):
        waits.append((timeout_seconds, ready := real(self, timeout_seconds)))
        return ready

    monkeypatch.setattr(PlacementGroup, "wait", wait)
    return waits


@NO_GPU
def test_a_worker_no_node_fits_is_refused_at_once_on_an_instance_memex_started(ray_head, folder, monkeypatch):
    """The session's Ray has 4 CPUs and no GPU. Started by memex itself (no resources.address: this
    machine alone, no autoscaler), a GPU worker or a 5-CPU one can never run: refused before any
    unit, where Ray would have waited for it forever. What fits runs; gpu=False steps ask no GPU."""
    monkeypatch.setattr(runner, "_STARTED_HERE", [True])
    waits = _count_waits(monkeypatch)
    _ship_this_module_by_value()
    gpu = ResourcesConfig(num_cpus=1, num_gpus=1)
    with pytest.raises(ConfigError) as e:
        runner.run_tasks(folder, {0: {}}, raise_oserror, gpu)
    assert str(e.value) == ("resources.num_gpus=1 asks for 1 GPU per worker, and this machine's Ray instance has "
                            "4 CPUs, 0 GPUs: set resources.num_gpus=0 to run on CPU, or resources.address to a "
                            "Ray cluster with GPU nodes")
    assert waits == [] and folder.complete() == []  # at once: no wait for a node that can never join
    with pytest.raises(ConfigError, match=r"^resources.num_cpus=5 asks for 5 CPUs per worker, .* lower resources"):
        runner.run_actor_pool(folder, {0: {}}, FailingUnit, {}, ResourcesConfig(num_cpus=5))
    with pytest.raises(ConfigError, match="resources.num_gpus=1"):
        runner.Resident(FailingUnit, {}, gpu)(0)
    assert runner.call_all(twice, [{"x": 3}], gpu, gpu=False) == [6]  # no GPU asked: it runs


@NO_GPU
def test_on_a_cluster_a_worker_no_node_fits_is_waited_for_then_refused(ray_head, folder, monkeypatch):
    """Connected to a cluster (an autoscaler may launch the node): waited for up to
    resources.start_timeout_s, then refused naming the keys; 0 refuses at once, and so does a
    later stage of the same command once a wait for that shape was in vain (`memex nightly`)."""
    monkeypatch.setattr(runner, "_STARTED_HERE", [])
    monkeypatch.setattr(runner, "_NEVER_JOINED", set())
    waits = _count_waits(monkeypatch)
    _ship_this_module_by_value()
    # 0: refused with no wait; 2: one wait of 2 s, in vain; then 60: refused with no wait, that shape never joined
    for timeout, waited in ((0, []), (2, [(2, False)]), (60, [(2, False)])):
        with pytest.raises(ConfigError) as e:
            runner.run_tasks(folder, {0: {}}, raise_oserror, ResourcesConfig(num_cpus=1, num_gpus=1,
                                                                            start_timeout_s=timeout))
        assert str(e.value).startswith(
            "resources.num_gpus=1 asks for 1 GPU per worker, and no node of the Ray cluster has that (the largest: "
            f"4 CPUs, 0 GPUs), and none joined within resources.start_timeout_s={timeout}: set resources.num_gpus=0")
        assert waits == waited and folder.complete() == []
    from ray.util import placement_group_table

    assert all(p["state"] == "REMOVED" for p in placement_group_table().values())  # no demand left behind


@NO_GPU
@pytest.mark.slow
def test_cli_resources_gpu_on_a_machine_without_one_fails_in_one_line_before_any_unit(tmp_path):
    """`memex generate resources=gpu` on this GPU-less machine, no resources.address: memex starts
    its own Ray instance, which no GPU node can ever join. It hung at "generate: 1 unit to run"."""
    import subprocess

    from conftest import BIN, REPO

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([str(BIN / "memex"), "generate", "resources=gpu", f"storage.root={tmp_path}", "run.name=r"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("memex: error:")]
    assert len(errors) == 1 and re.fullmatch(
        r"memex: error: resources.num_gpus=1 asks for 1 GPU per worker, and this machine's Ray instance has "
        r"\d+ CPUs?, 0 GPUs: set resources.num_gpus=0 to run on CPU, or resources.address to a Ray cluster with "
        r"GPU nodes", errors[0]), errors
    assert "Traceback" not in r.stderr and not (tmp_path / "r" / "samples").exists()


# ---- a unit whose worker dies every time: Ray would restart it and start the unit again forever --
class DiesOnUnitOne:
    """Unit 1 kills its own process, as Ray's memory monitor kills a worker that runs its node out
    of memory (SIGKILL); the other units write a row."""

    def __init__(self, die: bool = True):
        self.die = die

    def __call__(self, index: int) -> pa.Table:
        if index == 1 and self.die:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return pa.table({"unit": [index]})


def test_a_unit_whose_worker_dies_every_time_fails_the_stage_after_max_starts(ray_head, folder):
    """Ray Data restarts a dead actor and starts its unit again, without end (max_restarts=-1): a
    unit that ran its node out of memory every time left `memex generate` at "1 unit to run" for
    7 minutes, when it was stopped. After MAX_STARTS starts by one command the stage fails in one
    line; Ray's state API says no worker was killed for memory here (a SIGKILL of its own). A second
    dispatch counts afresh and finishes what is left."""
    _ship_this_module_by_value()
    # the state API is served by the dashboard, which a loaded 2-core CI machine brings up late: the
    # message below is the one of a dashboard that answers, so wait until it does (CI once got the
    # "the log names why" fallback of one that did not answer within 10 s)
    deadline = time.monotonic() + 120
    while runner.oom_kills() is None and time.monotonic() < deadline:
        time.sleep(2)
    units = {0: {}, 1: {}, 2: {}}
    with pytest.raises(runner.WorkerDeaths) as e:
        runner.run_actor_pool(folder, units, DiesOnUnitOne, {}, RES)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"generate failed: WorkerDeaths: unit 1 was started {runner.MAX_STARTS} times by this command, and its "
        "worker died each time before finishing it, so it is not started again: none was killed for memory (a "
        "lost node, a crash: the log has the workers' last output) (full traceback: "), msg
    assert 1 not in folder.complete()
    assert folder.store.read_json(folder.attempts(1))["starts"] == runner.MAX_STARTS + 1

    # dispatched again in the same process, its worker fixed: a rerun, or `memex nightly`'s next checkpoint,
    # whose audit shares the index folder (a per-process count made it fail at once, "died each time")
    assert runner.run_actor_pool(folder, units, DiesOnUnitOne, {"die": False}, RES) >= 1
    assert sorted(folder.complete()) == [0, 1, 2]
    assert not folder.store.exists(folder.attempts(1))  # a marked unit leaves no count behind


def test_worker_deaths_name_the_batch_size_when_ray_killed_workers_for_memory(tmp_path, monkeypatch):
    """Ray's memory monitor killing a worker needs a node near its memory limit: measured by hand
    (a unit allocating 9 GB under RAY_memory_usage_threshold=0.3: the stage failed after 15 s, where
    it had looped until stopped), not in the suite; here the count comes from a stand-in."""
    deaths = runner.WorkerDeaths("unit 4 was started 3 times by this command, and its worker died each time "
                                 "before finishing it, so it is not started again")
    for kills, end in [(2, ": Ray's memory monitor killed 2 worker(s) for running their node out of memory "
                           "meanwhile; lower mia.batch_size or give the workers more memory (full traceback: "),
                       (None, ": the log names why (a lost node, Ray's memory monitor: then lower mia.batch_size "
                              "or give the workers more memory) (full traceback: ")]:
        monkeypatch.setattr(runner, "oom_kills", lambda: kills)
        err = runner.failed(deaths, "membership scores", Store(str(tmp_path / "run")))
        assert isinstance(err, runner.WorkerDeaths) and f"so it is not started again{end}" in str(err), str(err)


def _one_row(index: int) -> pa.Table:
    return pa.table({"x": [index]})


def test_temp_files_a_killed_run_left_are_removed_before_its_units_run_again(tmp_path):
    """Every SIGKILL mid-write leaves a `_tmp-<uuid>-` file (up to a whole unit: a FAISS shard, a
    Parquet shard) that nothing reads and no rerun removed. The runner removes a folder's before it
    dispatches its units (under the run folder's lease: no other process writes there); a folder
    whose units are all complete is left alone."""
    folder = StageFolder(Store(str(tmp_path)), "samples")
    folder.write_shard(0, _one_row(0))
    left = [tmp_path / "samples" / "_tmp-0a1b-shard-000001.parquet",
            tmp_path / "samples" / "_markers" / "_tmp-2c3d-shard-000001.json"]
    for p in left:
        p.write_bytes(b"cut short")
    assert runner.run_here(folder, {0: {}}, _one_row) == 0 and all(p.exists() for p in left)  # nothing to run
    assert runner.run_here(folder, {0: {}, 1: {}}, _one_row) == 1
    assert not any(p.exists() for p in left) and folder.complete() == [0, 1]
    assert folder.read().num_rows == 2


def test_a_start_count_left_by_a_kill_after_the_marker_is_removed_on_the_rerun(tmp_path):
    """A kill between a unit's marker and the removal of its start count left _attempts/ behind for
    good (the unit is complete: never started again), and the resumed folder differed from an
    uninterrupted one (CI's kill-point test hit that window once). The sweep before dispatch removes
    the start counts of marked units and keeps those of units still to run."""
    folder = StageFolder(Store(str(tmp_path)), "candidates")
    folder.write_shard(0, _one_row(0))
    folder.count_start(0, "killed run")  # the marker is written, the count not yet cleared: killed here
    folder.count_start(2, "killed run")  # a unit started and killed before its marker
    assert runner.run_here(folder, {0: {}, 1: {}, 2: {}}, _one_row) == 2
    assert folder.complete() == [0, 1, 2] and not list((tmp_path / "candidates" / "_attempts").glob("*"))
    folder.count_start(1, "killed run")
    assert folder.sweep_temp() == 1 and not (tmp_path / "candidates" / "_attempts" / "shard-000001.json").exists()


def test_units_past_a_million_are_read_back_by_their_whole_number(folder):
    """The paper's scale: 500 samples x 350k prompts at sampling.shard_size=64 is ~2.7M samples shards, and
    unit_name writes 7 digits past 999,999. complete() read 6, so shard-1000000 came back as 100000: the
    stage never completed (every rerun redid those units) and match skipped those samples shards."""
    for i in (5, 999_999, 1_000_000, 1_234_567):
        folder.mark_complete(i, {})
    folder.store.write_json(folder.store.join("samples", "_markers", "shard-000005 (1).json"), {})  # a stray copy
    assert folder.complete() == [5, 999_999, 1_000_000, 1_234_567]
    assert folder.marker(1_234_567).endswith("shard-1234567.json")


def test_ctrl_c_in_a_stage_stops_its_progress_line(tmp_path):
    """Ctrl-C (or a MemexError) inside a Ray stage left the progress ticker running: on a terminal it
    redrew "<stage>: k/N units, Ns" every second, and the `memex: log:` line and the shell prompt landed
    on it. The line is closed on any exception, as a Ray failure closes it."""
    from memex.layout import RunLayout
    from memex.runner import _watched

    folder = RunLayout(str(tmp_path), "r").samples
    for error in (KeyboardInterrupt, ValueError):
        with pytest.raises(error):
            with _watched(folder, "generate", 3, 0) as progress:
                raise error()
        assert progress._stop.is_set()
