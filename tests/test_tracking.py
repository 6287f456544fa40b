"""tracker=mlflow|tensorboard|wandb (memex/tracking.py): the audit's headline numbers at the checkpoint's
training step, beside the training run's own curves, read back with each tracker's own reader.

The unit tests log a summary of summary.json's shape (memex/stages/match.py) and a report folder to
real local stores: MLflow's file store and its sqlite store, TensorBoard event files, a wandb offline
run. The slow ones go through `memex nightly` and `memex audit` on the demo checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from memex import tracking
from memex.config import ConfigError, TrackerKind
from memex.tracking import TrackerError, log_audit

from conftest import BIN, REPO, SMALL_AUDIT, compose

# mlflow, tensorboard and wandb come with the [test] extra: a broken install fails the tests that use them
# (no module-level skip: it hid every test here, the tensorboard and config ones included)

AUDIT_FILL = ["trainset.path=/data/train.parquet"]


def _summary(run: Path, **extra) -> dict:
    """A summary.json as memex/stages/match.py writes it (the keys memex/tracking.py reads, and some it does not)."""
    s = {"run": str(run), "model": {"name": "demo-text", "path": "/models/demo-text"}, "samples": 32, "prompts": 4,
         "prompts_sampled": 4, "unet_evaluations": 3200, "unet_evaluations_triage": 32,
         "unet_evaluations_per_extracted_image": 1600, "prompts_flagged": 2, "prompts_undecided": 1,
         "candidates_verified": 32, "extracted_generations": 9, "extracted_unique_train_images": 2,
         "extracted_pictures": [{"picture": "t01", "rows": ["t01"]}, {"picture": "t02", "rows": ["t02"]}],
         "uncounted_pictures": [{"picture": "t07", "low_complexity": True},
                                {"picture": "t09", "low_complexity": False}],
         "index": {"uri": "/runs/_index/k", "indexed": 100, "quarantined": 3, "train_images": 103},
         "thresholds": {"match_threshold": 0.15}, "per_prompt": []}
    return {**s, **extra}


def _run_folder(tmp_path: Path, name: str = "demo-text-abc") -> tuple[Path, str]:
    run = tmp_path / "runs" / name
    (run / "report").mkdir(parents=True)
    (run / "report" / "index.html").write_text("<html><body>memex report</body></html>")
    return run, str(run / "report" / "index.html")


def _cfg(*overrides: str):
    return compose([*AUDIT_FILL, *overrides], config_name="audit")


# ---- config -----------------------------------------------------------------------------------------
def test_tracker_group_composes_and_defaults_to_none():
    assert _cfg().tracker.kind == TrackerKind.none
    cfg = _cfg("tracker=mlflow", "tracker.experiment=sd-ft", "tracker.run_id=abc", "tracker.step=2000")
    t = cfg.tracker
    assert (t.kind, t.experiment, t.run_id, t.step) == (TrackerKind.mlflow, "sd-ft", "abc", 2000)
    assert _cfg("tracker=tensorboard", "tracker.log_dir=/tb").tracker.log_dir == "/tb"
    w = _cfg("tracker=wandb", "tracker.project=p").tracker
    assert (w.kind, w.mode.value, w.project) == (TrackerKind.wandb, "offline", "p")
    n = compose(["tracker=mlflow", "nightly.location=/ckpts"], config_name="nightly")
    assert n.tracker.kind == TrackerKind.mlflow


@pytest.mark.parametrize("overrides, key", [
    (["tracker.kind=comet"], "tracker.kind"),
    (["tracker=tensorboard"], "tracker.log_dir"),  # the training's log dir is required
    (["tracker=mlflow", "tracker.log_dir=/tb"], "tracker.log_dir"),  # another kind's key does nothing: refused
    (["tracker=tensorboard", "tracker.log_dir=/tb", "tracker.experiment=x"], "tracker.experiment"),
    (["tracker=tensorboard", "tracker.log_dir=/tb", "tracker.run_id=x"], "tracker.run_id"),
    (["tracker=mlflow", "tracker.mode=online"], "tracker.mode"),
    (["tracker.step=1000"], "tracker.step"),  # tracker=none logs nothing
    (["tracker=mlflow", "tracker.step=-1"], "tracker.step"),
    (["tracker=wandb", "tracker.mode=cloud"], "tracker.mode"),
    (["tracker=mlflow", "tracker.experiment= "], "tracker.experiment"),
])
def test_bad_tracker_settings_name_the_key(overrides, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises((ConfigError, ConfigCompositionException)) as e:
        _cfg(*overrides)
    msg = str(e.value) + str(e.value.__cause__ or "")
    assert key in msg, msg


def test_unknown_tracker_key_is_refused_naming_the_nearest():
    from memex import cli

    assert cli.check_key("tracker.experimnt", cli.C.AuditConfig) == \
        "tracker.experimnt is not a setting; did you mean tracker.experiment?"


def test_nightly_sets_the_step_itself_and_the_tracker_is_not_in_the_config_hash():
    from memex.stages import nightly

    with pytest.raises(ConfigError, match=r"tracker\.step"):
        compose(["tracker=mlflow", "tracker.step=5", "nightly.location=/c"], config_name="nightly")
    plain = compose(["nightly.location=/c"], config_name="nightly")
    tracked = compose(["nightly.location=/c", "tracker=mlflow", "tracker.run_id=r", "tracker.tracking_uri=http://h"],
                      config_name="nightly")
    assert nightly.config_sha256(plain) == nightly.config_sha256(tracked)  # turning a tracker on audits nothing again
    t = tracking.at_checkpoint(tracked.tracker, 3000, "/train/sd-ft-run/")
    assert (t.step, t.run_name, t.run_id) == (3000, "sd-ft-run", "r")
    assert tracking.at_checkpoint(plain.tracker, 3000, "/x") is plain.tracker
    tb = tracking.at_checkpoint(_cfg("tracker=tensorboard", "tracker.log_dir=/tb").tracker, 3000, "/x")
    assert (tb.step, tb.run_name) == (3000, None)


def test_two_series_of_one_folder_name_log_to_two_tracker_runs(tmp_path):
    """diffusers' default output_dir (sd-model-finetuned-lora) under two parents: both series were named
    after the folder, so mlflow and wandb logged them into one run, each overwriting the other's metrics
    at the same steps. Each series goes by its path under nightly.location (one directly under it: its folder
    name, as before)."""
    import torch
    from safetensors.torch import save_file

    from memex.lora import LORA_FILE
    from memex.stages import nightly

    lora = {"unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": torch.zeros(4, 8)}
    for run in ("dog/sd-model-finetuned-lora", "cat/sd-model-finetuned-lora", "owl/owl-lora"):
        for step in (500, 1000):
            (tmp_path / "ck" / run / f"checkpoint-{step}").mkdir(parents=True)
            save_file(lora, tmp_path / "ck" / run / f"checkpoint-{step}" / LORA_FILE)
    base = REPO / "demo" / "models" / "demo-text"
    cfg = compose([f"nightly.location={tmp_path / 'ck'}", f"nightly.base_model={base}", "tracker=mlflow",
                   "tracker.tracking_uri=http://h", f"storage.root={tmp_path / 'runs'}"], config_name="nightly")
    res = nightly.plan(cfg)
    names = {p.ckpt.series: tracking.at_checkpoint(cfg.tracker, p.ckpt.step, p.ckpt.series, p.series_name).run_name
             for p in res.pending}
    assert names == {str(tmp_path / "ck" / "dog" / "sd-model-finetuned-lora"): "dog/sd-model-finetuned-lora",
                     str(tmp_path / "ck" / "cat" / "sd-model-finetuned-lora"): "cat/sd-model-finetuned-lora",
                     str(tmp_path / "ck" / "owl" / "owl-lora"): "owl/owl-lora"}
    # from the path alone: a series keeps its name when the other series of its folder name go
    assert nightly.series_names({str(tmp_path / "ck" / "dog" / "sd-model-finetuned-lora")}, str(tmp_path / "ck")) == \
        {str(tmp_path / "ck" / "dog" / "sd-model-finetuned-lora"): "dog/sd-model-finetuned-lora"}
    assert nightly.series_names({str(tmp_path / "ck")}, str(tmp_path / "ck")) == {str(tmp_path / "ck"): "ck"}


def test_metrics_and_params():
    s = _summary(Path("/runs/r"))
    m = tracking.metrics(s)
    assert m["memex/extracted_images"] == 2 and m["memex/prompts_flagged"] == 2 and m["memex/unet_evaluations"] == 3200
    assert m["memex/unet_evaluations_per_extracted_image"] == 1600 and m["memex/train_images_quarantined"] == 3
    assert m["memex/uncounted_pictures"] == 2 and m["memex/uncounted_low_complexity_pictures"] == 1
    # nothing extracted: no evaluations per image; an older summary: only the keys it has
    assert "memex/unet_evaluations_per_extracted_image" not in tracking.metrics(
        _summary(Path("/r"), unet_evaluations_per_extracted_image=None))
    assert set(tracking.metrics({"extracted_unique_train_images": 1, "prompts_flagged": 0})) == {
        "memex/extracted_images", "memex/prompts_flagged"}

    secret = "https://user:hunter2@data.example.com/train.parquet?X-Amz-Signature=abcdef&v=1"
    a = _cfg(f"trainset.path='{secret}'", "+storage.options.secret=s3cr3t", "tracker=mlflow", "model.path=/ckpt/a")
    # model.text_encoder: memex nightly sets each DreamBooth checkpoint's own (MLflow refused its second value)
    b = _cfg(f"trainset.path='{secret}'", "tracker=mlflow", "tracker.run_id=x", "model.path=/ckpt/b", "run.name=other",
             "model.text_encoder=/ckpt/b/text_encoder")
    p = tracking.params(a)
    assert "hunter2" not in json.dumps(p) and "abcdef" not in json.dumps(p)
    assert p["trainset.path"] == "https://***@data.example.com/train.parquet?X-Amz-Signature=***&v=1"
    assert p["sampling.samples_per_prompt"] == "80" and p["budget.rounds"] == "[4, 16]"  # the demo's audit tuning
    assert p == tracking.params(b)  # the same for every checkpoint of a config (an MLflow param cannot change)
    assert not any(k.split(".")[0] in ("storage", "run", "tracker", "resources") for k in p)


def test_a_missing_package_names_the_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: `import mlflow` raises ImportError
    t = _cfg("tracker=mlflow").tracker
    with pytest.raises(ConfigError, match=r"tracker=mlflow needs its package: pip install 'memex\[mlflow\]'"):
        tracking.check(t)


# ---- mlflow -----------------------------------------------------------------------------------------
def _training_run(client, experiment: str) -> str:
    """A training run as a trainer leaves it: its loss at steps 0..3000, still running."""
    from mlflow.entities import Metric

    exp = client.create_experiment(experiment)
    run = client.create_run(exp, run_name="train")
    client.log_batch(run.info.run_id, metrics=[Metric("train/loss", 1.0 / (s + 1), 0, s) for s in range(0, 3001, 500)])
    return run.info.run_id


def test_mlflow_logs_into_the_training_run_at_each_step(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(uri)
    rid = _training_run(client, "sd-ft")
    for step, extracted in ((1000, 0), (2000, 2)):
        run, report = _run_folder(tmp_path, f"demo-text-run-step{step}-aa-bb")
        cfg = _cfg("tracker=mlflow", f"tracker.tracking_uri={uri}", f"tracker.run_id={rid}", f"tracker.step={step}")
        s = _summary(run, extracted_unique_train_images=extracted)
        where = log_audit(cfg, s, report, run.name)
        assert rid in where and s["tracker"] == where

    history = {(m.step, m.value) for m in client.get_metric_history(rid, "memex/extracted_images")}
    assert history == {(1000, 0.0), (2000, 2.0)}
    assert {m.step for m in client.get_metric_history(rid, "memex/unet_evaluations")} == {1000, 2000}
    assert len(client.get_metric_history(rid, "train/loss")) == 7  # the training's own curve is untouched
    r = client.get_run(rid)
    assert r.info.status == "RUNNING"  # logged into, not ended: the trainer may still be writing to it
    assert r.data.params["memex.match.threshold"] == "0.15" and r.data.tags["memex.step"] == "2000"
    assert r.data.tags["memex.report"].endswith("demo-text-run-step2000-aa-bb/report/index.html")
    arts = [a.path for a in client.list_artifacts(rid, "memex/step-2000/demo-text-run-step2000-aa-bb")]
    assert sorted(arts) == ["memex/step-2000/demo-text-run-step2000-aa-bb/report",
                            "memex/step-2000/demo-text-run-step2000-aa-bb/summary.json"]
    local = client.download_artifacts(rid, "memex/step-1000/demo-text-run-step1000-aa-bb", str(tmp_path / "dl"))
    assert (Path(local) / "report" / "index.html").read_text() == "<html><body>memex report</body></html>"
    assert json.loads((Path(local) / "summary.json").read_text())["extracted_unique_train_images"] == 0


def test_mlflow_attaches_a_report_on_object_storage(tmp_path, monkeypatch, s3_server, bucket):
    """storage=s3: the report folder is fetched from the bucket (moto on loopback) and logged as artifacts."""
    from mlflow.tracking import MlflowClient

    from memex.storage import Store

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = Store(f"s3://{bucket}/runs/r1", s3_server)
    store.write_bytes(store.join("report", "index.html"), b"<html>on s3</html>")
    report = store.uri_of(store.join("report", "index.html"))
    uri = (tmp_path / "mlruns").as_uri()
    cfg = _cfg("tracker=mlflow", f"tracker.tracking_uri={uri}", "tracker.run_name=train", "tracker.step=7")
    cfg = replace(cfg, storage=replace(cfg.storage, root=f"s3://{bucket}/runs", options=s3_server))
    log_audit(cfg, _summary(f"s3://{bucket}/runs/r1"), report, "r1")
    client = MlflowClient(uri)
    (r,) = client.search_runs(["0"])
    local = client.download_artifacts(r.info.run_id, "memex/step-7/r1/report", str(tmp_path / "dl"))
    assert (Path(local) / "index.html").read_text() == "<html>on s3</html>"
    assert r.data.tags["memex.report"] == report and "testing" not in json.dumps(r.data.params)


def test_mlflow_default_store_run_by_name_in_an_experiment(tmp_path, monkeypatch):
    """MLflow's default local store (sqlite), no run id: the run named run_name in tracker.experiment,
    created by the first audit and found again by the next."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the sqlite store keeps artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for step in (1000, 2000):
        run, report = _run_folder(tmp_path, f"ckpt-{step}")
        cfg = _cfg("tracker=mlflow", f"tracker.tracking_uri={uri}", "tracker.experiment=memex-audits",
                   "tracker.run_name=sd-ft-run", f"tracker.step={step}")
        log_audit(cfg, _summary(run, prompts_flagged=step // 1000), report, run.name)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("memex-audits")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.run_name == "sd-ft-run" and r.info.status == "FINISHED"
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(r.info.run_id, "memex/prompts_flagged"),
                                              key=lambda m: m.step)] == [(1000, 1.0), (2000, 2.0)]
    assert {a.path for a in client.list_artifacts(r.info.run_id, "memex")} == {"memex/step-1000", "memex/step-2000"}


