"""Nights that overlap, and where a night's tracker puts each series of results.

memex nightly's alarm rows are paged once (memex/ledger.py "who pages an alarm row") even when a night
starts while the one before still audits; each (series, config) of results is a curve of its own in the
tracker (memex/tracking.py at_checkpoint); tracker=wandb online without an API key is refused before any
audit work. The audits themselves are replaced by their summaries: these tests check the bookkeeping.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from memex import tracking
from memex.config import ConfigError, TrackerConfig, TrackerKind, WandbMode
from memex.ledger import Ledger
from memex.stages import audit, nightly

from conftest import REPO, SMALL_AUDIT, compose

DEMO_RUN = REPO / "demo" / "checkpoints" / "demo-text-run"


def _checkpoints(tmp_path: Path, *steps: int, ema: bool = False) -> Path:
    """watch/demo-text-run/checkpoint-<step>/ of the demo training run (unet_ema/: a copy of unet/)."""
    for step in steps:
        dst = tmp_path / "watch" / "demo-text-run" / f"checkpoint-{step}"
        shutil.copytree(DEMO_RUN / f"checkpoint-{step}", dst)
        if ema:
            shutil.copytree(dst / "unet", dst / "unet_ema")
    return tmp_path / "watch"


def _cfg(tmp_path: Path, *extra: str):
    return compose([f"nightly.location={tmp_path / 'watch'}", f"storage.root={tmp_path / 'runs'}",
                    "resources.executor=local", *SMALL_AUDIT, *extra], config_name="nightly")


def _summary(extracted: int) -> dict:
    return {"samples": 32, "extracted_unique_train_images": extracted, "extracted_generations": extracted,
            "prompts_flagged": 1}


def _night(cfg, paged: list) -> nightly.NightlyResult:
    """A whole night as the command runs it: its alarms paged (the ALARM line), then marked announced."""
    res = nightly.run(cfg)
    paged.extend(r["location"] for r in res.alarms)
    if res.alarms:
        nightly.mark_announced(cfg, res)
    return res


def test_a_night_started_while_the_last_one_audits_leaves_its_alarms_to_it(tmp_path, monkeypatch):
    """Night N audits checkpoint 1000 (over nightly.budget: an alarm row), and while it audits 2000 night N+1
    starts, finds 2000's run folder held and 1000's alarm row not yet announced. It paged that row as one "a
    night ended before announcing", and N paged it again when it finished: two pages of one alarm. A row is
    claimed by the job that wrote it while that job lives: N+1 leaves it to N, and each alarm is paged once."""
    _checkpoints(tmp_path, 1000, 2000)
    cfg = _cfg(tmp_path, "nightly.budget=0")
    paged: dict[str, list] = {"N": [], "N+1": []}
    nested: list = []

    def fake_audit(acfg, **_):
        if "checkpoint-2000" in acfg.model.unet and not nested:
            # night N+1, a process of its own (here a thread: the run folder's lease is per thread)
            t = threading.Thread(target=lambda: nested.append(_night(cfg, paged["N+1"])))
            t.start()
            t.join()
        return _summary(5)

    monkeypatch.setattr(audit, "run", fake_audit)
    res = _night(cfg, paged["N"])
    (later,) = nested
    assert [s["reason"] for s in later.skipped] == ["another job audits it now (its run folder's lease)"]
    assert [r["step"] for r in res.rows] == [1000, 2000]
    assert paged["N+1"] == [] and later.earlier_alarms == []
    assert sorted(paged["N"]) == sorted(r["location"] for r in res.rows)
    assert _night(cfg, []).alarms == []  # nothing left to page


def test_a_dead_nights_alarm_is_paged_once_by_the_nights_after_it(tmp_path, monkeypatch):
    """A night that wrote an alarm row and died before its ALARM line leaves it to a later night, which pages
    it. Two later nights that overlap (X still running when Y finishes) both read it as unannounced, and both
    paged it; now X claims it and Y leaves it to X. X dying too before its ALARM line hands it on again."""
    _checkpoints(tmp_path, 1000)
    cfg = _cfg(tmp_path, "nightly.budget=0")
    monkeypatch.setattr(audit, "run", lambda acfg, **_: _summary(5))

    dead = nightly.run(cfg)  # night D: its row written, then killed before its ALARM line
    (row,) = dead.rows
    assert row["outcome"] == "over_budget" and dead.alarms == [row]
    lease = getattr(dead, "job_lease", None)
    if lease is not None:
        lease.release()  # its process exits (atexit): its claims lapse

    x = nightly.run(cfg)  # night X: pages D's row, and is still running (its ALARM line not printed yet)
    assert [r["location"] for r in x.alarms] == [row["location"]] and "ended before announcing" in \
        x.alarms[0]["message"]
    y = nightly.run(cfg)  # night Y, overlapping X: X pages that row, not Y
    assert y.alarms == [] and nightly.payload(y)["alarms"] == []

    lease = getattr(x, "job_lease", None)
    if lease is not None:
        lease.release()  # X dies too before its ALARM line
    paged: list = []
    _night(cfg, paged)  # the next night pages it, once
    assert paged == [row["location"]]
    again: list = []
    _night(cfg, again)
    assert again == []
    assert [r["outcome"] for r in Ledger(nightly.ledger_root(cfg)).read().to_pylist()] == ["over_budget"]
    assert not list(Path(nightly.ledger_root(cfg)).rglob("jobs/*/_lease.json"))  # every night's job lease ended


def test_an_alarm_announced_between_a_nights_read_and_its_claim_is_not_paged_again(tmp_path, monkeypatch):
    """Night Y reads the ledger's unannounced alarm rows, then claims each; night X, which claimed a row, prints
    its ALARM line, marks the row announced and ends in between. X's claim then reads as a dead job's, and Y
    claimed the row and paged it a second time. The claim now reads the announced mark again first."""
    _checkpoints(tmp_path, 1000)
    cfg = _cfg(tmp_path, "nightly.budget=0")
    monkeypatch.setattr(audit, "run", lambda acfg, **_: _summary(5))
    x = nightly.run(cfg)  # night X: its alarm row written and claimed
    assert len(x.alarms) == 1
    ledger = Ledger(nightly.ledger_root(cfg))
    stale = ledger.unannounced(x.config_sha256)  # what night Y read, before X announced
    assert [r["location"] for r in stale] == [x.alarms[0]["location"]]
    nightly.mark_announced(cfg, x)  # X pages it, marks it and ends (its job lease released)
    monkeypatch.setattr(Ledger, "unannounced", lambda self, sha: stale)
    res = nightly.run(cfg)  # night Y: nothing pending, and the row it read is X's, announced since
    assert res.earlier_alarms == [] and res.alarms == []


def test_raw_and_ema_audits_of_one_run_are_two_tensorboard_runs_and_two_mlflow_run_names(tmp_path, monkeypatch):
    """nightly.ema=true audits a run's EMA weights under a config hash of its own, beside a nightly of the raw
    weights. With tracker=tensorboard both wrote into tracker.log_dir itself, with every other series of the
    location: two points at step 1000 of one memex/extracted_images curve. mlflow and wandb named the run after
    the series alone: the raw and EMA numbers in one run. Each is a run of its own now: log_dir/<series>/ and
    log_dir/<series>-ema/, run names <series> and <series>-ema; tracker.run_name still wins."""
    _checkpoints(tmp_path, 1000, ema=True)
    logged: list = []

    def fake_audit(acfg, **_):
        s = {**_summary(7 if acfg.model.unet.endswith("unet_ema") else 3), "run": acfg.run.name,
             "model": {"name": acfg.model.name}}
        logged.append(acfg.tracker)
        tracking.log_audit(acfg, s, None, acfg.run.name)  # what audit.run does last
        return s

    monkeypatch.setattr(audit, "run", fake_audit)
    log_dir = tmp_path / "train" / "logs"
    for ema in ("false", "true"):
        nightly.run(_cfg(tmp_path, "tracker=tensorboard", f"tracker.log_dir={log_dir}", f"nightly.ema={ema}"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {p.parent.relative_to(log_dir).as_posix() for p in log_dir.rglob("events.out.tfevents.*")}
    assert runs == {"demo-text-run", "demo-text-run-ema"}
    for run, value in (("demo-text-run", 3.0), ("demo-text-run-ema", 7.0)):
        acc = EventAccumulator(str(log_dir / run), size_guidance={"scalars": 0})
        acc.Reload()
        assert [(e.step, e.value) for e in acc.Scalars("memex/extracted_images")] == [(1000, value)]

    # mlflow (wandb: the same run_name): the config handed to the tracker, per weights kind; a user's name wins
    monkeypatch.setattr(tracking, "log_audit", lambda *a, **k: None)
    for extra, want in (((), ["demo-text-run", "demo-text-run-ema"]), (("tracker.run_name=mine",), ["mine", "mine"])):
        logged.clear()
        for ema in ("false", "true"):
            root = tmp_path / f"mlflow-{len(extra)}"
            cfg = compose([f"nightly.location={tmp_path / 'watch'}", f"storage.root={root}", "resources.executor=local",
                           *SMALL_AUDIT, "tracker=mlflow", "tracker.tracking_uri=http://mlflow.invalid",
                           f"nightly.ema={ema}", *extra], config_name="nightly")
            nightly.run(cfg)
        assert [t.run_name for t in logged] == want and [t.step for t in logged] == [1000, 1000]


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    """No key anywhere wandb looks: no WANDB_API_KEY, an empty home (no ~/.netrc), no session login."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    from wandb.sdk import wandb_setup

    monkeypatch.setattr(wandb_setup.singleton().settings, "api_key", None, raising=False)
    return tmp_path / "home"


def test_wandb_online_without_an_api_key_is_refused_before_any_audit(no_wandb_key, monkeypatch):
    """tracker=wandb tracker.mode=online with no API key (no WANDB_API_KEY, no netrc entry for wandb's host):
    the audit (every nightly audit) ran to the end and failed only when it logged. Refused by the preflight,
    naming the fixes; a key in the environment or in ~/.netrc (wandb's own lookup, no network) passes."""
    online = TrackerConfig(kind=TrackerKind.wandb, mode=WandbMode.online, project="sd-ft")
    with pytest.raises(ConfigError, match=r"tracker.mode=online needs a W&B API key.*set WANDB_API_KEY.*"
                                          r"`wandb login`.*tracker.mode=offline"):
        tracking.check(online)
    tracking.check(TrackerConfig(kind=TrackerKind.wandb, mode=WandbMode.offline, dir=str(no_wandb_key)))  # no key
    netrc = no_wandb_key / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'a' * 40}\n")
    netrc.chmod(0o600)
    tracking.check(online)
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    tracking.check(online)
