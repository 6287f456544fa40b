"""An audit's headline numbers in the experiment tracker of the training run (tracker=mlflow|tensorboard|wandb).

`memex audit` calls `log_audit` after the report is written; `memex nightly` audits each checkpoint
with tracker.step set to its training step, so the numbers line up with the training's loss curves:

  what                         mlflow                          tensorboard                 wandb
  metrics (METRICS, memex/*)   log_batch at step               add_scalar at global_step   log against memex/step
  settings (`params`, redact)  params memex.<key>              text memex/config           config["memex"]
  report folder, summary.json  artifacts memex/<label>/        text memex/report: its URI  run files memex/<label>/
                                                               (TensorBoard has no
                                                               artifact store)
  which run                    tracker.run_id (the training's  tracker.log_dir (the        offline: a new local run
                               run), else the run named        training's log dir)         (id tracker.run_id, if
                               run_name in the experiment                                  set), `wandb sync` uploads
                               (its oldest, if several)

`memex nightly` (`at_checkpoint`) gives each series of results its own curve: a series is one training
run's checkpoints (its path under nightly.location) audited with one kind of weights, the raw UNet or,
with nightly.ema=true, its EMA copy (unet_ema/, a config hash of its own). Its name is the series' path,
plus "-ema" for the EMA weights: the mlflow or wandb run name (tracker.run_name, or tracker.run_id's run,
wins when set), and TensorBoard's run, the subfolder tracker.log_dir/<name>/ (the raw weights and the EMA
ones of one run, and two training runs, drew points at the same steps into one curve of tracker.log_dir).
Two nightlies that differ in another setting and log into one experiment (project, log dir) share a run:
give them their own tracker.experiment, tracker.project or tracker.log_dir.

The tracker packages are optional extras, imported here only, inside their kind's branch; `check`
(called before any audit work) names the extra to install. Every setting logged goes through
`memex.redact.redact`, and messages through `redact_text`. A tracker that fails raises
`TrackerError` carrying the summary: the audit's results are already written in the run folder.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator

from memex.config import AuditConfig, ConfigError, MemexError, TrackerConfig, TrackerKind, WandbMode, plain
from memex.redact import redact, redact_text

log = logging.getLogger("memex.tracking")

# metric name -> how to read it from <run>/summary.json (memex/stages/match.py `summarize`); a key an
# older summary lacks, or a None (no extracted image: no evaluations per image), is not logged
METRICS: dict[str, Any] = {
    "extracted_images": lambda s: s.get("extracted_unique_train_images"),  # the headline: extracted pictures
    "extracted_generations": lambda s: s.get("extracted_generations"),
    "prompts_flagged": lambda s: s.get("prompts_flagged"),
    "unet_evaluations": lambda s: s.get("unet_evaluations"),
    "unet_evaluations_per_extracted_image": lambda s: s.get("unet_evaluations_per_extracted_image"),
    "unet_evaluations_triage": lambda s: s.get("unet_evaluations_triage"),
    "samples": lambda s: s.get("samples"),
    "prompts": lambda s: s.get("prompts"),
    "prompts_sampled": lambda s: s.get("prompts_sampled"),
    "candidates_verified": lambda s: s.get("candidates_verified"),
    # what recall depends on: prompts whose clique search ran out of budget, pictures within the
    # threshold but not counted (low complexity, too few copies), training images never indexed
    "prompts_undecided": lambda s: s.get("prompts_undecided"),
    "uncounted_pictures": lambda s: len(s["uncounted_pictures"]) if "uncounted_pictures" in s else None,
    "uncounted_low_complexity_pictures": lambda s: (sum(bool(p.get("low_complexity")) for p in s["uncounted_pictures"])
                                                    if "uncounted_pictures" in s else None),
    "train_images_indexed": lambda s: (s.get("index") or {}).get("indexed"),
    "train_images_quarantined": lambda s: (s.get("index") or {}).get("quarantined"),
}
PREFIX = "memex/"
# settings that change per checkpoint or say where things go: not params (an MLflow param cannot change
# once logged, and nightly logs every checkpoint of a training run into one run); summary.json has them all
NOT_PARAMS = ("run", "storage", "resources", "nightly", "tracker")
# per checkpoint in memex nightly (text_encoder: a DreamBooth --train_text_encoder checkpoint's own), so not a
# param of the training run the nightly logs to (MLflow refuses a param's second value)
NOT_PARAMS_MODEL = ("name", "path", "unet", "lora", "allow_pickle", "revision", "text_encoder")
EXTRA = {TrackerKind.mlflow: "mlflow", TrackerKind.tensorboard: "tensorboard", TrackerKind.wandb: "wandb"}
FIX = {
    TrackerKind.mlflow: "check tracker.tracking_uri (or $MLFLOW_TRACKING_URI), tracker.experiment and tracker.run_id",
    TrackerKind.tensorboard: "check that tracker.log_dir is a folder this machine can write",
    TrackerKind.wandb: "check tracker.dir (writable), tracker.project and tracker.run_id; tracker.mode=online needs "
                       "WANDB_API_KEY and the network",
}


class TrackerError(MemexError, RuntimeError):
    """The audit finished and wrote its results, but the tracker could not log them."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary


