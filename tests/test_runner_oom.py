"""runner.oom_kills asks Ray's state API (served by the dashboard) which workers its memory monitor killed. A
dashboard on a loaded node can miss one 10 s window: the stage's failure line then said only "the log names
why" (a CI run's test_a_unit_whose_worker_dies_every_time_fails_the_stage_after_max_starts got that line). It is
asked again, up to three times. No Ray is started: the state API's call is replaced."""
import types

import pytest

from memex import runner


@pytest.mark.parametrize("fails, expected, calls", [(0, 0, 1), (2, 0, 3), (3, None, 3)])
def test_a_state_api_that_misses_a_window_is_asked_again(monkeypatch, fails, expected, calls):
    import ray.util.state

    asked = []

    def list_workers(**kwargs):
        asked.append(kwargs["timeout"])
        if len(asked) <= fails:
            raise TimeoutError("the dashboard did not answer in 10 s")
        return []  # none killed for memory

    monkeypatch.setattr(ray.util.state, "list_workers", list_workers)
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    assert runner.oom_kills() == expected and len(asked) == calls and set(asked) == {10}


def test_the_workers_killed_since_the_command_started_are_counted(monkeypatch):
    import ray.util.state

    dead = [types.SimpleNamespace(end_time_ms=runner._STARTED_MS - 5),  # before this command: not its
            types.SimpleNamespace(end_time_ms=runner._STARTED_MS + 5), types.SimpleNamespace(end_time_ms=None)]
    monkeypatch.setattr(ray.util.state, "list_workers", lambda **kwargs: dead)
    assert runner.oom_kills() == 1
