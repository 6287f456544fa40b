"""memex/runner.py run_tasks: a bounded window of a stage's tasks in flight (not every unit submitted at
once), and completion that counts the markers the tasks returned (not a listing alone)."""

from __future__ import annotations

import sys
import time

import pytest

from memex import runner
from memex.config import ResourcesConfig
from memex.storage import StageFolder, StorageError, Store

RES = ResourcesConfig(num_cpus=1)
WINDOW = 4


def _ship_this_module_by_value() -> None:
    """Ray's workers cannot import this test module (tests/ is not on their path): pickle it by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---- units ------------------------------------------------------------------------------------
def quick(index: int) -> dict:
    time.sleep(0.05)
    return {"ok": index}


def third_fails(index: int) -> dict:
    if index == 3:
        raise OSError(f"unit {index} cannot read its input")
    time.sleep(2)  # still running when unit 3's failure reaches the driver
    return {"ok": index}


class Noop:
    def __call__(self, index: int) -> dict:
        return {"ok": index}


@pytest.fixture
def folder(tmp_path):
    return StageFolder(Store(str(tmp_path / "run")), "samples")


@pytest.fixture
def submissions(monkeypatch, folder):
    """Spies on the driver's task submissions (ray.remote(...)(fn).remote): the units submitted, in order, and
    the most tasks in flight at any submission. In flight = submitted minus returned to the driver, and a
    task's marker exists before the driver sees it return, so `submitted - marked` is an upper bound."""
    import ray

    real = ray.remote
    seen: dict = {"units": [], "max_in_flight": 0}

    def remote(*args, **opts):
        decorate = real(*args, **opts)

        def wrap(fn):
            task = decorate(fn)
            if fn is not runner.do_unit:  # Ray's own (ray.data imported meanwhile decorates its actors)
                return task

            class Spy:
                def remote(self, f, index, *a, **k):
                    seen["units"].append(index)
                    seen["max_in_flight"] = max(seen["max_in_flight"], len(seen["units"]) - len(f.complete()))
                    return task.remote(f, index, *a, **k)

            return Spy()

        return wrap

    monkeypatch.setattr(ray, "remote", remote)
    return seen


# ---- A: the window ----------------------------------------------------------------------------
def test_window_is_twice_the_slots_the_nodes_hold_for_one_task():
    assert runner.window_for({"CPU": 1.0}, [{"CPU": 4.0}]) == 8
    # a head without GPUs holds no GPU task; the GPU node holds min(16 / 2, 4 / 1) = 4
    assert runner.window_for({"CPU": 2.0, "GPU": 1.0}, [{"CPU": 8.0}, {"CPU": 16.0, "GPU": 4.0}]) == 8
    assert runner.window_for({"GPU": 0.1}, [{"CPU": 8.0, "GPU": 1.0}]) == 20  # 10 per GPU, not 9
    assert runner.window_for({}, [{"CPU": 3.0}]) == 6  # asks for nothing: per CPU
    assert runner.window_for({"CPU": 1.0}, []) == runner.MIN_WINDOW  # no node yet: still some in flight


def test_run_tasks_keeps_at_most_a_window_in_flight(ray_head, folder, submissions, monkeypatch):
    """40 units, a window of 4: never more than 4 submitted and unreturned; all 40 run and are marked.
    (It submitted all 40 at once, then waited on all the pending ones for each unit.)"""
    _ship_this_module_by_value()
    monkeypatch.setattr(runner, "window_for", lambda request, nodes: WINDOW, raising=False)
    # sized again, and waits that time out, on the way (raising=False: the tests fail on the code before too)
    monkeypatch.setattr(runner, "WINDOW_REFRESH_S", 0.05, raising=False)
    assert runner.run_tasks(folder, {i: {} for i in range(40)}, quick, RES) == 40
    assert sorted(submissions["units"]) == list(range(40))
    assert 1 <= submissions["max_in_flight"] <= WINDOW, submissions
    assert folder.complete() == list(range(40))
    assert [folder.read_marker(i)["ok"] for i in range(40)] == list(range(40))
    assert runner.run_tasks(folder, {i: {} for i in range(40)}, quick, RES) == 0  # a rerun: nothing to do


def test_the_window_is_sized_by_the_cluster(ray_head, folder, submissions):
    """The session's head has 4 CPUs: 4 one-CPU tasks at once, 8 in flight."""
    _ship_this_module_by_value()
    assert runner.run_tasks(folder, {i: {} for i in range(24)}, quick, RES) == 24
    assert submissions["max_in_flight"] <= 8, submissions


def test_a_failed_unit_leaves_at_most_a_window_of_tasks_behind(ray_head, folder, submissions, monkeypatch):
    """Unit 3 of 40 fails: the stage fails naming it, and the units past the window were never submitted,
    so what is left running (not cancelled: see the note below runner._watched) is bounded. It submitted
    all 40, and 36 went on running after the stage had failed."""
    _ship_this_module_by_value()
    monkeypatch.setattr(runner, "window_for", lambda request, nodes: WINDOW, raising=False)
    with pytest.raises(runner.UnitFailed, match="unit 3 cannot read its input"):
        runner.run_tasks(folder, {i: {} for i in range(40)}, third_fails, RES)
    submitted = set(submissions["units"])
    assert 3 in submitted and len(submitted) <= 3 * WINDOW < 40, submissions
    # the ones left finish their units and mark them (a rerun skips them); no other unit was started
    deadline = time.monotonic() + 60
    while folder.complete() != sorted(submitted - {3}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert folder.complete() == sorted(submitted - {3})


# ---- B: completion counts the returned markers ---------------------------------------------------
def _stale_listing(monkeypatch, hide: set[int]) -> None:
    """The driver's listings of _markers/ miss these units (a cached NFS directory, an object store's
    listing cache): the markers their tasks wrote last on other nodes."""
    real = StageFolder.complete
    monkeypatch.setattr(StageFolder, "complete", lambda self: [i for i in real(self) if i not in hide])


def test_units_whose_tasks_returned_their_markers_count_when_the_listing_misses_them(ray_head, folder,
                                                                                    monkeypatch):
    """It reported `samples units [7, 8, 9] ... did not complete` for a stage whose every task had returned."""
    _ship_this_module_by_value()
    _stale_listing(monkeypatch, {7, 8, 9})
    assert runner.run_tasks(folder, {i: {} for i in range(10)}, quick, RES) == 10


def test_an_actor_pools_units_count_when_the_listing_misses_them(ray_head, folder, monkeypatch):
    _ship_this_module_by_value()
    _stale_listing(monkeypatch, {2})
    assert runner.run_actor_pool(folder, {i: {} for i in range(3)}, Noop, {}, RES) == 3


def test_a_unit_neither_returned_nor_marked_is_still_reported(folder, monkeypatch):
    folder.mark_complete(0, {"ok": 0})
    runner.check_complete(folder, [0, 1], returned={1})  # 0 listed, 1 returned
    with pytest.raises(StorageError, match=r"samples units \[2\] .* did not complete; rerun the same command"):
        runner.check_complete(folder, [0, 1, 2], returned={1})

    def no_listing(self):
        raise AssertionError("listed although every unit returned its marker")

    monkeypatch.setattr(StageFolder, "complete", no_listing)
    runner.check_complete(folder, [0, 1, 2], returned={0, 1, 2})