def metrics(summary: dict) -> dict[str, float]:
    """memex/<name> -> value of every headline number the summary has."""
    out = {}
    for name, read in METRICS.items():
        v = read(summary)
        if v is not None:
            out[PREFIX + name] = float(v)
    return out


def _flatten(obj: Any, prefix: str, out: dict[str, str]) -> dict[str, str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = obj if isinstance(obj, str) else json.dumps(obj)
    return out


def params(cfg: AuditConfig) -> dict[str, str]:
    """The settings that decide the audit's result, flattened (`sampling.seed` -> "0"), credentials
    masked (memex/redact.py): the same for every checkpoint audited with one config."""
    c = redact(plain(cfg))
    for k in NOT_PARAMS:
        c.pop(k, None)
    for k in NOT_PARAMS_MODEL:
        c.get("model", {}).pop(k, None)
    return _flatten(c, "", {})


def at_checkpoint(t: TrackerConfig, step: int | None, series: str, name: str | None = None,
                  weights: str | None = None) -> TrackerConfig:
    """memex nightly: tracker.step is the checkpoint's training step, and the series' results are a run of
    their own: named after the training run (`name`, else its series folder's name), plus "-<weights>" for
    weights other than the raw UNet's (`weights`: "ema" under nightly.ema=true). An mlflow or wandb run goes
    by that name unless tracker.run_name (or tracker.run_id) says otherwise; TensorBoard's run is the
    subfolder tracker.log_dir/<name>/ (TensorBoard lists each folder of event files as a run)."""
    if t.kind == TrackerKind.none:
        return t
    name = name or posixpath.basename(series.rstrip("/"))
    if weights:
        name = f"{name}-{weights}"
    if t.kind == TrackerKind.tensorboard:
        return replace(t, step=step, log_dir=posixpath.join(t.log_dir.rstrip("/"), name) if t.log_dir else t.log_dir)
    return replace(t, step=step, run_name=t.run_name or name)


def check(t: TrackerConfig) -> None:
    """The tracker's package is installed: before any audit work, naming the pip extra. Raises ConfigError."""
    if t.kind == TrackerKind.none:
        return
    try:
        if t.kind == TrackerKind.mlflow:
            import mlflow  # noqa: F401
        elif t.kind == TrackerKind.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - needs the tensorboard package
        elif t.kind == TrackerKind.wandb:
            import wandb  # noqa: F401
    except ImportError as e:
        raise ConfigError(_missing(t.kind, e)) from e
    # under `ray job submit --working-dir`: a default location is Ray's copy of the working dir, deleted after the job
    from memex.storage import RAY_JOB_CONFIG, in_job_working_dir

    job, here = os.environ.get(RAY_JOB_CONFIG), os.getcwd()
    where = {TrackerKind.mlflow: ("tracker.tracking_uri", t.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                                  or "mlflow.db"),
             TrackerKind.tensorboard: ("tracker.log_dir", t.log_dir),
             TrackerKind.wandb: ("tracker.dir", t.dir or os.environ.get("WANDB_DIR"))}[t.kind]
    path = where[1]
    if t.kind == TrackerKind.mlflow and path.startswith("sqlite:///"):
        path = path[len("sqlite:///"):]  # sqlite:///mlflow.db is relative; sqlite:////abs/mlflow.db absolute
    elif t.kind == TrackerKind.mlflow and ("://" in path or path.split(":", 1)[0] in ("databricks", "uc")):
        return  # a tracking server, object storage, Databricks
    if t.kind == TrackerKind.wandb and t.mode == WandbMode.online:
        _check_wandb_key()  # (it failed only once the audit was done: nightly, an error row a checkpoint)
        return  # its local folder only stages what it uploads as it goes
    why = in_job_working_dir(path, where[0], job, here) if path or t.kind == TrackerKind.wandb else None
    if why:
        raise ConfigError(why)


def _check_wandb_key() -> None:
    """tracker.mode=online: wandb finds an API key for its host, by its own lookup and without the network
    (WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE, the host's entry in the netrc file, wandb's settings);
    raises ConfigError naming the ways to give one. A wandb without that lookup is left to say it itself."""
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth  # what wandb.init's login asks (wandb 0.31)
    except ImportError:
        return
    host = wandb_setup.singleton().settings.base_url
    try:
        auth = wbauth.authenticate_session(host=host, source="memex", prompt=False, update_session=False)
    except Exception as e:  # noqa: BLE001 - AuthenticationError: a key of the wrong form (it is not echoed)
        raise ConfigError(redact_text(f"tracker=wandb with tracker.mode=online: wandb refuses its API key for "
                                      f"{host} ({type(e).__name__}: {e}); set a valid WANDB_API_KEY or run "
                                      "`wandb login --relogin`, or set tracker.mode=offline")) from e
    if auth is None:
        raise ConfigError(redact_text(
            f"tracker=wandb with tracker.mode=online needs a W&B API key, and wandb finds none for {host} "
            "(no WANDB_API_KEY, no netrc entry for its host): set WANDB_API_KEY, or run `wandb login` on this "
            "machine, or set tracker.mode=offline (`wandb sync` uploads the run later)"))


def check_run(t: TrackerConfig) -> None:
    """tracker.run_id names a run of the tracking store (mlflow; one request), before any audit work: a typo, or
    a store that does not answer, failed only once the audit was done (memex nightly: an error row for every
    checkpoint, every night until fixed). wandb makes a run of any id: nothing to check."""
    if t.kind != TrackerKind.mlflow or not t.run_id:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=t.tracking_uri)
    # one quick try: MLflow's own retries (7, backoff factor 2) held a dead server's check for ~4 min; the
    # logging after the audit keeps them (a user's MLFLOW_HTTP_REQUEST_* settings win either way)
    quick = {k: v for k, v in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"))
             if k not in os.environ}
    os.environ.update(quick)
    try:
        client.get_run(t.run_id)
    except Exception as e:  # noqa: BLE001 - MlflowException (no such run), a connection error: named, with the fix
        why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        missing = isinstance(e, MlflowException) and e.error_code in ("RESOURCE_DOES_NOT_EXIST",
                                                                       "INVALID_PARAMETER_VALUE")
        raise ConfigError(redact_text(
            f"tracker.run_id={t.run_id} is not a run of {client.tracking_uri} ({why}): give the training run's id "
            "(tracker.tracking_uri its store), or leave tracker.run_id unset to log into a run named tracker.run_name"
            if missing else f"tracker=mlflow: cannot read run {t.run_id} from {client.tracking_uri} ({why}): check "
            "tracker.tracking_uri and the store's credentials, or set tracker=none")) from e
    finally:
        for k in quick:
            os.environ.pop(k, None)


