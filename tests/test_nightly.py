"""memex nightly on the shipped demo training run (demo/checkpoints: checkpoint-<step>/unet folders
of the demo model on top of demo/models/demo-text), scaled down to a few prompts and samples.

Three checkpoints appear over three simulated nights; each is audited exactly once, a night that
fails part-way is finished by the next, the budget gate fails the run, the webhook gets the result.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest

from memex.checkpoints import discover, weights_sha256
from memex.images import encode_png
from memex.ledger import Ledger
from memex.stages import nightly

from conftest import REPO, SMALL_AUDIT, compose, free_port, make_lora

STEPS = (1000, 2000, 3000)
DEMO_RUN = REPO / "demo" / "checkpoints" / "demo-text-run"
BASE = REPO / "demo" / "models" / "demo-text"
SMALL = SMALL_AUDIT  # the fixed budget: these tests check the bookkeeping on a known sample count


def _overrides(tmp: Path, location: Path, *extra: str) -> list[str]:
    """resources.executor=local: these tests check the nightly's bookkeeping rather than Ray (no actor
    pool to start: ~15 s less per audit on 2 cores; tests/test_audit.py shows both executors leave
    the same results)."""
    return [f"nightly.location={location}", f"storage.root={tmp / 'runs'}", "resources.executor=local", *SMALL,
            *extra]


def test_a_runs_checkpoints_at_the_depth_limit_are_found_and_deeper_folders_named(tmp_path, caplog):
    """A `memex train` run three levels down (team/project/run/) keeps its checkpoint-<step>/ folders in
    checkpoints/, at the depth limit: they were never looked at, the final pipeline alone was audited, and
    the series had no steps for the growth gate, without a word. Below the limit, folders are named."""
    out = tmp_path / "team" / "project" / "run"
    shutil.copytree(BASE, out)
    shutil.copytree(DEMO_RUN / "checkpoint-1000", out / "checkpoints" / "checkpoint-1000")
    assert [(c.step, c.unet is None) for c in discover(str(tmp_path))] == [(1000, False), (5000, True)]
    deeper = tmp_path / "a" / "b" / "c" / "d" / "e" / "run"
    shutil.copytree(BASE, deeper)
    with caplog.at_level(logging.WARNING, logger="memex"):
        assert len(discover(str(tmp_path))) == 2
    assert "5 levels below nightly.location" in caplog.text and str(tmp_path / "a/b/c/d/e") in caplog.text


def test_discovery_finds_pipelines_and_unet_checkpoints(tmp_path):
    found = discover(str(REPO / "demo" / "checkpoints"), str(BASE))
    assert [c.step for c in found] == list(STEPS)
    assert all(c.unet and c.unet.endswith("/unet") and c.base == str(BASE) for c in found)
    assert len({c.series for c in found}) == 1

    # a memex train output: the pipeline plus checkpoints/checkpoint-<step>/unet, base = the pipeline
    out = tmp_path / "trained"
    shutil.copytree(BASE, out)
    shutil.copytree(DEMO_RUN / "checkpoint-1000", out / "checkpoints" / "checkpoint-1000")
    shutil.copytree(DEMO_RUN / "checkpoint-2000", out / "checkpoints" / "_tmp-checkpoint-2000")  # being written
    found = discover(str(tmp_path))
    assert [(c.step, c.base, c.unet is None) for c in found] == [(1000, str(out), False), (5000, str(out), True)]
    assert {c.series for c in found} == {str(out)}
    # hashes: a copy hashes the same, different UNet weights do not
    assert weights_sha256(found[1]) == weights_sha256(discover(str(BASE))[0])
    assert weights_sha256(found[0]) != weights_sha256(found[1])

    # a UNet-only run with no enclosing pipeline and no base_model names the setting to fix
    lone = tmp_path / "lone"
    shutil.copytree(DEMO_RUN / "checkpoint-1000", lone / "checkpoint-1000")
    with pytest.raises(nightly.MemexError, match="nightly.base_model"):
        discover(str(lone))
    # a base_model that is not a pipeline folder is named before any checkpoint is audited (it was one
    # failed audit per checkpoint, naming model.path); a hub id is left to the load
    for base, match in [(tmp_path / "nowhere", "nightly.base_model=.*nowhere: no such folder"),
                        (lone, "nightly.base_model=.*lone has no model_index.json")]:
        with pytest.raises(nightly.MemexError, match=match):
            discover(str(lone), str(base))
    assert [c.base for c in discover(str(lone), "org/some-model")] == ["org/some-model"]
    # a base whose UNet memex cannot sample (SDXL's added conditioning): named before any checkpoint
    xl = tmp_path / "xl"
    shutil.copytree(BASE, xl)
    config = json.loads((xl / "unet" / "config.json").read_text())
    (xl / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    with pytest.raises(nightly.MemexError, match=r"^nightly.base_model=.*xl \(IFPipeline\): its UNet "
                                                 r"needs added conditioning"):
        discover(str(lone), str(xl))
    # a wrong nightly.location: missing, or a file (it said "no such folder" for both)
    (tmp_path / "a-file").write_text("x")
    for where, match in [(tmp_path / "nowhere", "nowhere: no such folder"),
                         (tmp_path / "a-file", "a-file: a file, not the folder holding the checkpoints")]:
        with pytest.raises(nightly.MemexError, match=f"nightly.location=.*{match}"):
            discover(str(where))
    # nothing found (a new run, or a wrong location): the console says what is looked for
    empty, some = (nightly.format_result(nightly.NightlyResult("0" * 64, n, [])) for n in (0, 3))
    assert "none under nightly.location: it looks for diffusers pipeline folders" in empty and "none" not in some


@pytest.mark.parametrize("override, key", [("nightly.budget=-1", "nightly.budget"),
                                           ("nightly.webhook=ftp://host/x", "nightly.webhook"),
                                           ("nightly.webhook=https://host:abc/x", "nightly.webhook is not a valid URL"),
                                           ("nightly.webhook=https:///x", "nightly.webhook has no host"),
                                           ("nightly.night=yesterday", "nightly.night"),
                                           ("nightly.location=???", "nightly.location"),
                                           # a URL: named as nightly.location (it was "model.path=s3://...")
                                           ("nightly.location=s3://b/ckpts", "^nightly.location=s3://b/ckpts: "
                                            "checkpoints are read from a local or mounted folder"),
                                           # settings the action does not read, once silently ignored
                                           ("nightly.night=2026-11-29", "nightly.night names the night in"),
                                           ("nightly.webhook_timeout_s=30", "no nightly.webhook is")])
def test_wrong_nightly_overrides_name_the_key(override, key):
    from memex.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        compose([override], config_name="nightly")


def test_nightly_with_model_local_needs_no_model_path_of_its_own():
    """memex nightly replaces model.path with each checkpoint's (its pipeline, or nightly.base_model under a
    checkpoint-<step>/unet): model=local's model.path was demanded, then thrown away. The config hash
    is the same with or without one."""
    common = ["nightly=default", "nightly.location=/mnt/x", "trainset=manifest", "trainset.path=/data/t.parquet"]
    bare = compose([*common, "model=local"], config_name="nightly")
    given = compose([*common, "model=local", "model.path=/models/whatever"], config_name="nightly")
    assert bare.model.path == "" and nightly.config_sha256(bare) == nightly.config_sha256(given)
    from memex.config import ConfigError  # the default trainset=demo derives from the model.path left unset

    with pytest.raises(ConfigError, match=r"^trainset=demo reads the model folder's own training_manifest.parquet, "
                                          r"and memex nightly with model=local has no model.path"):
        compose(["nightly=default", "nightly.location=/mnt/x", "model=local"], config_name="nightly")


def test_nightly_ema_is_its_own_config():
    """nightly.ema audits checkpoint-<step>/unet_ema, the raw unet/ otherwise: toggled on, an EMA step was gated
    against the raw UNet's row of the step before (one config hash). Now ema=true is a config of its own; off,
    the hash is the one ledgers of before hold."""
    common = ["nightly=default", "nightly.location=/mnt/x", "trainset=manifest", "trainset.path=/data/t.parquet"]
    off, on = (compose([*common, f"nightly.ema={v}"], config_name="nightly") for v in ("false", "true"))
    assert nightly.config_sha256(off) == nightly.config_sha256(compose(common, config_name="nightly"))
    assert nightly.config_sha256(on) != nightly.config_sha256(off)


def test_gate_budget_and_growth():
    row = {"extracted": 3}
    assert nightly.gate(row, None, None, None) == ("ok", "")
    assert nightly.gate(row, None, 3, None)[0] == "ok"
    assert nightly.gate(row, None, 2, None)[0] == "over_budget"
    prev = {"extracted": 1, "step": 1000}
    assert nightly.gate(row, prev, None, 2)[0] == "ok"
    outcome, msg = nightly.gate(row, prev, None, 1)
    assert outcome == "grew" and "2 more than step 1000" in msg


def test_growth_is_checked_when_the_later_step_finished_first():
    """A night's jobs run side by side (a job per checkpoint), and a failed audit is retried the next night:
    step 3000 finished before 2000, was compared with 1000 (or with nothing), and the growth from 2000 to
    3000 was never checked. Now 2000's gate also compares it with the next step already in the ledger."""
    sha, series = "c" * 64, "/ck/run"

    def row(step, extracted, outcome="ok"):
        return {"series": series, "config_sha256": sha, "step": step, "extracted": extracted, "outcome": outcome,
                "finished": step}

    rows = [row(1000, 1), row(3000, 3), row(4000, 30), row(2500, 0, "error")]
    assert nightly._previous(rows, series, 2000, sha)["step"] == 1000
    assert nightly._next(rows, series, 2000, sha)["step"] == 3000  # an error row is no step's result
    mine = {"extracted": 1, "step": 2000}
    assert nightly.gate(mine, rows[0], None, 1, rows[1]) == (
        "grew", "step 3000, audited before this one, extracted 3 training images, 2 more than this step (1); growth "
                "margin is 1")
    assert nightly.gate(mine, rows[0], None, 2, rows[1]) == ("ok", "")
    assert nightly.gate({"extracted": 5, "step": 2000}, rows[0], 4, 1, rows[1])[0] == "over_budget"  # kept, both said
    assert nightly._next(rows, series, 4000, sha) is None and nightly._next(rows, "/other", 2000, sha) is None