def test_a_run_memex_made_is_marked_failed_when_its_logging_fails_and_finished_by_the_retry(tmp_path, monkeypatch):
    """A run memex created by name, whose logging then failed (the artifact store down after the metrics
    went in): it stayed RUNNING for good, and the retry, finding it by name, left it so. It is marked
    FAILED, and the retry that logs ends it FINISHED."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run, report = _run_folder(tmp_path, "ckpt-1000")
    cfg = _cfg("tracker=mlflow", f"tracker.tracking_uri={uri}", "tracker.experiment=memex-audits",
               "tracker.run_name=sd-ft-run", "tracker.step=1000")
    real = MlflowClient.log_dict

    def down(self, *a, **k):
        raise ConnectionError("artifact store unreachable")

    monkeypatch.setattr(MlflowClient, "log_dict", down)
    with pytest.raises(TrackerError, match="artifact store unreachable"):
        log_audit(cfg, _summary(run), report, run.name)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("memex-audits")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FAILED"
    monkeypatch.setattr(MlflowClient, "log_dict", real)
    log_audit(cfg, _summary(run), report, run.name)  # the retry (the same command again)
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED"


def test_mlflow_failure_names_the_tracker_and_keeps_the_summary(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run, report = _run_folder(tmp_path)
    s = _summary(run)
    cfg = _cfg("tracker=mlflow", f"tracker.tracking_uri={(tmp_path / 'mlruns').as_uri()}")
    with pytest.raises(TrackerError) as e:  # MLflow 3 refuses its file store unless told
        log_audit(cfg, s, report, run.name)
    msg = str(e.value)
    assert msg.startswith("tracker=mlflow could not log the audit") and "MLFLOW_ALLOW_FILE_STORE" in msg
    assert "tracker.tracking_uri" in msg and report in msg and e.value.summary is s

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    bad = replace(cfg, tracker=replace(cfg.tracker, run_id="0123456789abcdef0123456789abcdef"))
    with pytest.raises(TrackerError, match="tracker.run_id"):  # not a run of this store
        log_audit(bad, s, report, run.name)


# ---- tensorboard ------------------------------------------------------------------------------------
def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_beside_the_training_loss(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    log_dir = tmp_path / "train" / "logs"
    w = SummaryWriter(str(log_dir))  # the trainer's own event file
    for step in range(0, 3001, 1000):
        w.add_scalar("train/loss", 1.0 / (step + 1), step)
    w.close()
    for step, extracted in ((1000, 0), (2000, 3)):
        run, report = _run_folder(tmp_path, f"r{step}")
        cfg = _cfg("tracker=tensorboard", f"tracker.log_dir={log_dir}", f"tracker.step={step}")
        assert str(log_dir) in log_audit(cfg, _summary(run, extracted_unique_train_images=extracted), report, run.name)

    acc = _events(log_dir)
    assert [(e.step, e.value) for e in acc.Scalars("memex/extracted_images")] == [(1000, 0.0), (2000, 3.0)]
    assert [e.step for e in acc.Scalars("memex/unet_evaluations")] == [1000, 2000]
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1000, 2000, 3000]
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("memex/report/text_summary")}
    assert "r2000/report/index.html" in texts[2000] and "no artifact store" in texts[2000]
    assert "3 training images extracted" in texts[2000]
    config = acc.Tensors("memex/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| match.threshold | 0.15 |" in config


def test_tensorboard_unwritable_log_dir_is_a_tracker_error(tmp_path):
    run, report = _run_folder(tmp_path)
    (tmp_path / "afile").write_text("x")
    cfg = _cfg("tracker=tensorboard", f"tracker.log_dir={tmp_path / 'afile' / 'logs'}", "tracker.step=1")
    with pytest.raises(TrackerError, match=r"tracker=tensorboard could not log.*tracker\.log_dir"):
        log_audit(cfg, _summary(run), report, run.name)


# ---- wandb (offline) ----------------------------------------------------------------------------------
def _wandb_records(run_dir: Path) -> list:
    """The records of an offline run's run-<id>.wandb: LevelDB's log format (32 KiB blocks of chunks with
    a 7-byte header: crc, length, type) after wandb's 7-byte file header, each a wandb_internal Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out, buf, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk  # full, first | middle, last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_API_KEY", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _history(records) -> list[dict]:
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def test_wandb_offline_run_has_the_numbers_and_the_report(wandb_home, monkeypatch):
    tmp_path = wandb_home
    run, report = _run_folder(tmp_path, "demo-text-run-step2000-aa-bb")
    cfg = _cfg("tracker=wandb", f"tracker.dir={tmp_path / 'train'}", "tracker.project=sd-ft",
               "tracker.run_id=train123", "tracker.step=2000")
    # the command line as the run was launched: wandb kept sys.argv as the run's metadata, unredacted
    monkeypatch.setattr(sys, "argv", ["memex", "nightly", "nightly.webhook=https://hooks.example/services/SECRETXYZ"])
    where = log_audit(cfg, _summary(run), report, run.name)
    assert "train123" in where and "wandb sync" in where
    (run_dir,) = (tmp_path / "train" / "wandb").glob("offline-run-*-train123")
    records = _wandb_records(run_dir)
    (r,) = [x.run for x in records if x.WhichOneof("record_type") == "run"]
    assert (r.run_id, r.project, r.display_name) == ("train123", "sd-ft", "demo-text-run-step2000-aa-bb")
    config = {u.key: json.loads(u.value_json) for u in r.config.update}
    assert config["memex"]["match.threshold"] == "0.15"
    (h,) = _history(records)
    assert h["memex/step"] == 2000 and h["memex/extracted_images"] == 2 and h["memex/unet_evaluations"] == 3200
    saved = {f.path for x in records if x.WhichOneof("record_type") == "files" for f in x.files.files}
    base = "memex/step-2000/demo-text-run-step2000-aa-bb"
    assert {f"{base}/report/index.html", f"{base}/summary.json"} <= saved
    assert (run_dir / "files" / base / "report" / "index.html").read_text() == "<html><body>memex report</body></html>"
    assert not [f for f in run_dir.rglob("*") if f.is_file() and b"SECRETXYZ" in f.read_bytes()]