def _missing(kind: TrackerKind, e: Exception) -> str:
    return (f"tracker={kind.value} needs its package: pip install 'memex[{EXTRA[kind]}]' "
            f"({type(e).__name__}: {e}); or set tracker=none")


@contextmanager
def _local_report(report_uri: str, storage_options: dict) -> Iterator[str | None]:
    """The report folder on local disk (copied from object storage into a temporary folder); None
    when the run has no report."""
    import fsspec

    folder = posixpath.dirname(report_uri)
    fs, path = fsspec.core.url_to_fs(folder, **storage_options)
    if not fs.exists(path):
        yield None
        return
    if "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="memex-report-") as tmp:
        fs.get(path.rstrip("/") + "/", tmp + "/report/", recursive=True)
        yield os.path.join(tmp, "report")


def log_audit(cfg: AuditConfig, summary: dict, report_uri: str | None, run_name: str) -> str | None:
    """Log the audit's headline numbers, settings and report to cfg.tracker at tracker.step; returns
    where they went (one line, also put in summary["tracker"]), None for tracker=none. Raises
    TrackerError (carrying `summary`) when the tracker fails; the run folder is complete by then."""
    t = cfg.tracker
    if t.kind == TrackerKind.none:
        return None
    step = t.step if t.step is not None else 0
    label = posixpath.join(f"step-{t.step}" if t.step is not None else "", run_name)
    name = t.run_name or run_name
    values, settings = metrics(summary), params(cfg)
    try:
        check(t)
        with _local_report(report_uri, cfg.storage.options) if report_uri else _none() as report_dir:
            if t.kind == TrackerKind.mlflow:
                where = _mlflow(t, values, settings, summary, report_dir, report_uri, step, label, name)
            elif t.kind == TrackerKind.tensorboard:
                where = _tensorboard(t, values, settings, summary, report_uri, step)
            elif t.kind == TrackerKind.wandb:
                where = _wandb(t, values, settings, summary, report_dir, report_uri, t.step, label, name)
            else:  # pragma: no cover - the enum has no other member
                raise ConfigError(f"tracker.kind={t.kind!r} is not a tracker")
    except Exception as e:  # noqa: BLE001 - any failure of the tracker: the audit's results are written
        what = f"{type(e).__name__}: {e}" if not isinstance(e, ConfigError) else str(e)
        done = f"report {report_uri}" if report_uri else f"run folder {summary.get('run')}"
        raise TrackerError(redact_text(
            f"tracker={t.kind.value} could not log the audit ({what}); {FIX[t.kind]}. The audit itself finished "
            f"and its results are written ({done}): run the same command again to log them (nothing is "
            "recomputed)"), summary) from e
    where = redact_text(where)
    summary["tracker"] = where
    log.info("tracker=%s: %d numbers at step %d -> %s", t.kind.value, len(values), step, where)
    return where


