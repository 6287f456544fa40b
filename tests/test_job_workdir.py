"""A local path inside a Ray job's copy of its working_dir is refused on every path that writes one.

Under `ray job submit --working-dir .` the driver runs in Ray's unpacked copy of the working dir
(.../runtime_resources/working_dir_files/_ray_pkg_<hash>), which Ray deletes once the job is done. The
executor=ray path refused a relative storage.root there (runner.check_storage_reachable); executor=local,
`memex train`'s output and nightly's ledger wrote into the copy and exited 0, their results deleted with it.
These tests simulate the job's driver (Ray's $RAY_JOB_CONFIG_JSON_ENV_VAR and a _ray_pkg_ working folder):
no Ray is started."""

from __future__ import annotations

import json
import sys

import pytest

from memex import cli, runner
from memex.config import ConfigError, ExecutorKind, ResourcesConfig, StorageConfig
from memex.storage import RAY_JOB_CONFIG

from conftest import compose

REFUSED = r"is inside this Ray job's copy of its working_dir .* give object storage \(s3://bucket/\.\.\.\) or an " \
          r"absolute path outside it"


@pytest.fixture
def job(tmp_path, monkeypatch):
    """This process as a Ray job's driver, in its working_dir copy; returns the copy."""
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv(RAY_JOB_CONFIG, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_abc123.zip"}}))
    return copy


def test_executor_local_refuses_a_storage_or_index_root_in_the_jobs_working_dir_copy(job, tmp_path, monkeypatch):
    """runner.init returned for resources.executor=local before any storage check: nothing was refused."""
    local = ResourcesConfig(executor=ExecutorKind.local)
    with pytest.raises(ConfigError, match=r"^storage.root=runs " + REFUSED):
        runner.init(local, StorageConfig(root="runs"))
    with pytest.raises(ConfigError, match=r"^index.root=index " + REFUSED):
        runner.init(local, StorageConfig(root=str(tmp_path / "runs")), "index")
    runner.init(local, StorageConfig(root=str(tmp_path / "runs")), str(tmp_path / "index"))  # outside the copy
    runner.init(local, StorageConfig(root="s3://b/runs"))
    monkeypatch.delenv(RAY_JOB_CONFIG)
    runner.init(local, StorageConfig(root="runs"), "index")  # not a job: this folder is the user's own


def test_memex_generate_executor_local_in_a_ray_job_exits_1_naming_the_fix(job, monkeypatch, capsys):
    """README's bad-input row: `memex generate resources.executor=local` (storage.root=runs, the default) in a
    job exited 0, its samples written into the copy Ray deletes; now exit 1 before any sample is generated."""
    monkeypatch.setattr(sys, "argv", ["memex", "generate", "resources.executor=local", "prompts.limit=1",
                                      "sampling.samples_per_prompt=1", "sampling.batch_size=1"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and "memex: error: storage.root=runs is inside this Ray job's copy" in err, err
    assert not list(job.glob("runs/*/samples/*.parquet"))


def test_train_refuses_an_output_in_the_jobs_working_dir_copy_before_any_work(job, tmp_path):
    """`python jobs/train.py trainer=quick output=models/logos` (README's command) in a job saved the model into
    the copy, exit 0. Refused before the output folder is made or any image decoded."""
    from memex.training import train

    cfg = compose(["output=models/logos", "trainer=quick"], config_name="train")
    with pytest.raises(ConfigError, match=r"^output=models/logos " + REFUSED):
        train(cfg)
    assert not (job / "models").exists()
    cfg = compose([f"output={job}/out", "trainer=quick"], config_name="train")  # absolute, still in the copy
    with pytest.raises(ConfigError, match=REFUSED):
        train(cfg)


def test_nightly_refuses_a_ledger_in_the_jobs_working_dir_copy(job, tmp_path):
    """A relative nightly.ledger (or storage.root, where the ledger goes by default) in a job: every night's
    ledger rows, which say what was audited, went with the copy."""
    from memex.stages import nightly

    location = tmp_path / "watch"
    location.mkdir()
    common = ["nightly=default", f"nightly.location={location}", "resources.executor=local", "model=local",
              "trainset=manifest", "trainset.path=/data/t.parquet"]
    cfg = compose([*common, f"storage.root={tmp_path / 'runs'}", "nightly.ledger=ledger"], config_name="nightly")
    with pytest.raises(ConfigError, match=r"^nightly.ledger=ledger " + REFUSED):
        nightly.run(cfg)
    cfg = compose([*common, "storage.root=runs"], config_name="nightly")
    with pytest.raises(ConfigError, match=r"^storage.root=runs " + REFUSED):
        nightly.run(cfg)
    assert not (job / "ledger").exists() and not (job / "runs").exists()
    cfg = compose([*common, f"storage.root={tmp_path / 'runs'}"], config_name="nightly")
    assert nightly.run(cfg).checkpoints == 0  # outside the copy: an empty location, nothing to audit