# ---- end to end: memex nightly and memex audit on the demo checkpoints ------------------------------------------
STEPS = (1000, 2000)
DEMO_RUN = REPO / "demo" / "checkpoints" / "demo-text-run"
SMALL = SMALL_AUDIT


@pytest.mark.slow
def test_a_tracking_server_that_does_not_answer_is_named_before_any_work(monkeypatch):
    """tracker.run_id checked against a server that refuses connections: named as unreachable (not as "no
    such run"), with one quick try (MLflow's 7 retries held it ~4 min), the user's own settings left as they were."""
    from conftest import free_port

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    t = tracking.TrackerConfig(kind=TrackerKind.mlflow, run_id="abc", tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match=r"tracker=mlflow: cannot read run abc from http://127.0.0.1:\d+ .*check "
                                          r"tracker.tracking_uri"):
        tracking.check_run(t)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # restored


def test_nightly_logs_each_checkpoint_at_its_step_into_the_training_run(tmp_path, monkeypatch):
    """Two checkpoints of the demo training run audited by `memex nightly` with tracker=mlflow into the
    training's run. A tracker.run_id that is no run of the store is refused before any audit (it failed after
    each, every night). The first night's tracker fails once the audits are done (the store stops answering):
    each ledger row is an error that keeps the audit's numbers; the next night resumes the audits and logs
    them at steps 1000 and 2000, beside the training's loss, equal to the ledger's."""
    from mlflow.tracking import MlflowClient

    from memex.ledger import Ledger
    from memex.stages import nightly

    monkeypatch.chdir(tmp_path)  # MLflow's sqlite store keeps artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    rid = _training_run(client, "demo-text")
    location = tmp_path / "watch" / "demo-text-run"
    for step in STEPS:
        shutil.copytree(DEMO_RUN / f"checkpoint-{step}", location / f"checkpoint-{step}")
    common = [f"nightly.location={tmp_path / 'watch'}", f"storage.root={tmp_path / 'runs'}",
              "resources.executor=local", *SMALL, "tracker=mlflow", f"tracker.tracking_uri={uri}"]

    with pytest.raises(ConfigError, match=r"tracker.run_id=0123456789abcdef0123456789abcdef is not a run of sqlite"):
        nightly.run(compose([*common, "tracker.run_id=0123456789abcdef0123456789abcdef"], config_name="nightly"))
    assert not (tmp_path / "runs").exists()  # nothing audited, no ledger row

    def down(*a, **k):
        raise ConnectionError("the tracking server does not answer")

    monkeypatch.setattr(tracking, "_mlflow_log", down)
    res = nightly.run(compose([*common, f"tracker.run_id={rid}"], config_name="nightly"))
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert [(r["step"], r["outcome"]) for r in res.rows] == [(1000, "error"), (2000, "error")]
    for r in res.rows:
        assert r["message"].startswith("tracker=mlflow could not log the audit") and "the gate said" in r["message"]
        assert r["samples"] == 4 * 8 and Path(r["report"]).is_file()  # the audit's results are kept
    assert client.get_metric_history(rid, "memex/extracted_images") == []

    res = nightly.run(compose([*common, f"tracker.run_id={rid}"], config_name="nightly"))  # fixed: retried
    assert [(r["step"], r["outcome"]) for r in res.rows] == [(1000, "ok"), (2000, "ok")]
    extracted = {(m.step, m.value) for m in client.get_metric_history(rid, "memex/extracted_images")}
    assert extracted == {(r["step"], float(r["extracted"])) for r in res.rows}
    flagged = {(m.step, m.value) for m in client.get_metric_history(rid, "memex/prompts_flagged")}
    assert flagged == {(r["step"], float(r["flagged_prompts"])) for r in res.rows}
    assert {m.step for m in client.get_metric_history(rid, "train/loss")} >= set(STEPS)  # beside the loss curve
    for r in res.rows:
        run_name = Path(r["run"]).name
        files = {a.path for a in client.list_artifacts(rid, f"memex/step-{r['step']}/{run_name}/report")}
        assert files == {f"memex/step-{r['step']}/{run_name}/report/index.html"}
    ledger = Ledger(str(tmp_path / "runs" / "_nightly")).read().to_pylist()
    assert sorted((r["step"], r["outcome"]) for r in ledger) == [(1000, "error"), (1000, "ok"), (2000, "error"),
                                                                 (2000, "ok")]