def test_three_nights_audit_each_checkpoint_once(tmp_path, browser, monkeypatch):
    location = tmp_path / "watch" / "demo-text-run"
    location.mkdir(parents=True)
    audited = []
    for night, step in enumerate(STEPS):
        shutil.copytree(DEMO_RUN / f"checkpoint-{step}", location / f"checkpoint-{step}")  # training wrote it today
        cfg = compose(_overrides(tmp_path, tmp_path / "watch"), config_name="nightly")
        res = nightly.run(cfg)
        assert [r["step"] for r in res.rows] == [step], f"night {night}: {res.rows}"
        assert res.rows[0]["outcome"] == "ok" and Path(res.rows[0]["report"]).is_file()
        audited.append(res.rows[0])
        again = nightly.run(cfg)  # the same night again (cron retry): nothing audited twice
        assert again.rows == [] and again.checkpoints == night + 1

    ledger = Ledger(str(tmp_path / "runs" / "_nightly")).read().to_pylist()
    assert sorted(r["step"] for r in ledger) == list(STEPS)
    assert len({r["weights_sha256"] for r in ledger}) == 3 and len({r["config_sha256"] for r in ledger}) == 1
    assert all(r["samples"] == 4 * 8 and r["started"] <= r["finished"] for r in ledger)

    # the trend page plots all three and links each run's report; it renders cleanly
    trend = tmp_path / "runs" / "_nightly" / "report" / "index.html"
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(trend.as_uri())
    assert errors == []
    assert page.locator("svg polyline").count() == 2  # extracted and flagged
    assert page.locator("svg circle").count() == 2 * len(STEPS)
    hrefs = page.eval_on_selector_all("a", "els => els.map(e => e.href)")
    assert len(hrefs) == 3 and all(Path(h.removeprefix("file://")).is_file() for h in hrefs)
    # the viewport, not full_page: Chromium's full-page capture (a resize of the page's metrics)
    # fails now and then under load with "Unable to capture screenshot" (seen once in ~30 runs)
    shot = tmp_path / "trend.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000  # a drawn page, not a blank one
    page.close()

    # another config is another audit of the same checkpoints; unchanged files are not read again
    def no_reads(*a, **k):
        raise AssertionError("weights re-hashed although the ledger knows their files")

    monkeypatch.setattr(nightly, "weights_sha256", no_reads)
    other = compose(_overrides(tmp_path, tmp_path / "watch", "sampling.seed=1"), config_name="nightly")
    assert [p.weights for p in nightly.plan(other).pending] == [r["weights_sha256"] for r in audited]


@pytest.mark.slow
def test_failed_audit_is_recorded_and_retried_next_night(tmp_path):
    location = tmp_path / "watch"
    shutil.copytree(DEMO_RUN / "checkpoint-1000", location / "run" / "checkpoint-1000")
    bad = location / "run" / "checkpoint-2000"
    shutil.copytree(DEMO_RUN / "checkpoint-2000", bad)
    weights = next((bad / "unet").glob("*.safetensors"))
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # a truncated upload
    cfg = compose(_overrides(tmp_path, location, f"nightly.base_model={BASE}"), config_name="nightly")
    res = nightly.run(cfg)
    assert {r["step"]: r["outcome"] for r in res.rows} == {1000: "ok", 2000: "error"}
    assert "model.unet" in res.errors[0]["message"] and res.status == "error"

    weights.write_bytes(good)  # re-uploaded
    res = nightly.run(cfg)
    assert [(r["step"], r["outcome"]) for r in res.rows] == [(2000, "ok")]
    assert nightly.run(cfg).rows == []


def test_an_input_every_checkpoint_shares_fails_once_before_any_audit(tmp_path):
    """A training set, prompts file or storage.root every audit of the config would fail on was
    one error row per checkpoint, every night, each audit failing on its own. It is checked once,
    before the first checkpoint: the command fails naming the key, and the ledger stays empty."""
    location = tmp_path / "watch"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "imgs" / "0.txt").write_text("a logo")
    for step in ("checkpoint-1000", "checkpoint-2000"):
        shutil.copytree(DEMO_RUN / step, location / "run" / step)
    for extra, message in [(["trainset.path=" + str(tmp_path / "nowhere.parquet")], r"trainset\.path=.*nowhere"),
                           (["prompts=file", f"prompts.path={tmp_path / 'none.txt'}"], r"prompts\.path=.*none\.txt"),
                           ([f"trainset.path={tmp_path / 'imgs'}", f"storage.root={tmp_path / 'imgs' / 'runs'}"],
                            r"storage\.root=.* is inside trainset\.path")]:
        cfg = compose(_overrides(tmp_path, location, f"nightly.base_model={BASE}", *extra), config_name="nightly")
        with pytest.raises(nightly.MemexError, match=message):
            nightly.run(cfg)
        assert Ledger(nightly.ledger_root(cfg), {}).read().num_rows == 0


def test_lora_checkpoints_are_found_and_audited_on_the_base(tmp_path):
    """A LoRA training run (diffusers' *_lora.py scripts) writes checkpoint-<step>/
    pytorch_lora_weights.safetensors: each is a checkpoint, audited as model.lora on
    nightly.base_model, and hashed with its LoRA file. model.unet or model.lora in the nightly config
    (each checkpoint brings its own) is refused rather than replaced without a word."""
    location = tmp_path / "watch"
    for step, seed in ((100, 1), (200, 2)):
        make_lora(str(BASE), location / "lora-run" / f"checkpoint-{step}", seed=seed)
    found = discover(str(location), str(BASE))
    assert [(c.step, c.unet, Path(c.lora).name, c.base) for c in found] == [
        (s, None, "pytorch_lora_weights.safetensors", str(BASE)) for s in (100, 200)]
    assert weights_sha256(found[0]) != weights_sha256(found[1]) != weights_sha256(discover(str(BASE))[0])
    with pytest.raises(nightly.MemexError, match="holds only a LoRA and no pipeline folder encloses it"):
        discover(str(location))
    cfg = compose(_overrides(tmp_path, location, f"nightly.base_model={BASE}"), config_name="nightly")
    res = nightly.run(cfg)
    assert [(r["step"], r["outcome"]) for r in res.rows] == [(100, "ok"), (200, "ok")]
    runs = [json.loads((Path(r["run"]) / "run.json").read_text()) for r in res.rows]
    assert [r["model"]["lora"] for r in runs] == [c.lora for c in found]
    # no weights.json: the run folder's name holds the weights' hash, and the plan read them (or its ledger
    # knew them); the audit read them again for its own record (350 GB a night at 100 SD checkpoints)
    assert not any((Path(r["run"]) / "weights.json").exists() for r in res.rows)
    for key in ("unet", "lora"):
        with pytest.raises(nightly.MemexError, match=rf"^model.{key}: memex nightly takes each checkpoint's own"):
            nightly.run(compose(_overrides(tmp_path, location, f"nightly.base_model={BASE}", f"model.{key}=/x"),
                                config_name="nightly"))