@contextmanager
def _none() -> Iterator[None]:
    yield None


def _report_text(summary: dict, report_uri: str | None, step: int | None) -> str:
    """Markdown: what the audit found and where its report is."""
    model = (summary.get("model") or {}).get("name", "?")
    at = f" at step {step}" if step is not None else ""
    lines = [f"**memex audit** of {model}{at}: {summary.get('extracted_unique_train_images', '?')} training images "
             f"extracted, {summary.get('prompts_flagged', '?')} prompts flagged, "
             f"{summary.get('unet_evaluations', '?')} UNet evaluations.", ""]
    if report_uri:
        lines.append(f"Report: `{report_uri}`")
    lines.append(f"Run folder: `{summary.get('run', '?')}`")
    return redact_text("\n".join(lines))


# ---- mlflow ---------------------------------------------------------------------------------------
def _mlflow(t: TrackerConfig, values: dict, settings: dict, summary: dict, report_dir: str | None,
            report_uri: str | None, step: int, label: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=t.tracking_uri)  # None: $MLFLOW_TRACKING_URI, else MLflow's default
    created = False
    if t.run_id:
        run = client.get_run(t.run_id)  # the training's run: logged into, its status left as it is
    else:
        run, created = _mlflow_run_by_name(client, _mlflow_experiment(client, t.experiment), name)
    rid = run.info.run_id
    # a run memex made (by run name): ended by each audit that logs into it, FAILED when that audit could not
    # (it stayed RUNNING for good); the training's own run (tracker.run_id) keeps the status it has
    ours = created or run.data.tags.get("memex.created_by") == "memex"
    try:
        _mlflow_log(client, run, values, settings, summary, report_dir, report_uri, step, label)
    except BaseException:
        if ours:
            try:
                client.set_terminated(rid, status="FAILED")
            except Exception as e:  # noqa: BLE001 - the logging's own error is the one raised
                log.warning("tracker=mlflow: run %s could not be marked FAILED either: %s", rid, redact_text(str(e)))
        raise
    if ours:
        client.set_terminated(rid)
    artifacts = posixpath.join("memex", label)
    return f"mlflow run {rid} (experiment {run.info.experiment_id}, artifacts {artifacts}/) at {client.tracking_uri}"


