"""memex nightly's gate when a series' audits finish out of step order (plan mode's jobs side by side, a failed
audit retried the next night), a training run restarts into its output_dir, or the trainer deletes a checkpoint
as its audit ends; and the webhook's status on a night that exits 3.

The audit itself is monkeypatched (a given count per checkpoint): these tests check the bookkeeping, the ledger
and the gate, on the demo's checkpoints (tests/test_nightly.py audits them for real).
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from pathlib import Path

import pytest

from memex.ledger import Ledger
from memex.stages import audit, nightly

from conftest import REPO, SMALL_AUDIT, compose

DEMO_RUN = REPO / "demo" / "checkpoints" / "demo-text-run"
BASE = REPO / "demo" / "models" / "demo-text"


def _cfg(tmp: Path, *extra: str):
    return compose([f"nightly.location={tmp / 'watch'}", f"storage.root={tmp / 'runs'}", "resources.executor=local",
                    *SMALL_AUDIT, *extra], config_name="nightly")


def _fake_audit(monkeypatch, counts: dict[str, int], fail: tuple[str, ...] = ()) -> None:
    """audit.run returning counts[<checkpoint folder name>] extracted images; the names in `fail` raise."""
    def run(acfg, **_):
        name = Path(acfg.model.unet).parent.name if acfg.model.unet else Path(acfg.model.path).name
        if name in fail:
            raise RuntimeError(f"{name}: the audit failed")
        n = counts[name]
        return {"samples": 32, "extracted_unique_train_images": n, "extracted_generations": n, "prompts_flagged": 0}

    monkeypatch.setattr(audit, "run", run)


@pytest.fixture
def seconds_apart(monkeypatch):
    """Each ledger row finishes a second after the one before: the ledger keeps whole seconds, and a night's
    audits take minutes, but these fake ones finish within one second, where which row saw which is unknown."""
    last: list[dt.datetime] = []
    real = Ledger.append

    def append(self, row):
        if last and row["finished"] <= last[-1]:
            row["finished"] = last[-1] + dt.timedelta(seconds=1)
        last.append(row["finished"])
        return real(self, row)

    monkeypatch.setattr(Ledger, "append", append)


def _night(cfg) -> nightly.NightlyResult:
    """One night (or one plan-mode job), its alarms marked announced as the CLI does after its ALARM line."""
    res = nightly.run(cfg)
    nightly.mark_announced(cfg, res)
    return res


def _steps(location: Path, steps) -> None:
    for s in steps:
        shutil.copytree(DEMO_RUN / f"checkpoint-{s}", location / f"checkpoint-{s}")


def test_a_final_model_whose_job_finished_first_gates_its_last_checkpoint(tmp_path, monkeypatch, seconds_apart):
    """diffusers' train_text_to_image: output_dir/ holds the final pipeline (step None) and its checkpoint-<step>/
    folders. Plan mode's job of the final model finished first: it was gated against nothing, and no checkpoint
    was ever compared with it (_next took steps only), so a jump to the model that ships passed as ok. The
    checkpoints audited after it are compared with it, the message naming it."""
    run_dir = tmp_path / "watch" / "sd-finetuned"
    shutil.copytree(BASE, run_dir)
    (run_dir / "memex_train.json").unlink()  # a diffusers training output: its pipeline has no step
    _steps(run_dir, (1000, 2000))
    cfg = _cfg(tmp_path, "nightly.growth_margin=2")
    jobs = {Path(p.ckpt.location).name: p.ckpt.location for p in nightly.plan(cfg).pending}
    assert sorted(jobs) == ["checkpoint-1000", "checkpoint-2000", "sd-finetuned"]
    _fake_audit(monkeypatch, {"checkpoint-1000": 0, "checkpoint-2000": 0, "sd-finetuned": 10})

    alarms = {}
    for name in ("sd-finetuned", "checkpoint-2000", "checkpoint-1000"):  # the final model's job first
        res = _night(_cfg(tmp_path, "nightly.growth_margin=2", f"nightly.only={jobs[name]}"))
        alarms[name] = [a["message"] for a in res.alarms]
    assert alarms == {"sd-finetuned": [], "checkpoint-1000": [], "checkpoint-2000": [
        "the final model, audited before this one, extracted 10 training images, 10 more than this step (0); "
        "growth margin is 2"]}


@pytest.mark.parametrize("counts,order,paged", [
    # step 2000 fails night 1 and is retried night 2; 3000 was gated against 1000 and paged that night
    ({1000: 0, 2000: 5, 3000: 5}, "retry", []),  # the growth is 1000 -> 2000: 3000 paged it
    ({1000: 0, 2000: 0, 3000: 5}, "retry", []),  # the growth is 2000 -> 3000: 3000 paged it
    ({1000: 0, 2000: 12, 3000: 5}, "retry", [  # a peak at 2000 beyond what 3000 paged: paged
        (2000, "extracted 12 training images, 12 more than step 1000 (0) and 7 more than step 3000 (5), audited "
               "before this one, whose growth over step 1000 was paged then; growth margin is 2")]),
    # plan mode's jobs finishing 3000, 1000, 2000: 1000 paged the growth to 3000 (its next step, audited first)
    ({1000: 0, 2000: 0, 3000: 5}, (3000, 1000, 2000), [
        (1000, "step 3000, audited before this one, extracted 5 training images, 5 more than this step (0); growth "
               "margin is 2")]),
    ({1000: 0, 2000: 5, 3000: 5}, (3000, 1000, 2000), [
        (1000, "step 3000, audited before this one, extracted 5 training images, 5 more than this step (0); growth "
               "margin is 2")]),
], ids=["retried-step-grew", "retried-next-step-grew", "retried-step-peaks", "jobs-out-of-order-next-step-grew",
        "jobs-out-of-order-step-grew"])
def test_a_step_audited_after_its_next_step_does_not_page_the_same_growth_again(
        tmp_path, monkeypatch, seconds_apart, counts, order, paged):
    """Step 2000 audited after 3000 (its audit retried the next night, or plan mode's jobs out of order): 3000 was
    compared with 1000 (or 1000 with 3000) and that growth paged; 2000's gate then paged it again, as its own
    growth over 1000 or as 3000's over it. It pages only a peak beyond what was paged."""
    location = tmp_path / "watch" / "run"
    _steps(location, counts)
    names = {f"checkpoint-{s}": n for s, n in counts.items()}
    after_night_1 = []
    if order == "retry":
        _fake_audit(monkeypatch, names, fail=("checkpoint-2000",))
        after_night_1 = [a["step"] for a in _night(_cfg(tmp_path, "nightly.growth_margin=2")).alarms]
        _fake_audit(monkeypatch, names)
        res = _night(_cfg(tmp_path, "nightly.growth_margin=2"))
        assert [r["step"] for r in res.rows] == [2000]
        got = [(a["step"], a["message"]) for a in res.alarms]
    else:
        _fake_audit(monkeypatch, names)
        got = []
        for step in order:
            res = _night(_cfg(tmp_path, "nightly.growth_margin=2", f"nightly.only={location / f'checkpoint-{step}'}"))
            got += [(a["step"], a["message"]) for a in res.alarms]
    assert after_night_1 == ([3000] if order == "retry" else [])
    assert got == paged


def test_a_restarted_runs_step_audited_before_its_retried_previous_one_is_not_gated_against_the_old_run(
        tmp_path, monkeypatch):
    """Training restarted into the same output_dir, writing steps 1000 and 2000 again. The new 1000's audit
    failed, so the new 2000 was gated against the old run's 1000 (_previous had no "finished after it was
    written" check, unlike _next): a false "grew". An earlier step's row whose checkpoint was written again
    after the row finished is passed over."""
    location = tmp_path / "watch" / "run"
    _steps(location, (1000, 2000))
    cfg = _cfg(tmp_path, "nightly.growth_margin=2")
    _fake_audit(monkeypatch, {"checkpoint-1000": 0, "checkpoint-2000": 0})
    assert [r["outcome"] for r in _night(cfg).rows] == ["ok", "ok"]  # the old run

    time.sleep(1.1)  # the ledger keeps whole seconds: the restart comes after the old rows' second
    for step in (1000, 2000):  # the restarted run saves other weights at the same steps
        for f in (location / f"checkpoint-{step}" / "unet").glob("*.safetensors"):
            b = bytearray(f.read_bytes())
            b[-1] ^= 1
            f.write_bytes(bytes(b))
    new = {"checkpoint-1000": 5, "checkpoint-2000": 6}
    _fake_audit(monkeypatch, new, fail=("checkpoint-1000",))
    res = _night(cfg)
    assert [(r["step"], r["outcome"], r["message"]) for r in res.rows][1] == (2000, "ok", "")
    assert res.alarms == []
    _fake_audit(monkeypatch, new)
    res = _night(cfg)  # the new 1000, retried: gated against the new 2000 (one more), not the old one
    assert [(r["step"], r["outcome"]) for r in res.rows] == [(1000, "ok")] and res.alarms == []


def test_an_earlier_steps_files_copied_again_with_the_same_bytes_still_gate_the_next_step(tmp_path, monkeypatch):
    """A checkpoint folder copied again without its mtimes (cp -r, rsync without -t, a mirror synced again) holds
    the same weights: its row is still the next step's previous one. Judged by the files' times, every earlier
    row looked rewritten, and the next step was compared with nothing (a missed "grew")."""
    import os

    location = tmp_path / "watch" / "run"
    _steps(location, (1000,))
    cfg = _cfg(tmp_path, "nightly.growth_margin=2")
    _fake_audit(monkeypatch, {"checkpoint-1000": 0, "checkpoint-2000": 9})
    assert [r["outcome"] for r in _night(cfg).rows] == ["ok"]
    time.sleep(1.1)  # the ledger keeps whole seconds: the copy comes after the row's second
    for f in (location / "checkpoint-1000").rglob("*"):
        if f.is_file():
            os.utime(f, None)  # the same bytes, written now
    _steps(location, (2000,))
    res = _night(cfg)
    assert [(r["step"], r["outcome"]) for r in res.rows] == [(2000, "grew")], res.rows
    assert "9 more than step 1000 (0)" in res.rows[0]["message"]


def test_a_pipeline_checkpoint_deleted_as_its_audit_ends_keeps_its_row_and_the_night_goes_on(tmp_path, monkeypatch):
    """Pipelines exported side by side (step-1000/, step-2000/), the trainer rotating them: step-1000/ deleted
    just as its audit returned. written_at read the gone folder as a hub id with no weight files and raised a
    CheckpointError the gate did not catch: the finished audit's row was lost, and step-2000 never audited.
    A gone checkpoint is a FileNotFoundError now: the row is kept, and at plan time it is left out as deleted
    (it was skipped as "no weight files")."""
    watch = tmp_path / "watch"
    for step in (1000, 2000, 3000):
        shutil.copytree(BASE, watch / f"step-{step}")
        (watch / f"step-{step}" / "memex_train.json").unlink()  # the step is the folder's
        f = next((watch / f"step-{step}" / "unet").glob("*.safetensors"))
        b = bytearray(f.read_bytes())
        b[-1] ^= step // 1000  # each its own weights
        f.write_bytes(bytes(b))
    shutil.move(watch / "step-3000", tmp_path / "later")
    cfg = _cfg(tmp_path)

    def run(acfg, **_):
        if Path(acfg.model.path).name == "step-1000":
            shutil.rmtree(acfg.model.path)  # the trainer's rotation, as the audit returns
        return {"samples": 32, "extracted_unique_train_images": 1, "extracted_generations": 1, "prompts_flagged": 0}

    monkeypatch.setattr(audit, "run", run)
    res = nightly.run(cfg)
    assert [(r["step"], r["outcome"]) for r in res.rows] == [(1000, "ok"), (2000, "ok")] and res.skipped == []
    assert sorted(r["step"] for r in Ledger(nightly.ledger_root(cfg)).read().to_pylist()) == [1000, 2000]

    shutil.move(tmp_path / "later", watch / "step-3000")  # found by the plan, then rotated away before hashing
    found = nightly.discover(str(watch))
    shutil.rmtree(watch / "step-3000")
    monkeypatch.setattr(nightly, "discover", lambda *a, **k: found)
    planned = nightly.plan(cfg)
    assert planned.pending == [] and planned.skipped == []


def test_the_webhooks_status_is_alarm_on_a_night_that_exits_3():
    """An alarm and a failed audit the same night: the CLI exits 3 (the alarm wins,
    test_an_alarm_wins_the_exit_code_over_failed_audits_and_webhook), and the webhook said "error": a receiver
    that pages on "alarm" never paged. Its status ranks them as the exit code does."""
    def row(loc, outcome, message):
        return {"location": loc, "step": 1, "extracted": 2, "flagged_prompts": 0, "outcome": outcome,
                "message": message, "weights_sha256": loc[-1] * 64, "config_sha256": "c" * 64}

    error, alarm = row("/ck/a", "error", "boom"), row("/ck/b", "over_budget", "2 > nightly.budget=0")
    body = nightly.payload(nightly.NightlyResult("c" * 64, 2, [], rows=[error, alarm]))
    assert body["status"] == "alarm" and body["errors"] == ["/ck/a: boom"]
    assert body["alarms"] == ["/ck/b: 2 > nightly.budget=0"]
    assert nightly.payload(nightly.NightlyResult("c" * 64, 2, [], rows=[error]))["status"] == "error"
    assert nightly.payload(nightly.NightlyResult("c" * 64, 2, [], rows=[]))["status"] == "ok"