def test_a_pickled_lora_series_beside_others_is_named_not_left_out_silently(tmp_path, caplog):
    """A LoRA run saved with safe_serialization=False (pytorch_lora_weights.bin in each checkpoint-<step>/ and
    beside them) matched nothing: alone, check_loose_weights names it, but beside another series it was left
    out every night without a word. Now a console line names it with the conversion."""
    location = tmp_path / "watch"
    make_lora(str(BASE), location / "lora-run" / "checkpoint-100", seed=1)
    for d in (location / "old-run" / "checkpoint-100", location / "old-run"):
        d.mkdir(parents=True, exist_ok=True)
        (d / "pytorch_lora_weights.bin").write_bytes(b"pickle")
    with caplog.at_level(logging.WARNING, logger="memex"):
        found = discover(str(location), str(BASE))
    assert [Path(c.location).parent.name for c in found] == ["lora-run"]
    assert "2 LoRA(s) saved as pickle left out" in caplog.text and "old-run" in caplog.text
    assert "safetensors.torch.save_file" in caplog.text


def test_the_final_lora_beside_its_checkpoints_is_a_checkpoint_too(tmp_path):
    """diffusers' LoRA scripts save the trained LoRA at <output_dir>/pytorch_lora_weights.safetensors,
    beside their checkpoint-<step>/ folders: it was never found, so the model a team ships went
    unaudited. It is a checkpoint of the same series, after its checkpoints (no step of its own): audited
    last and gated against the last one (it came first and was gated against nothing, so a jump from the
    last checkpoint to the model that ships passed as ok)."""
    out = tmp_path / "watch" / "lora-run"
    make_lora(str(BASE), out / "checkpoint-100", seed=1)
    make_lora(str(BASE), out, seed=3)  # the final one, written by save_lora_weights(output_dir)
    found = discover(str(tmp_path / "watch"), str(BASE))
    assert [(Path(c.location).name, c.series, c.step, c.lora) for c in found] == [
        ("checkpoint-100", str(out), 100, str(out / "checkpoint-100" / "pytorch_lora_weights.safetensors")),
        ("lora-run", str(out), None, str(out / "pytorch_lora_weights.safetensors"))]
    assert weights_sha256(found[0]) != weights_sha256(found[1])
    sha, series = "c" * 64, str(out)
    rows = [{"series": series, "config_sha256": sha, "step": st, "extracted": n, "outcome": o, "finished": st}
            for st, n, o in ((100, 1, "ok"), (50, 0, "ok"), (150, 9, "error"))]
    last = nightly._previous(rows, series, None, sha)
    assert last["step"] == 100 and nightly._next(rows, series, None, sha) is None
    assert nightly.gate({"extracted": 20, "step": None}, last, None, 2) == (
        "grew", "extracted 20 training images, 19 more than step 100 (1); growth margin is 2")
    with pytest.raises(nightly.MemexError, match=r"lora-run/pytorch_lora_weights\.safetensors is a LoRA and no "
                                                 r"pipeline folder encloses it: set nightly\.base_model"):
        discover(str(tmp_path / "watch"))
    # an output folder whose name ends in digits: no step either (lora_out_2 made the final model step 2)
    (tmp_path / "watch" / "lora-run").rename(tmp_path / "watch" / "lora_out_2")
    assert [c.step for c in discover(str(tmp_path / "watch"), str(BASE))] == [100, None]

    # the tracker logs the final model at its series' last checkpoint step, the least it trained (it was
    # logged at step 0: before training began, on the checkpoints' own curve); in every nightly.only job too
    make_lora(str(BASE), tmp_path / "watch" / "lora_out_2" / "checkpoint-300", seed=4)
    for only in (None, str(tmp_path / "watch" / "lora_out_2")):
        cfg = compose(_overrides(tmp_path, tmp_path / "watch", f"nightly.base_model={BASE}",
                                 *([f"nightly.only={only}"] if only else [])), config_name="nightly")
        steps = {Path(p.ckpt.location).name: (p.ckpt.step, p.tracker_step) for p in nightly.plan(cfg).pending}
        assert steps["lora_out_2"] == (None, 300) and (only or steps["checkpoint-100"] == (100, 100))


def test_a_pipeline_saved_as_a_checkpoint_folder_is_audited_whole(tmp_path):
    """pipe.save_pretrained(f"{out}/checkpoint-{step}") writes a whole pipeline there: it was taken
    for a bare UNet (refused without nightly.base_model: no checkpoint of the location was found; with
    one, audited on the base's VAE and text encoder instead of its own)."""
    out = tmp_path / "watch" / "run"
    shutil.copytree(BASE, out / "checkpoint-100")
    found = discover(str(tmp_path / "watch"))
    assert [(c.location, c.series, c.step, c.base, c.unet) for c in found] == [
        (str(out / "checkpoint-100"), str(out), 100, str(out / "checkpoint-100"), None)]


def test_a_dreambooth_checkpoint_brings_its_text_encoder(tmp_path):
    """diffusers' DreamBooth with --train_text_encoder saves checkpoint-<step>/text_encoder beside
    unet/: it was ignored, so the checkpoint was audited with the base's text encoder (another model).
    Discovery gives it as model.text_encoder, the weights hash reads it (not the base's), and a
    model.text_encoder in the nightly config is refused like model.unet."""
    import torch
    from transformers import CLIPTextModel

    run = tmp_path / "watch" / "db-run"
    shutil.copytree(DEMO_RUN / "checkpoint-1000", run / "checkpoint-1000")
    shutil.copytree(DEMO_RUN / "checkpoint-1000", run / "checkpoint-2000")
    te = CLIPTextModel.from_pretrained(str(BASE / "text_encoder"))
    with torch.no_grad():
        next(te.parameters()).add_(0.1)
    te.save_pretrained(run / "checkpoint-2000" / "text_encoder")
    found = discover(str(tmp_path / "watch"), str(BASE))
    assert [(c.step, c.unet is not None, c.text_encoder) for c in found] == [
        (1000, True, None), (2000, True, str(run / "checkpoint-2000" / "text_encoder"))]
    assert weights_sha256(found[1]) != weights_sha256(replace(found[1], text_encoder=None))
    from memex.checkpoints import _load_files

    names = [n for n, _ in _load_files(found[1])]
    assert "text_encoder/model.safetensors" in names and not any(n.startswith("base/text_encoder/") for n in names)
    with pytest.raises(nightly.MemexError, match=r"^model.text_encoder: memex nightly takes each checkpoint's own"):
        nightly.run(compose(_overrides(tmp_path, tmp_path / "watch", f"nightly.base_model={BASE}",
                                       "model.text_encoder=/x"), config_name="nightly"))


def test_nightly_ema_audits_the_ema_unet_beside_each_checkpoint(tmp_path, caplog):
    """diffusers' train_text_to_image --use_ema saves checkpoint-<step>/unet_ema (EMAModel.save_pretrained:
    a UNet folder whose config.json carries the EMA's decay and step too) beside unet/, and its final
    pipeline holds the EMA weights. nightly.ema=true audits unet_ema/; a checkpoint without one is
    named; the default keeps auditing unet/."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from memex.models import check_model_inputs, load_model

    run = tmp_path / "watch" / "ema-run"
    for step in (1000, 2000):
        shutil.copytree(DEMO_RUN / f"checkpoint-{step}", run / f"checkpoint-{step}")
        unet = UNet2DConditionModel.from_pretrained(str(run / f"checkpoint-{step}" / "unet"))
        ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
        with torch.no_grad():
            ema.shadow_params[0].add_(0.5)
        ema.save_pretrained(str(run / f"checkpoint-{step}" / "unet_ema"))
    assert "decay" in json.loads((run / "checkpoint-1000" / "unet_ema" / "config.json").read_text())

    with caplog.at_level("INFO", logger="memex.checkpoints"):
        raw = discover(str(tmp_path / "watch"), str(BASE))
    assert "2 checkpoint(s) also hold unet_ema/" in caplog.text and "nightly.ema=true audits" in caplog.text
    averaged = discover(str(tmp_path / "watch"), str(BASE), ema=True)
    assert [c.unet for c in raw] == [str(run / f"checkpoint-{s}" / "unet") for s in (1000, 2000)]
    assert [c.unet for c in averaged] == [str(run / f"checkpoint-{s}" / "unet_ema") for s in (1000, 2000)]
    assert weights_sha256(averaged[0]) != weights_sha256(raw[0])
    # the audit loads it as model.unet: the header check and the load take the EMA's config keys
    check_model_inputs(str(BASE), averaged[0].unet)
    pipe = load_model(str(BASE), unet=averaged[0].unet).pipe
    first = next(pipe.unet.parameters())
    assert torch.equal(first, next(UNet2DConditionModel.from_pretrained(raw[0].unet).parameters()) + 0.5)
    # the setting reaches discovery from the config
    cfg = compose(_overrides(tmp_path, tmp_path / "watch", f"nightly.base_model={BASE}", "nightly.ema=true"),
                  config_name="nightly")
    assert [p.ckpt.unet for p in nightly.plan(cfg).pending] == [c.unet for c in averaged]

    # a checkpoint of a run trained without --use_ema is named, with the fix
    shutil.copytree(DEMO_RUN / "checkpoint-3000", tmp_path / "watch" / "raw-run" / "checkpoint-3000")
    with pytest.raises(nightly.MemexError, match=r"nightly.ema=true audits checkpoint-<step>/unet_ema .* 1 checkpoint"
                                                 r"\(s\) .* have unet/ only \(e.g. .*raw-run/checkpoint-3000\)"
                                                 r".* Set nightly.ema=false"):
        discover(str(tmp_path / "watch"), str(BASE), ema=True)


def test_pipelines_side_by_side_are_a_series_per_run_name(tmp_path):
    """Exported pipelines side by side (step-1000/, step-2000/) are one series, their parent. Two runs in
    one folder (dreambooth-dog-800/, dreambooth-cat-400/) were one series too: the dog gated against the
    cat's step, both named loc-stepN, one tracker run. Each is now a series of its own; a pipeline with no
    number beside them (final/) stays in the parent's."""
    loc = tmp_path / "loc"
    for name in ("step-1000", "step-2000", "dreambooth-dog-800", "dreambooth-cat-400", "final"):
        shutil.copytree(BASE, loc / name, ignore=shutil.ignore_patterns("memex_train.json"))  # steps from names
    got = {(Path(c.location).name, c.series, c.step) for c in discover(str(loc))}
    assert got == {("step-1000", str(loc), 1000), ("step-2000", str(loc), 2000), ("final", str(loc), None),
                   ("dreambooth-dog-800", str(loc / "dreambooth-dog"), 800),
                   ("dreambooth-cat-400", str(loc / "dreambooth-cat"), 400)}
    # one run's exports alone: one series, the parent, as before
    for name in ("dreambooth-dog-800", "dreambooth-cat-400", "final"):
        shutil.rmtree(loc / name)
    assert {c.series for c in discover(str(loc))} == {str(loc)}


