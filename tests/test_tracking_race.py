"""tracker=mlflow by run name (memex/tracking.py `_mlflow_run_by_name`): jobs that log one series at the same
moment converge on one run.

Plan mode runs a job per checkpoint side by side. Two jobs of a new series each searched the experiment for the
series' run, found none and created one: two runs of one name, the series' curve split between them. The race
is forced here with a barrier that holds each job's first search until the other has searched too, on MLflow's
file store and its sqlite store (the default).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from memex import tracking
from memex.tracking import log_audit

from conftest import compose

SERIES, NAME = "/fsx/train/sd15-ft", "sd15-ft"


def _store(tmp_path: Path, kind: str, monkeypatch) -> str:
    if kind == "file":
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
        return (tmp_path / "mlruns").as_uri()
    monkeypatch.chdir(tmp_path)  # the sqlite store keeps artifacts in ./mlruns
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _audit(uri: str, step: int):
    """A nightly audit's config at `step` of the series (memex/stages/nightly.py sets the tracker this way)."""
    cfg = compose(["trainset.path=/data/train.parquet", "tracker=mlflow", f"tracker.tracking_uri={uri}",
                   "tracker.experiment=nightly"], config_name="audit")
    return replace(cfg, tracker=tracking.at_checkpoint(cfg.tracker, step, SERIES, NAME))


def _summary(step: int) -> dict:
    return {"run": f"/runs/sd15-ft-step{step}", "model": {"name": "sd15-ft"},
            "extracted_unique_train_images": step // 1000, "prompts_flagged": 1}


@pytest.mark.parametrize("store", ["file", "sqlite"])
def test_two_jobs_of_a_new_series_logging_at_once_share_one_run(tmp_path, monkeypatch, store):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    uri = _store(tmp_path, store, monkeypatch)
    client = MlflowClient(uri)
    # the experiment is there before the jobs race: the file store lets two jobs create two experiments of one
    # name (a database store refuses the second, and memex takes the first: `_mlflow_experiment`)
    exp = client.create_experiment("nightly")
    barrier, first, errors = threading.Barrier(2), threading.local(), []
    real_search = MlflowClient.search_runs

    def search_then_wait(self, *a, **k):
        out = real_search(self, *a, **k)
        if not getattr(first, "done", False):  # both jobs have searched before either creates
            first.done = True
            barrier.wait(timeout=60)
        return out

    monkeypatch.setattr(MlflowClient, "search_runs", search_then_wait)
    if store == "file":  # its writes are not safe for two writers into one run (a param file is truncated, then
        # written; a metric folder made after checking it is absent); the jobs' logging takes turns here
        lock, real_log = threading.Lock(), tracking._mlflow_log

        def one_at_a_time(*a, **k):
            with lock:
                return real_log(*a, **k)

        monkeypatch.setattr(tracking, "_mlflow_log", one_at_a_time)

    cfgs = {step: _audit(uri, step) for step in (1000, 2000)}  # Hydra's compose is not for threads

    def job(step):
        try:
            log_audit(cfgs[step], _summary(step), None, f"sd15-ft-step{step}")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=job, args=(step,)) for step in (1000, 2000)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    monkeypatch.setattr(MlflowClient, "search_runs", real_search)
    assert not errors, errors
    assert not barrier.broken  # the interleaving was forced: both searched before either created

    runs = client.search_runs([exp])
    assert [(r.info.run_name, r.info.status) for r in runs] == [(NAME, "FINISHED")], \
        [(r.info.run_id, r.info.run_name) for r in runs]
    rid = runs[0].info.run_id
    assert sorted((m.step, m.value) for m in client.get_metric_history(rid, "memex/extracted_images")) == \
        [(1000, 1.0), (2000, 2.0)]
    # both jobs created a run (the barrier saw to it); the losing job deleted its own, empty (MLflow keeps
    # deleted runs in its trash)
    (gone,) = client.search_runs([exp], run_view_type=ViewType.DELETED_ONLY)
    assert gone.info.run_name == NAME and not gone.data.metrics and not gone.data.params


def test_runs_of_one_name_already_there_the_oldest_gets_the_points(tmp_path, monkeypatch):
    """Runs of the series' name left by an earlier race (or made by hand): every job logs into the same one,
    the oldest by start time, then run id (it was the newest: a run created a moment later by another job
    drew the curve away from the one the earlier jobs took). A deleted run is no candidate."""
    from mlflow.tracking import MlflowClient

    uri = _store(tmp_path, "file", monkeypatch)
    client = MlflowClient(uri)
    exp = client.create_experiment("nightly")
    t0 = 1_700_000_000_000
    deleted = client.create_run(exp, start_time=t0 - 1000, run_name=NAME).info.run_id
    client.delete_run(deleted)
    tied = sorted(client.create_run(exp, start_time=t0, run_name=NAME).info.run_id for _ in range(2))
    newest = client.create_run(exp, start_time=t0 + 1000, run_name=NAME).info.run_id
    for step in (1000, 2000):
        log_audit(_audit(uri, step), _summary(step), None, f"sd15-ft-step{step}")
    assert [m.step for m in client.get_metric_history(tied[0], "memex/extracted_images")] == [1000, 2000]
    for other in (tied[1], newest, deleted):
        assert not client.get_run(other).data.metrics


def test_params_another_job_logged_a_moment_ago_are_skipped_not_a_failure(tmp_path, monkeypatch):
    """The jobs that converge on one new run each find it without params and log them at once: both database
    sessions read no params, and the second insert of a key fails (sqlite3.IntegrityError: UNIQUE constraint
    failed: params.key, params.run_uuid), which failed that job's logging. The store's answer is played here: the
    other job's params land just before this job's insert, which fails as it did in the race. The job reads the
    run's params again and logs the keys still missing."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = _store(tmp_path, "sqlite", monkeypatch)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("nightly"), run_name=NAME, tags={"memex.created_by": "memex"})
    rid = run.info.run_id
    settings = tracking.params(_audit(uri, 1000))
    other = [Param("memex." + k, v) for k, v in sorted(settings.items())[::2]]
    real_batch, raced = MlflowClient.log_batch, []

    def insert_raced_by_the_other_job(self, run_id, metrics=(), params=(), tags=(), **k):
        if params and not raced:
            raced.append(True)
            real_batch(self, run_id, params=other)
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: params.key, params.run_uuid")
        return real_batch(self, run_id, metrics=metrics, params=params, tags=tags, **k)

    monkeypatch.setattr(MlflowClient, "log_batch", insert_raced_by_the_other_job)
    tracking._mlflow_log(client, run, {"memex/extracted_images": 1.0}, settings, _summary(1000), None, None, 1000,
                         "step-1000/sd15-ft-step1000")
    r = client.get_run(rid)
    assert raced and r.data.metrics == {"memex/extracted_images": 1.0}
    assert r.data.params == {"memex." + k: v for k, v in settings.items()}