# how long a run memex finds or creates by name must have existed before an audit logs into it: the window in
# which another job's run of the same name, created at the same moment, can still land (memex/lease.py's settle_s)
MLFLOW_SETTLE_S = 1.0


def _mlflow_run_by_name(client, exp: str, name: str):
    """The run named `name` in experiment `exp`, created when there is none; returns (run, created by this call).

    MLflow has no "create if absent": plan mode's jobs of a new series (one per checkpoint, side by side) each
    found no run and each created one, and the series' curve was split between them. So every job takes the
    same one: the OLDEST active run of the name, by start_time, then run_id (a total order every job computes
    alike). A run younger than MLFLOW_SETTLE_S is not taken at once, whether this job created it or found it:
    the job waits until it is that old and searches again, so the runs its rivals created meanwhile are seen and
    all of them pick the same oldest. A job whose own run lost deletes it, if nothing was logged into it, and
    logs into the winner. A lease around the create (memex/lease.py) would need the lock on memex's storage,
    which the tracking server is not. Holds while the jobs' clocks (start_time is the client's) agree within
    MLFLOW_SETTLE_S, as the lease's do, and no job stalls longer than that between its search and its create.
    Runs of one name left by memex before this (or made by hand) are not merged: the oldest gets the points."""
    quoted = f'"{name}"' if "'" in name else f"'{name}'"

    def oldest():
        found = client.search_runs([exp], filter_string=f"attributes.run_name = {quoted}", max_results=100,
                                   order_by=["attributes.start_time ASC"])
        return min(found, key=lambda r: (r.info.start_time or 0, r.info.run_id), default=None)

    run = oldest()
    mine = None
    if run is None:
        mine = run = client.create_run(exp, run_name=name, tags={"memex.created_by": "memex"})
    age_s = time.time() - (run.info.start_time or 0) / 1000
    if age_s < MLFLOW_SETTLE_S:
        time.sleep(min(MLFLOW_SETTLE_S - max(age_s, 0.0), MLFLOW_SETTLE_S))
        run = oldest() or run  # (a store that does not list a run it just made yet: this job's own)
    if mine is None or run.info.run_id == mine.info.run_id:
        return run, mine is not None
    # another job's run of this name is older: it is the series' run, and this job's own goes
    try:
        data = client.get_run(mine.info.run_id).data
        if data.metrics or data.params:  # a job logged into it (clocks further apart than the settle time)
            log.warning("tracker=mlflow: run %s (%s) has numbers logged; kept beside the older run %s of that name",
                        mine.info.run_id, redact_text(name), run.info.run_id)
        else:
            client.delete_run(mine.info.run_id)
    except Exception as e:  # noqa: BLE001 - an empty run left behind is harmless; logging goes on into the winner
        log.warning("tracker=mlflow: empty run %s of %s could not be deleted: %s", mine.info.run_id,
                    redact_text(name), redact_text(str(e)))
    return run, False