def test_kohya_lora_files_are_checkpoints_a_series_per_name(tmp_path):
    """kohya's sd-scripts (train_network.py) save a LoRA as <name>-<epoch or step>.safetensors, and the
    last as <name>.safetensors, in one folder: each is a checkpoint, audited as model.lora on the base
    (diffusers reads kohya's keys: the fused UNet equals the same LoRA's in diffusers' format), a
    series per name. They were not found at all."""
    import torch
    from safetensors.torch import load_file, save_file

    from memex.models import load_model

    src = make_lora(str(BASE), tmp_path / "diffusers-lora", seed=1) / "pytorch_lora_weights.safetensors"
    kohya = {}
    for k, v in load_file(src).items():  # unet.<module>.lora.down.weight -> lora_unet_<module_>.lora_down.weight
        module, factor = k[len("unet."):].rsplit(".lora.", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{factor}"] = v
        if factor.startswith("down"):
            kohya[f"{name}.alpha"] = torch.tensor(float(v.shape[0]))  # alpha = rank: scale 1, as diffusers'
    out = tmp_path / "watch" / "kohya-out"
    out.mkdir(parents=True)
    for name in ("style-000001", "style-000002", "style", "face-step00000500", "mylora-500", "mylora-1000"):
        save_file(kohya, out / f"{name}.safetensors")
    # two sd-scripts runs whose names end in a number: their metadata names each run (ss_output_name), so two
    # series; by the name alone they were one, sd15_lora, each gated against the other's steps
    for name, steps in (("sd15_lora_512", "800"), ("sd15_lora_768", "900")):
        save_file(kohya, out / f"{name}.safetensors", metadata={"ss_output_name": name, "ss_steps": steps})
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)}, out / "sd-base.safetensors")
    found = discover(str(tmp_path / "watch"), str(BASE))
    assert [(Path(c.location).name, Path(c.series).name, c.step, c.lora == c.location) for c in found] == [
        ("face-step00000500.safetensors", "face", 500, True),
        ("mylora-500.safetensors", "mylora", 500, True), ("mylora-1000.safetensors", "mylora", 1000, True),
        ("sd15_lora_512.safetensors", "sd15_lora_512", 800, True),
        ("sd15_lora_768.safetensors", "sd15_lora_768", 900, True),
        ("style-000001.safetensors", "style", 1, True), ("style-000002.safetensors", "style", 2, True),
        ("style.safetensors", "style", None, True)]  # the final one, after its series' steps
    fused = load_model(str(BASE), lora=found[7].lora).pipe.unet.state_dict()
    reference = load_model(str(BASE), lora=str(src.parent)).pipe.unet.state_dict()
    assert max((fused[k] - reference[k]).abs().max().item() for k in fused) < 1e-6