@pytest.mark.slow
def test_audit_logs_to_tensorboard_then_wandb_and_a_failing_tracker_fails_the_command(tmp_path, wandb_home):
    """`memex audit` of the demo model at tracker.step=5000: TensorBoard scalars; the same audit again
    with tracker=wandb resumes its run folder and logs it there too; from the command line a tracker
    that fails exits 1 naming it, and the run folder keeps the results."""
    from memex.layout import RunLayout
    from memex.stages import audit

    common = [f"storage.root={tmp_path / 'runs'}", "resources.executor=local", *SMALL,
              "tracker.step=5000"]
    s = audit.run(compose([*common, "tracker=tensorboard", f"tracker.log_dir={tmp_path / 'tb'}"], config_name="audit"))
    assert "tensorboard" in s["tracker"] and "tracker: tensorboard" in audit.format_summary(s)
    acc = _events(tmp_path / "tb")
    assert [(e.step, e.value) for e in acc.Scalars("memex/extracted_images")] == [
        (5000, float(s["extracted_unique_train_images"]))]
    assert [(e.step, e.value) for e in acc.Scalars("memex/unet_evaluations")] == [(5000, float(s["unet_evaluations"]))]

    w = audit.run(compose([*common, "tracker=wandb", f"tracker.dir={tmp_path / 'wb'}"], config_name="audit"))
    assert w["run"] == s["run"] and w["extracted_unique_train_images"] == s["extracted_unique_train_images"]
    (run_dir,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    (h,) = _history(_wandb_records(run_dir))
    assert h["memex/step"] == 5000 and h["memex/extracted_images"] == s["extracted_unique_train_images"]
    assert (run_dir / "files" / "memex" / "step-5000" / Path(s["run"]).name / "report" / "index.html").is_file()

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_FILE_STORE"}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    out = subprocess.run([str(BIN / "memex"), "audit", *common, "tracker=mlflow",
                          f"tracker.tracking_uri={(tmp_path / 'mlruns').as_uri()}"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "memex: error: tracker=mlflow could not log the audit" in out.stderr and "Traceback" not in out.stderr
    assert RunLayout.at(s["run"]).read_summary()["extracted_unique_train_images"] == s["extracted_unique_train_images"]