def _mlflow_log(client, run, values: dict, settings: dict, summary: dict, report_dir: str | None,
                report_uri: str | None, step: int, label: str) -> None:
    """The metrics at `step`, the settings as params (the run's first values kept), tags, the report."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    rid = run.info.run_id
    now = int(time.time() * 1000)
    have = run.data.params
    changed = sorted(k for k, v in settings.items() if "memex." + k in have and have["memex." + k] != v[:500])
    if changed:  # an MLflow param cannot change: the run keeps its first values; summary.json has this audit's
        log.warning("tracker=mlflow: run %s already has other values for %s; kept (this audit's settings are in its "
                    "summary.json artifact)", rid, ", ".join("memex." + k for k in changed[:5]))
    tags = [RunTag("memex.run_folder", str(summary.get("run", ""))), RunTag("memex.step", str(step))]
    if report_uri:
        tags.append(RunTag("memex.report", report_uri))
    client.log_batch(rid, metrics=[Metric(k, v, now, step) for k, v in values.items()], tags=tags)
    # the params apart, after the metrics: the jobs of a new series that converge on one run
    # (`_mlflow_run_by_name`) each find it without params and log them at the same moment, and the store refuses
    # the second insert of a key (a database's unique key: an IntegrityError); this job then reads the run's params
    # again and logs only the keys still missing (a key logged meanwhile with another value is kept, as above)
    for retry in (False, True):
        new = [Param("memex." + k, v[:500]) for k, v in sorted(settings.items()) if "memex." + k not in have]
        try:
            for i in range(0, len(new), 100):  # log_batch takes 100 params at a time
                client.log_batch(rid, params=new[i:i + 100])
            break
        except MlflowException:
            if retry:
                raise
            have = client.get_run(rid).data.params
    artifacts = posixpath.join("memex", label)
    if report_dir is not None:
        client.log_artifacts(rid, report_dir, artifact_path=posixpath.join(artifacts, "report"))
    client.log_dict(rid, summary, posixpath.join(artifacts, "summary.json"))


def _mlflow_experiment(client, name: str | None) -> str:
    """tracker.experiment's id (created when new); None: $MLFLOW_EXPERIMENT_ID / _NAME, else Default."""
    from mlflow.exceptions import MlflowException

    if name is None:
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if not name:
            return client.get_experiment_by_name("Default").experiment_id
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # another audit created it meanwhile
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise ConfigError(f"tracker.experiment={name} is deleted in MLflow: restore it or name another")
    return exp.experiment_id


# ---- tensorboard ----------------------------------------------------------------------------------
def _tensorboard(t: TrackerConfig, values: dict, settings: dict, summary: dict, report_uri: str | None,
                 step: int) -> str:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=t.log_dir)  # a new event file beside the training's: TensorBoard reads them all
    try:
        for k, v in values.items():
            w.add_scalar(k, v, global_step=step)
        text = _report_text(summary, report_uri, t.step)
        w.add_text(PREFIX + "report", text + "\n\n(TensorBoard has no artifact store: the report stays in the "
                   "memex run folder.)", global_step=step)
        w.add_text(PREFIX + "config", "| setting | value |\n|---|---|\n" + "\n".join(
            f"| {k} | {v.replace('|', '/')} |" for k, v in sorted(settings.items())), global_step=step)
        w.flush()
    finally:
        w.close()
    return f"tensorboard {w.get_logdir()} (step {step})"


# ---- wandb ----------------------------------------------------------------------------------------
def _wandb(t: TrackerConfig, values: dict, settings: dict, summary: dict, report_dir: str | None,
           report_uri: str | None, step: int | None, label: str, name: str) -> str:
    import wandb

    online = t.mode == WandbMode.online
    if t.dir:
        os.makedirs(t.dir, exist_ok=True)
    run = wandb.init(project=t.project or os.environ.get("WANDB_PROJECT") or "memex", entity=t.entity, id=t.run_id,
                     name=name, dir=t.dir, mode=t.mode.value, job_type="memex-audit",
                     resume="allow" if online and t.run_id else None,  # offline runs cannot resume (wandb)
                     config={"memex": settings}, allow_val_change=True,
                     # x_disable_meta: wandb records sys.argv as the run's metadata, unredacted (a webhook's secret,
                     # a URL's user:password@): the run's config above is memex's, redacted (memex/redact.py)
                     settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, save_code=False,
                                             x_disable_meta=True))
    try:
        run.define_metric(PREFIX + "step")
        run.define_metric(PREFIX + "*", step_metric=PREFIX + "step")  # beside the training's own step, not _step
        run.log({**values, **({PREFIX + "step": step} if step is not None else {})})
        files = os.path.join(run.dir, "memex", *label.split("/"))
        if report_dir is not None:
            shutil.copytree(report_dir, os.path.join(files, "report"), dirs_exist_ok=True)
        os.makedirs(files, exist_ok=True)
        with open(os.path.join(files, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
        run.save(os.path.join(files, "**", "*"), base_path=run.dir, policy="now")
        run.summary[PREFIX + "report"] = report_uri or ""
        where = f"wandb run {run.id} ({t.mode.value}) in {os.path.dirname(run.dir)}"
    finally:
        run.finish()
        wandb.teardown()  # waits for wandb's service process: the offline run's files are complete when this returns
    return where + (": upload with `wandb sync` of that folder" if not online else "")