def test_a_location_of_weights_nightly_does_not_read_is_named(tmp_path, caplog):
    """Single-file checkpoints (A1111/kohya's layout) under nightly.location: nothing was found,
    quietly, every night (0 checkpoints, exit 0). Named now with the conversion they need;
    checkpoints still being written (settle_s) keep the quiet 0."""
    import torch
    from safetensors.torch import save_file

    from memex.checkpoints import CheckpointError

    location = tmp_path / "kohya-out"
    location.mkdir()
    for name in ("sd-000010.safetensors", "sd.safetensors"):
        save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)}, location / name)
    (location / ".cache").mkdir()
    save_file({"x": torch.zeros(1)}, location / ".cache" / "ignored.safetensors")
    with pytest.raises(CheckpointError, match=r"kohya-out: no checkpoint memex reads .*, but 2 single-file "
                                              r"checkpoints .*from_single_file.*\(e\.g\. sd-000010") as e:
        discover(str(location))
    assert "neither" not in str(e.value) and "ignored" not in str(e.value)  # hidden folders are not looked in
    # LyCORIS adapters that are no LoRA (LoHa): named alone, left out beside LoRAs (each was a checkpoint
    # whose audit failed every night: diffusers cannot load them)
    loha = {f"lora_unet_mid_block_attentions_0_proj_in.hada_w{i}_{ab}": torch.zeros(4, 2) for i in (1, 2)
            for ab in "ab"}
    (tmp_path / "lycoris").mkdir()
    save_file(loha, tmp_path / "lycoris" / "style-000004.safetensors")
    with pytest.raises(CheckpointError, match=r"but 1 LyCORIS adapters that are no LoRA \(LoHa, LoKr, \.\.\.\), "
                                              r"which diffusers cannot load: merge each .*style-000004"):
        discover(str(tmp_path / "lycoris"), str(BASE))
    make_lora(str(BASE), tmp_path / "lycoris" / "run")  # a diffusers LoRA beside it: the one checkpoint
    with caplog.at_level("INFO", logger="memex.checkpoints"):
        assert [Path(c.location).name for c in discover(str(tmp_path / "lycoris"), str(BASE))] == ["run"]
    assert "1 LyCORIS adapter(s) that are no LoRA left out (e.g. " in caplog.text
    (tmp_path / "empty").mkdir()
    assert discover(str(tmp_path / "empty")) == []  # a run not started yet: 0 found, no error
    shutil.copytree(DEMO_RUN / "checkpoint-1000", location / "checkpoint-1000", copy_function=shutil.copy)  # now
    assert discover(str(location), str(BASE), settle_s=3600) == []


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_budget_gate_fails_the_job_and_the_webhook_hears_it(tmp_path, ray_head):
    """The README's schedule: `memex nightly nightly.action=plan` gives one submission id per
    pending checkpoint, `ray job submit --submission-id <id> -- python jobs/nightly.py
    nightly.only=<checkpoint>` audits it. The fully trained demo model crosses a budget of 0."""
    location = tmp_path / "exports"
    shutil.copytree(BASE, location / "demo-text")  # a diffusers folder (step 5000 from memex_train.json)
    server = HTTPServer(("127.0.0.1", free_port()), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hook"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    bin_ = Path(sys.executable).parent
    # the job's audit runs in the job's driver (resources.executor=local): this is about the schedule
    # and the gate; tests/test_audit.py submits an audit job that runs on Ray's actor pools
    common = [*_overrides(tmp_path, location), "nightly.budget=0"]
    try:
        plan = subprocess.run([str(bin_ / "memex"), "nightly", *common, "nightly.action=plan"], capture_output=True,
                              text=True, timeout=300, env=env)
        assert plan.returncode == 0, plan.stderr[-3000:]
        (line,) = plan.stdout.strip().splitlines()
        sid, ckpt = line.split(" ", 1)
        assert ckpt == f"'{location / 'demo-text'}'"  # quoted for Hydra (cli.hydra_quoted)
        submit = [str(bin_ / "ray"), "job", "submit", "--address", ray_head.dashboard, "--working-dir", str(REPO),
                  "--submission-id", sid, "--", "python", "jobs/nightly.py", *common, f"nightly.only={ckpt}",
                  f"nightly.webhook={url}"]
        out = subprocess.run(submit, capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode != 0 and "failed" in (out.stdout + out.stderr).lower(), (out.stdout + out.stderr)[-3000:]
        assert "ALARM" in out.stdout + out.stderr and "budget is 0" in out.stdout + out.stderr
        (ctype, body), = _Hook.received
        assert ctype == "application/json" and body["status"] == "alarm"
        (row,) = body["audited"]
        assert row["outcome"] == "over_budget" and row["step"] == 5000 and row["extracted"] >= 1
        assert Path(body["trend"]).is_file() and body["alarms"][0].startswith(str(location / "demo-text"))
        ledger = Ledger(str(tmp_path / "runs" / "_nightly")).read().to_pylist()
        assert [r["outcome"] for r in ledger] == ["over_budget"]

        # cron fires again: Ray refuses the same submission id, so the audit is not submitted twice
        again = subprocess.run(submit, capture_output=True, text=True, timeout=300, env=env)
        assert again.returncode != 0 and "already exists" in again.stdout + again.stderr
        # and the plan no longer lists the checkpoint
        plan = subprocess.run([str(bin_ / "memex"), "nightly", *common, "nightly.action=plan"], capture_output=True,
                              text=True, timeout=300, env=env)
        assert plan.returncode == 0 and plan.stdout.strip() == ""

        # a night with nothing new exits 0 without a second audit; a dead webhook is an error, not silence
        out = subprocess.run([str(bin_ / "memex"), "nightly", *common, "nightly.webhook=http://127.0.0.1:9/none"],
                             capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 1 and "nightly.webhook" in out.stderr and "0 audited now" in out.stdout
        assert len(Ledger(str(tmp_path / "runs" / "_nightly")).read()) == 1
    finally:
        server.shutdown()


def test_plan_gives_stable_submission_ids(tmp_path):
    cfg = compose(_overrides(tmp_path, REPO / "demo" / "checkpoints", "nightly.action=plan",
                             "nightly.night=2026-11-29"), config_name="nightly")
    a, b = nightly.run(cfg), nightly.run(cfg)
    ids = [p.submission_id(a.config_sha256, nightly.night_of(cfg)) for p in a.pending]
    assert ids == [p.submission_id(b.config_sha256, "2026-11-29") for p in b.pending] and len(set(ids)) == 3
    assert a.rows == [] and all(i.startswith("memex-demo-text-run-step") and i.endswith("-20261129") for i in ids)
    one = str(DEMO_RUN / "checkpoint-2000")
    only = nightly.plan(compose(_overrides(tmp_path, REPO / "demo" / "checkpoints", f"nightly.only={one}"),
                                config_name="nightly"))
    assert [p.ckpt.location for p in only.pending] == [one]
    with pytest.raises(nightly.MemexError, match="nightly.only"):
        nightly.run(compose(_overrides(tmp_path, REPO / "demo" / "checkpoints", "nightly.only=/elsewhere"),
                            config_name="nightly"))


def test_a_checkpoint_deleted_held_or_audited_elsewhere_is_skipped_not_an_error(tmp_path, monkeypatch):
    """Nights overlap and trainers rotate checkpoints. Between this job's plan and each audit, a
    checkpoint may be deleted (checkpoints_total_limit), audited by another job (an overlapping
    night's: a ledger row appears), or held by one now (its run folder's lease). Each is skipped with
    its reason: no error row, exit status ok; they were error rows retried every night, or audited
    twice. A checkpoint deleted while audited is skipped the same way; one whose files vanish between
    discovery and hashing is left out of the plan (its weights hash was the base's alone)."""
    from memex.layout import LEDGER_SCHEMA, RunLayout
    from memex.lease import Lease
    from memex.stages import audit

    location = tmp_path / "watch" / "demo-text-run"
    for step in STEPS:
        shutil.copytree(DEMO_RUN / f"checkpoint-{step}", location / f"checkpoint-{step}")
    cfg = compose(_overrides(tmp_path, tmp_path / "watch"), config_name="nightly")
    real_plan, ledger = nightly.plan, Ledger(str(tmp_path / "runs" / "_nightly"))

    def plan_then_the_world_moves(c):
        res = real_plan(c)
        by_step = {p.ckpt.step: p for p in res.pending}
        shutil.rmtree(location / "checkpoint-1000")  # rotated away
        other = {k: None for k in LEDGER_SCHEMA.names} | {  # another night's job finished it
            "location": by_step[3000].ckpt.location, "series": by_step[3000].ckpt.series, "step": 3000, "base": "",
            "weights_sha256": by_step[3000].weights, "files_signature": "", "config_sha256": res.config_sha256,
            "run": "elsewhere", "report": "elsewhere", "samples": 1, "extracted": 0, "extracted_generations": 0,
            "flagged_prompts": 0, "outcome": "ok", "message": ""}
        ledger.append(other)
        return res

    monkeypatch.setattr(nightly, "plan", plan_then_the_world_moves)
    before = real_plan(cfg)
    name = before.pending[1].run_name(before.config_sha256)
    with Lease(RunLayout(str(tmp_path / "runs"), name).store, "run folder"):  # another job audits step 2000
        res = nightly.run(cfg)
    assert res.rows == [] and res.status == "ok"
    assert [(Path(s["location"]).name, s["reason"]) for s in res.skipped] == [
        ("checkpoint-1000", "deleted before its audit began"),
        ("checkpoint-2000", "another job audits it now (its run folder's lease)"),
        ("checkpoint-3000", "audited by another job since")]
    assert "skipped     " in nightly.format_result(res) and len(nightly.payload(res)["skipped"]) == 3
    assert [r["outcome"] for r in ledger.read().to_pylist()] == ["ok"]  # the other job's row alone

    # the next night: step 2000 rotated away while its audit ran
    monkeypatch.setattr(nightly, "plan", real_plan)

    def deleted_midway(acfg, **_):
        shutil.rmtree(location / "checkpoint-2000")
        raise FileNotFoundError(f"{location / 'checkpoint-2000' / 'unet'}: no such file")

    monkeypatch.setattr(audit, "run", deleted_midway)
    res = nightly.run(cfg)
    assert res.rows == [] and res.skipped == [{"location": str(location / "checkpoint-2000"),
                                               "reason": "deleted while it was audited"}]

    # files gone between discovery and hashing: left out of the plan, not hashed as the base alone
    shutil.copytree(DEMO_RUN / "checkpoint-2000", location / "checkpoint-2000")
    found = nightly.discover(str(tmp_path / "watch"), str(BASE))
    monkeypatch.setattr(nightly, "discover", lambda *a, **k: found)
    shutil.rmtree(location / "checkpoint-2000" / "unet")
    assert nightly.plan(cfg).pending == []


def test_a_row_another_job_appends_after_the_check_is_seen_under_the_lease(tmp_path, monkeypatch):
    """The ledger was read before each audit, outside the run folder's lease: a job that found no row
    while another job's audit was finishing (lease released, row not yet appended) took the lease,
    resumed the finished folder and appended a second row (its alarm announced twice). The check is
    made again under the lease, which is held until the row is appended."""
    from memex.layout import LEDGER_SCHEMA
    from memex.stages import audit

    location = tmp_path / "watch" / "demo-text-run"
    shutil.copytree(DEMO_RUN / "checkpoint-1000", location / "checkpoint-1000")
    cfg = compose(_overrides(tmp_path, tmp_path / "watch"), config_name="nightly")
    ncfg = cfg  # compose gives the typed config the stage takes
    res = nightly.plan(ncfg)
    (p,) = res.pending
    ledger = Ledger(nightly.ledger_root(ncfg), ncfg.storage.options)
    ledger.append({k: None for k in LEDGER_SCHEMA.names} | {  # the other job's row, just after our check
        "location": p.ckpt.location, "series": p.ckpt.series, "step": 1000, "base": "", "weights_sha256": p.weights,
        "files_signature": "", "config_sha256": res.config_sha256, "run": "elsewhere", "report": "elsewhere",
        "samples": 1, "extracted": 3, "extracted_generations": 3, "flagged_prompts": 0, "outcome": "over_budget",
        "message": "3 > nightly.budget=0"})
    monkeypatch.setattr(audit, "run", lambda acfg, **_: pytest.fail("audited a second time"))
    # the check itself is made under the run folder's lease: its _lease.json exists when the ledger is read
    lease = Path(ncfg.storage.root) / p.run_name(res.config_sha256) / "_lease.json"
    under_lease, real = [], ledger.audited
    monkeypatch.setattr(ledger, "audited", lambda sha, rows=None: under_lease.append(lease.exists()) or real(sha, rows))
    assert nightly.audit_one(ncfg, p, res.config_sha256, ledger) == "audited by another job since"
    assert under_lease == [True] and not lease.exists()  # checked under the lease, and the lease released
    assert len(ledger.read()) == 1


def test_kohya_steps_come_from_metadata_and_state_folders_are_skipped(tmp_path, monkeypatch, caplog):
    """sd-scripts names epoch saves <name>-000003 and step saves <name>-step00001000, one series,
    and writes the global step into each file's metadata (ss_steps): that is the step, so the
    series is ordered by training step and the tracker gets steps, not epochs. Its --save_state
    folders (<name>-000003-state/: the network as model.safetensors beside optimizer.bin and RNG
    states) are not checkpoints (each epoch was audited twice). A folder this user cannot read
    (lost+found at a volume's root) and a pipeline folder whose model_index.json is not JSON (a copy
    still running) are skipped with a warning; the rest is found (the night stopped with a traceback)."""
    import pathlib

    import torch
    from safetensors.torch import save_file

    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}
    out = tmp_path / "watch" / "kohya-out"
    (out / "mychar-000003-state").mkdir(parents=True)
    save_file(lora, out / "mychar-000003.safetensors", metadata={"ss_steps": "1500", "ss_epoch": "3"})
    save_file(lora, out / "mychar-step00001000.safetensors", metadata={"ss_steps": "1000", "ss_epoch": "2"})
    save_file(lora, out / "mychar-000001.safetensors")  # --no_metadata: the name's number is all there is
    save_file(lora, out / "mychar-000003-state" / "model.safetensors")
    (out / "mychar-000003-state" / "optimizer.bin").write_bytes(b"state")
    (out / "mychar-000003-state" / "random_states_0.pkl").write_bytes(b"state")
    found = discover(str(tmp_path / "watch"), str(BASE))
    assert [(Path(c.location).name, c.step) for c in found] == [
        ("mychar-000001.safetensors", 1), ("mychar-step00001000.safetensors", 1000),
        ("mychar-000003.safetensors", 1500)]

    (tmp_path / "watch" / "lost+found").mkdir()
    (tmp_path / "watch" / "half-copied").mkdir()
    (tmp_path / "watch" / "half-copied" / "model_index.json").write_text('{"_class_name": "StableDiff')
    real_is_file, real_iterdir = pathlib.Path.is_file, pathlib.Path.iterdir

    def unreadable(p):
        if "lost+found" in p.parts:  # what a mode-700 folder owned by root gives another user (Python 3.11)
            raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(pathlib.Path, "is_file", lambda p: unreadable(p) or real_is_file(p))
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda p: unreadable(p) or real_iterdir(p))
    with caplog.at_level("WARNING", logger="memex.checkpoints"):
        again = discover(str(tmp_path / "watch"), str(BASE))
    assert again == found
    assert "lost+found" in caplog.text and "Permission denied" in caplog.text
    assert "half-copied as a pipeline folder: its model_index.json is not a JSON object" in caplog.text


def test_a_location_this_user_cannot_read_is_refused(tmp_path, monkeypatch):
    """nightly.location itself unreadable (a mount owned by another user): its PermissionError was skipped
    with a warning like an unreadable subfolder's, so every night found 0 checkpoints and exited 0."""
    import pathlib

    from memex.checkpoints import CheckpointError

    (tmp_path / "watch").mkdir()
    real_iterdir = pathlib.Path.iterdir

    def iterdir(p):
        if p.name == "watch":  # what a mode-700 folder owned by root gives another user (Python 3.11)
            raise PermissionError(13, "Permission denied", str(p))
        return real_iterdir(p)

    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    with pytest.raises(CheckpointError, match=r"nightly.location=.*/watch: not readable by this user "
                                              r"\(\[Errno 13\] Permission denied.*run the nightly as a user"):
        discover(str(tmp_path / "watch"), str(BASE))


def test_an_alarm_wins_the_exit_code_over_failed_audits_and_webhook(tmp_path, monkeypatch, capsys):
    """A night with a failed audit (or a failed webhook) and a checkpoint over the budget exited 1
    without the ALARM line. The alarm's row is final, so the next night exited 0: a CI that pages on 3
    and retries on 1 never paged. Now it exits 3, printing the ALARM line and the errors."""
    from memex import cli
    from memex.stages.nightly import NightlyError, NightlyResult

    def row(loc, outcome, message):
        return {"location": loc, "step": 1, "extracted": 2, "flagged_prompts": 0, "outcome": outcome,
                "message": message, "weights_sha256": loc[-1] * 64, "config_sha256": "c" * 64}

    res = NightlyResult("c" * 64, 2, [], rows=[row("/ck/a", "error", "boom"),
                                               row("/ck/b", "over_budget", "2 > nightly.budget=0")])

    def announce(cfg, result):
        raise NightlyError("nightly.webhook=https://hooks.example/***: POST failed")

    monkeypatch.setattr(nightly, "run", lambda cfg: res)
    monkeypatch.setattr(nightly, "announce", announce)
    monkeypatch.setattr(sys, "argv", ["memex", "nightly", f"storage.root={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 3, err
    assert "memex nightly: ALARM: /ck/b: 2 > nightly.budget=0" in err
    assert "1 audits failed: /ck/a: boom" in err and "POST failed" in err
    res.rows = res.rows[:1]  # errors alone: 1, as before
    monkeypatch.setattr(sys, "argv", ["memex", "nightly", f"storage.root={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and "ALARM" not in err, err


def test_a_webhook_that_answers_something_other_than_http_is_a_nightly_error():
    """A server on the webhook's port that does not speak HTTP (a TLS port given as http://, a stray
    service): http.client's BadStatusLine is no OSError, so it escaped as a traceback and exit 1, and an
    alarm night printed no ALARM line. Now it is the webhook's NightlyError, which the exit code handles."""
    import socket
    import threading

    from memex.stages.nightly import NightlyError, post_webhook

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def answer():
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/hook"
    with pytest.raises(NightlyError, match=r"nightly.webhook=http://127.0.0.1.* could not be reached \(.*SSH-2.0"):
        post_webhook(url, {"event": "memex.nightly"}, timeout=10)
    srv.close()


def test_an_alarm_a_night_ended_before_announcing_is_announced_by_the_next(tmp_path, monkeypatch, capsys):
    """An alarm row is final: the checkpoint is not audited again. A night that wrote one and then failed
    (a later audit's storage error, cron's timeout killing it) never printed its ALARM nor called the
    webhook, and no later night did. Now a row is marked announced once its ALARM line is printed, and
    the next night of the config announces the ones without a mark, once. Rows of a ledger older than
    the marks (finished before the first night that keeps them) count as announced."""
    import datetime as dt

    from memex import cli

    root = tmp_path / "runs"
    ledger = Ledger(str(root / "_nightly"))
    sha = "c" * 64

    def row(weights, outcome, finished):
        return {"location": f"/ck/{weights}", "series": "/ck", "step": 1, "base": "", "weights_sha256": weights * 64,
                "files_signature": "", "config_sha256": sha, "run": str(root / weights),
                "report": str(root / weights / "report" / "index.html"), "samples": 1, "extracted": 2,
                "extracted_generations": 2, "flagged_prompts": 0, "started": finished, "finished": finished,
                "outcome": outcome, "message": "2 > nightly.budget=0" if outcome != "ok" else ""}

    old = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    ledger.append(row("a", "over_budget", old))  # an old ledger's alarm: its night announced it
    monkeypatch.setattr(nightly, "plan", lambda cfg: nightly.NightlyResult(sha, 2, [], ledger=ledger.uri))
    def night():
        monkeypatch.setattr(sys, "argv", ["memex", "nightly", f"storage.root={root}", f"nightly.location={tmp_path}"])
        cli.main()

    night()  # the first night that keeps marks: nothing to announce, exit 0
    assert "ALARM" not in capsys.readouterr().err

    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(seconds=1)
    ledger.append(row("b", "grew", now))  # written, then that night died before its ALARM line
    ledger.append(row("d", "ok", now))
    with pytest.raises(SystemExit) as e:
        night()
    out = capsys.readouterr()
    assert e.value.code == 3, out.err
    assert "memex nightly: ALARM: /ck/b: 2 > nightly.budget=0 (found " in out.err and "/ck/a" not in out.err
    assert "by a night that ended before announcing it" in out.out
    night()  # announced once: the night after exits 0
    assert "ALARM" not in capsys.readouterr().err

    # plan mode (a job per checkpoint, each with nightly.only): a job killed before its ALARM line leaves its
    # row to the next night's plan, which prints its lines for the shell loop, then the ALARM, and exits 3
    ledger.append(row("e", "over_budget", dt.datetime.now(dt.timezone.utc).replace(microsecond=0)))
    for code in (3, None):
        monkeypatch.setattr(sys, "argv", ["memex", "nightly", f"storage.root={root}", f"nightly.location={tmp_path}",
                                          "nightly.action=plan"])
        if code is None:
            cli.main()
            assert "ALARM" not in capsys.readouterr().err
            continue
        with pytest.raises(SystemExit) as e:
            cli.main()
        out = capsys.readouterr()
        assert e.value.code == 3 and out.out == "" and "memex nightly: ALARM: /ck/e: 2 > nightly.budget=0" in out.err


def test_trend_links_are_relative_only_within_one_bucket():
    """The ledger in bucket A, the runs in bucket B: the relative link ../../../B/runs/... resolved
    inside A on a bucket website. Absolute across buckets, relative within one (and on local disk)."""
    from memex.stages.nightly import trend_link

    page = "s3://a/_nightly/report"
    assert trend_link("s3://a/runs/x/report/index.html", page) == "../../runs/x/report/index.html"
    assert trend_link("s3://b/runs/x/report/index.html", page) == "s3://b/runs/x/report/index.html"
    assert trend_link("/r/runs/x/report/index.html", "/r/_nightly/report") == "../../runs/x/report/index.html"
    assert trend_link("gs://a/runs/x/report/index.html", page) == "gs://a/runs/x/report/index.html"


def test_a_config_key_added_later_leaves_the_ledgers_identity_alone():
    """config_sha256 is a ledger row's identity: a setting added to memex later (index.train_size,
    model.lora) left unset must not change it, or every checkpoint of every series is audited again
    and the first night after the upgrade has nothing to gate against. The value below is the default
    nightly config's hash before index.train_size existed (commit fb9f36f). A change that moves it on
    purpose re-audits every ledger: say so in the README and update it here."""
    from memex.config import ADDED_KEYS

    cfg = compose(["nightly.location=/ckpts"], config_name="nightly")
    assert "train_size" in ADDED_KEYS["index"] and cfg.index.train_size is None
    assert nightly.config_sha256(cfg) == "c612d77fa3e1d058af17506de25092f5b5a19859d89270d5c0bffca5b588dbc6"
    tuned = compose(["nightly.location=/ckpts", "index=ivfpq", "index.train_size=200000"], config_name="nightly")
    assert nightly.config_sha256(tuned) != nightly.config_sha256(
        compose(["nightly.location=/ckpts", "index=ivfpq"], config_name="nightly"))  # set, it counts


def test_a_checkpoint_whose_weights_cannot_be_hashed_is_skipped_not_the_night(tmp_path):
    """A pipeline folder under the location with model_index.json and no weight files (an export that
    failed part-way) raised from the plan's hashing, and the night stopped before any audit, every
    night until someone fixed the folder. It is skipped with its reason; the rest is planned."""
    location = tmp_path / "watch"
    shutil.copytree(DEMO_RUN / "checkpoint-1000", location / "run" / "checkpoint-1000")
    broken = location / "export"
    shutil.copytree(BASE, broken)
    for f in broken.rglob("*"):
        if f.suffix in (".safetensors", ".bin"):
            f.unlink()
    cfg = compose(_overrides(tmp_path, location, f"nightly.base_model={BASE}", "nightly.settle_minutes=0"),
                  config_name="nightly")
    res = nightly.plan(cfg)
    assert [p.ckpt.step for p in res.pending] == [1000]
    assert [s["location"] for s in res.skipped] == [str(broken)]
    assert "no weight files" in res.skipped[0]["reason"]
    assert "skipped     " in nightly.format_result(res)


def test_a_tracker_failure_does_not_hide_the_gate_s_alarm(tmp_path, monkeypatch):
    """The audit finished over nightly.budget and only the tracker failed: the row is an error (retried
    next night, the tracker redone), and it was no alarm, so the night printed no ALARM line, exited 1
    and the webhook's alarms were empty, for as long as the tracker kept failing. It is this night's
    alarm too."""
    from memex.stages import audit
    from memex.tracking import TrackerError

    location = tmp_path / "watch" / "demo-text-run"
    shutil.copytree(DEMO_RUN / "checkpoint-1000", location / "checkpoint-1000")
    cfg = compose(_overrides(tmp_path, tmp_path / "watch", "nightly.budget=0"), config_name="nightly")
    summary = {"samples": 32, "extracted_unique_train_images": 5, "extracted_generations": 7, "prompts_flagged": 1}

    def tracker_down(acfg, **_):
        raise TrackerError("tracker=mlflow could not log: connection refused", summary)

    monkeypatch.setattr(audit, "run", tracker_down)
    res = nightly.run(cfg)
    (row,) = res.rows
    assert row["outcome"] == "error" and "the gate said over_budget" in row["message"]
    assert res.alarms == [row]
    assert nightly.payload(res)["alarms"]
    assert [r["outcome"] for r in Ledger(nightly.ledger_root(cfg)).read().to_pylist()] == ["error"]

    # announced (cli: the ALARM line, then the markers); the next night's retry logs, and its row is the same
    # alarm: it was paged again (ALARM, exit 3, the webhook), every night the tracker had stayed down
    nightly.mark_announced(cfg, res)
    monkeypatch.setattr(audit, "run", lambda acfg, **_: summary)
    again = nightly.run(cfg)
    (row,) = again.rows
    assert row["outcome"] == "over_budget" and again.alarms == [] and not nightly.payload(again)["alarms"]


def test_a_row_another_job_appends_during_the_audit_is_kept_alone(tmp_path, monkeypatch):
    """Another job took the run folder's lease over while this one was alive (its heartbeats stalled past
    resources.lease_timeout_s: an outage, a stalled VM), audited the checkpoint and appended its row
    while this job's audit ran. Both appended, and an alarm was announced twice. The ledger is read
    again before the append: the other job's row stands alone."""
    from memex.layout import LEDGER_SCHEMA
    from memex.stages import audit

    location = tmp_path / "watch" / "demo-text-run"
    shutil.copytree(DEMO_RUN / "checkpoint-1000", location / "checkpoint-1000")
    cfg = compose(_overrides(tmp_path, tmp_path / "watch", "nightly.budget=0"), config_name="nightly")
    (p,) = nightly.plan(cfg).pending
    sha = nightly.config_sha256(cfg)
    ledger = Ledger(nightly.ledger_root(cfg), cfg.storage.options)

    def audited_meanwhile(acfg, **_):
        ledger.append({k: None for k in LEDGER_SCHEMA.names} | {
            "location": p.ckpt.location, "series": p.ckpt.series, "step": 1000, "base": "", "weights_sha256": p.weights,
            "files_signature": "", "config_sha256": sha, "run": "elsewhere", "report": "elsewhere", "samples": 32,
            "extracted": 5, "extracted_generations": 7, "flagged_prompts": 1, "outcome": "over_budget",
            "message": "5 > nightly.budget=0"})
        return {"samples": 32, "extracted_unique_train_images": 5, "extracted_generations": 7, "prompts_flagged": 1}

    monkeypatch.setattr(audit, "run", audited_meanwhile)
    res = nightly.run(cfg)
    assert res.rows == [] and [s["reason"] for s in res.skipped] == ["audited by another job since"]
    assert [r["run"] for r in ledger.read().to_pylist()] == ["elsewhere"]


def test_a_memex_train_run_is_audited_once_per_step_and_not_before_it_saves_its_pipeline(tmp_path, caplog):
    """While `memex train` trains, its output holds checkpoints/checkpoint-<step>/ and no pipeline: the
    checkpoint failed discovery ("set nightly.base_model"), and every other run's audit with it. Once
    finished, its last checkpoint-<steps>/ and the pipeline (the same weights) were two audits at one
    step, two points on the trend. Now: left out with a warning while training; the final step once."""
    out = tmp_path / "watch" / "trained"
    for step in (1000, 2000):
        ck = out / "checkpoints" / f"checkpoint-{step}"
        shutil.copytree(DEMO_RUN / f"checkpoint-{step}", ck)
        (ck / "optimizer.json").write_text(json.dumps({"param_groups": [], "step": step, "recipe": {"seed": 0}}))
    with caplog.at_level("WARNING", logger="memex"):
        assert discover(str(tmp_path / "watch")) == []
        assert discover(str(tmp_path / "watch"), str(BASE)) == []  # no base_model is its base: it trains from scratch
    assert "still training left out" in caplog.text

    shutil.copytree(BASE, out, dirs_exist_ok=True)  # the run ends: its pipeline, at trainer.steps=2000
    (out / "memex_train.json").write_text(json.dumps({"steps": 2000}))
    found = discover(str(tmp_path / "watch"))
    assert [(c.step, Path(c.location).name) for c in found] == [(1000, "checkpoint-1000"), (2000, "trained")]


def test_an_unexpected_error_prints_its_traceback_without_credentials(tmp_path, monkeypatch, capsys):
    """An error memex does not know (a bug, a library's): Hydra printed "Error executing job with
    overrides: [...]" with the raw command line (a webhook's secret path included) and its traceback, none
    of it redacted. Now the traceback is printed redacted, with exit status 1."""
    from memex import cli

    def boom(cfg):
        raise RuntimeError("lost https://user:hunter2@storage.example/bucket")

    monkeypatch.setattr(nightly, "run", boom)
    monkeypatch.setattr(sys, "argv", ["memex", "nightly", f"storage.root={tmp_path}",
                                      "nightly.webhook=https://hooks.slack.com/services/T0/B0/SECRETXYZ"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" in err and "RuntimeError: lost https://" in err, err
    assert "hunter2" not in err and "SECRETXYZ" not in err and "Error executing job" not in err


def test_weights_rewritten_after_the_plan_are_not_recorded_under_the_planned_hash(tmp_path, monkeypatch):
    """A whole-night job names each run folder and ledger row by the weights hashed at plan time, and audits
    hours later: weights rewritten in place since (training restarted into the same output_dir; the files
    keep their sizes) were audited and recorded as the planned ones. Now a checkpoint whose files changed
    since the plan, or while it was audited, is skipped with no row, and the next night audits it under
    its new hash."""
    import os

    from memex.stages import audit

    location = tmp_path / "watch" / "demo-text-run"
    shutil.copytree(DEMO_RUN / "checkpoint-1000", location / "checkpoint-1000")
    weights = next((location / "checkpoint-1000" / "unet").glob("*.safetensors"))
    cfg = compose(_overrides(tmp_path, tmp_path / "watch"), config_name="nightly")
    real_plan, real_audit = nightly.plan, audit.run

    def rewrite():
        data = bytearray(weights.read_bytes())
        data[-64:] = bytes(64)  # new bytes, the same size: what a restarted training's save gives
        weights.write_bytes(bytes(data))
        st = weights.stat()
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    def plan_then_rewritten(c):
        res = real_plan(c)
        rewrite()
        return res

    audited = []
    monkeypatch.setattr(nightly, "plan", plan_then_rewritten)
    monkeypatch.setattr(audit, "run", lambda *a, **k: audited.append(1) or real_audit(*a, **k))
    res = nightly.run(cfg)
    assert res.rows == [] and audited == [] and res.skipped == [
        {"location": str(location / "checkpoint-1000"), "reason": nightly.REWRITTEN}]

    def rewritten_midway(acfg, **k):
        rewrite()
        return {"samples": 1, "extracted_unique_train_images": 0, "extracted_generations": 0, "prompts_flagged": 0}

    monkeypatch.setattr(nightly, "plan", real_plan)
    monkeypatch.setattr(audit, "run", rewritten_midway)
    res = nightly.run(cfg)
    assert res.rows == [] and [s["reason"] for s in res.skipped] == [nightly.REWRITTEN]
    assert Ledger(str(tmp_path / "runs" / "_nightly")).read().num_rows == 0


def test_the_plan_prints_checkpoints_quoted_so_nightly_only_takes_any_path(tmp_path, monkeypatch, capsys):
    """The plan's lines go to `nightly.only="$ckpt"` (README's cron line, jobs/nightly.py). A sweep's checkpoint
    path (.../lr=1e-4,bs8 (v2)/checkpoint-1000) was printed as it is, and Hydra's grammar refused it (or split it
    as a sweep): the job exited 1 every night and the checkpoint was never audited, while a whole night audited it.
    The plan now prints it quoted for Hydra, and that value finds exactly that checkpoint."""
    from memex import cli

    location = tmp_path / "sweep" / "lr=1e-4,bs8 (v2) été"
    shutil.copytree(DEMO_RUN / "checkpoint-1000", location / "checkpoint-1000")
    over = _overrides(tmp_path, tmp_path / "sweep")
    monkeypatch.setattr(sys, "argv", ["memex", "nightly", *over, "nightly.action=plan"])
    cli.main()
    (line,) = capsys.readouterr().out.strip().splitlines()
    _, ckpt = line.split(" ", 1)  # as `while read -r id ckpt` splits it
    cli.check_overrides([f"nightly.only={ckpt}"], nightly.NightlyAuditConfig)  # the job's first check
    only = nightly.plan(compose([*over, f"nightly.only={ckpt}"], config_name="nightly"))
    assert [p.ckpt.location for p in only.pending] == [str(location / "checkpoint-1000")]


def test_a_webhook_that_redirects_is_an_error_naming_the_new_url(tmp_path):
    """urllib follows a 301/302/303 answer to a POST with a GET without the body: the alarm's payload never
    reached the receiver (an http -> https redirect, a moved hook), and the night read the GET's 200 as sent.
    A redirect is now an error naming the URL to give instead, and nothing is sent elsewhere."""
    seen = []

    class Moved(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(("POST", self.path))
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/old":
                self.send_response(301)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/new")
            else:
                self.send_response(200)
            self.end_headers()

        def do_GET(self):
            seen.append(("GET", self.path))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", free_port()), Moved)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        # (its path redacted, as the webhook's own: a Slack or Teams hook's path is its secret)
        with pytest.raises(nightly.NightlyError, match=rf"answered HTTP 301 \(a redirect to {base}/\*\*\*: give that "
                                                       r"URL as nightly.webhook\)"):
            nightly.post_webhook(f"{base}/old", {"status": "alarm"}, 10)
        assert seen == [("POST", "/old")]
        nightly.post_webhook(f"{base}/new", {"status": "alarm"}, 10)  # the URL it names: delivered
        assert seen[-1] == ("POST", "/new")
    finally:
        server.shutdown()


def test_a_planned_checkpoint_rotated_away_before_its_job_ran_is_skipped_not_failed(tmp_path, monkeypatch, capsys):
    """Plan mode: the plan lists checkpoint-1000, its job waits in Ray's queue, and the trainer deletes it
    (checkpoints_total_limit). The job failed with "nightly.only=... is not a checkpoint" (exit 1, a FAILED job
    every such night); a checkpoint deleted during a whole night is skipped. It is skipped the same way now;
    a nightly.only elsewhere, or one that is there and no checkpoint, is still refused."""
    from memex import cli

    location = tmp_path / "watch" / "run"
    shutil.copytree(DEMO_RUN / "checkpoint-2000", location / "checkpoint-2000")
    over = _overrides(tmp_path, tmp_path / "watch")
    gone = str(location / "checkpoint-1000")
    res = nightly.run(compose([*over, f"nightly.only={gone}"], config_name="nightly"))
    assert res.rows == [] and res.pending == [] and res.status == "ok"
    assert res.skipped == [{"location": gone, "reason": "deleted before its audit began"}]
    monkeypatch.setattr(sys, "argv", ["memex", "nightly", *over, f"nightly.only={gone}"])
    cli.main()  # exit 0: no SystemExit
    assert "deleted before its audit began" in capsys.readouterr().out
    (location / "notes").mkdir()
    for wrong in ("/elsewhere/checkpoint-1000", str(location / "notes")):
        with pytest.raises(nightly.MemexError, match="is not a checkpoint under nightly.location"):
            nightly.run(compose([*over, f"nightly.only={wrong}"], config_name="nightly"))


def test_a_restarted_runs_steps_are_not_gated_against_the_earlier_runs_later_steps(tmp_path):
    """Training restarted into the same output_dir: the earlier run's rows at steps 1000 and 1500 stay in the
    ledger, and each new step was gated against the old run's next step ("step 1000, audited before this one,
    extracted 3 ... more than this step": a false "grew" every night). A later step's row counts only when it
    finished after this checkpoint was written (a later step of this run audited first); the old run's
    finished before it existed."""
    import datetime as dt

    from memex.checkpoints import written_at

    sha, series = "c" * 64, "/ck/run"
    t = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)

    def row(step, extracted, finished):
        return {"series": series, "config_sha256": sha, "step": step, "extracted": extracted, "outcome": "ok",
                "finished": finished}

    old = [row(500, 1, t), row(1000, 3, t + dt.timedelta(hours=1)), row(1500, 5, t + dt.timedelta(hours=2))]
    written = (t + dt.timedelta(days=2)).timestamp()  # the restarted run's checkpoint-500, two days later
    assert nightly._next(old, series, 500, sha)["step"] == 1000  # without the time: the old run's next step
    assert nightly._next(old, series, 500, sha, written) is None
    mine = row(1000, 0, t + dt.timedelta(days=3))  # this run's step 1000, audited before its 500 (a retry)
    assert nightly._next([*old, mine], series, 500, sha, written) is mine

    location = tmp_path / "run"
    shutil.copytree(DEMO_RUN / "checkpoint-1000", location / "checkpoint-1000")
    (c,) = discover(str(location), str(BASE), 0)
    newest = max(p.stat().st_mtime for p in (location / "checkpoint-1000").rglob("*") if p.is_file())
    assert written_at(c) >= newest - 1e-3
