"""`memex nightly`: audit every new checkpoint once, keep the ledger, gate, announce.

  1. check inputs (config, the checkpoint location, the ledger's storage);
  2. list checkpoints (memex/checkpoints.py) and hash their weights; a checkpoint is pending when
     the ledger has no finished row with its weights hash and this config's hash, and no other checkpoint
     of its series holds its model (a final model saved with its last checkpoint's weights: once_per_model);
  3. audit each pending one (memex/stages/audit.py) in a run folder named by checkpoint, weights
     and config, so a night that crashes part-way resumes the same folders the next time;
  4. gate: over_budget when it extracts more unique training images than nightly.budget, grew
     when it extracts more than nightly.growth_margin over the previous step of its series;
  5. append its ledger row (memex/ledger.py), then rebuild the trend page;
  6. POST the night's result to nightly.webhook, if set.
An alarm row is paged once: by the job that wrote it, or, when that job ended before its ALARM line, by a
later night; nights overlap, so a job claims each alarm row it pages (Ledger.claim) while it holds its job
lease, and a row a live job claims is left to that job (`earlier_alarms`).
An audit that raises is recorded with outcome "error" (retried next night) and the others go on; so
is one whose tracker (tracker=mlflow|tensorboard|wandb, at the checkpoint's step) failed, its numbers kept.
`nightly.action=plan` stops after 2 and returns one deterministic `ray job submit` id per pending
checkpoint: memex-<checkpoint name>-<weights hash>-<config hash>-<night>.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import hashlib
import http.client
import json
import logging
import os
import posixpath
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import fsspec

from memex import runner
from memex.checkpoints import (
    MAX_DEPTH,
    Checkpoint,
    CheckpointError,
    discover,
    files_signature,
    is_final,
    loaded_model_sha256,
    weights_sha256,
    written_at,
)
from memex.config import (
    ConfigError,
    MemexError,
    NightlyAction,
    NightlyAuditConfig,
    NightlyConfig,
    check_actor_devices,
    drop_unset_added,
    identity_text,
    plain,
    validate_nightly,
)
from memex.layout import RunLayout
from memex.ledger import ALARMS, DONE, Ledger
from memex.redact import redact, redact_text, redact_url
from memex.storage import RAY_JOB_CONFIG, Store, in_job_working_dir
from memex.tracking import TrackerError, at_checkpoint
from memex.tracking import check as check_tracker
from memex.tracking import check_run as check_tracker_run

log = logging.getLogger("memex.nightly")
# Settings that do not change an audit's result, left out of the config hash: which checkpoint
# (it has its own hash), where things are written, how many machines, and the nightly gates.
NOT_IN_CONFIG_HASH = ("run", "storage", "resources", "nightly", "tracker")  # tracker: where the numbers are logged
# model.unet, .lora and .text_encoder: each checkpoint's (discovery sets them); allow_pickle: whether it loads
NOT_IN_CONFIG_HASH_MODEL = ("name", "path", "unet", "lora", "text_encoder", "allow_pickle")
# index.root, *.prompts_per_task and sampling.png_compress_level decide no count, yet stay in: a run folder
# (named by this hash) claims them (the stages' units of resume, run.json; index.root was in the index key
# before 2026-12-07, and ledgers hold hashes made with it), so a checkpoint retried into its folder under an
# unchanged hash would be refused every night.


class NightlyError(MemexError, RuntimeError):
    """The nightly run could not record or announce its result."""


@dataclass
class Pending:
    ckpt: Checkpoint
    weights: str  # sha256 of the weights (memex/checkpoints.py)
    signature: str  # of the weight files' names, sizes and mtimes
    series_name: str | None = None  # the tracker's run name for its series (series_names)
    # the tracker's step: the checkpoint's, and for a final model (step None: a pipeline saved at the end
    # of training) its series' last checkpoint step, the least it trained; None when it has none
    tracker_step: int | None = None
    # its series' checkpoints found by the plan, by location as ledger rows hold it (redacted): _previous asks when
    # an earlier step's checkpoint was written, to tell this training run's row from an earlier run's
    series_checkpoints: dict[str, Checkpoint] = field(default_factory=dict, repr=False, compare=False)

    def run_name(self, config_sha: str) -> str:
        return f"{self.ckpt.name}-{self.weights[:8]}-{config_sha[:8]}"

    def submission_id(self, config_sha: str, night: str) -> str:
        """The `ray job submit --submission-id` of this audit on `night` (YYYY-MM-DD).

        Ray refuses a second job with the same id, so the audit is submitted once a night however
        often cron fires; the night is in it so that a job that died is submitted again the next
        night (its ledger row is missing) instead of being refused forever."""
        return f"memex-{self.run_name(config_sha)}-{night.replace('-', '')}"


@dataclass
class NightlyResult:
    config_sha256: str
    checkpoints: int  # found under nightly.location
    pending: list[Pending]
    rows: list[dict] = field(default_factory=list)  # ledger rows written by this run
    # pending checkpoints not audited by this run, and why: audited by another job since it began,
    # being audited by one now (its run folder's lease), or deleted (a trainer's rotation)
    skipped: list[dict] = field(default_factory=list)
    trend: str | None = None  # URI of the trend page
    ledger: str | None = None
    # alarm rows of earlier nights that ended before announcing them (memex/ledger.py "alarms announced")
    earlier_alarms: list[dict] = field(default_factory=list)

    # (weights, config) of this night's alarm rows an earlier night announced already (Ledger.announced), or
    # that another job, alive now, claimed first (Ledger.claimed_by_other): that job pages them
    announced: set[tuple[str, str]] = field(default_factory=set)
    # this job's id in the ledger's alarm claims, and its lease (memex/ledger.py "who pages an alarm row"):
    # taken at its first claim, given back once its alarms are marked announced (or it has none)
    job: str = field(default_factory=lambda: uuid.uuid4().hex)
    job_lease: Any = field(default=None, repr=False, compare=False)

    @property
    def alarms(self) -> list[dict]:
        return [r for r in self.rows if (r["outcome"] in ALARMS or r.get("gate_alarm"))
                and (r.get("weights_sha256"), r.get("config_sha256")) not in self.announced] + self.earlier_alarms

    @property
    def errors(self) -> list[dict]:
        return [r for r in self.rows if r["outcome"] == "error"]

    @property
    def status(self) -> str:
        """The webhook's status, as the exit code ranks them (memex/cli.py): an alarm exits 3 over failed audits."""
        return "alarm" if self.alarms else "error" if self.errors else "ok"


def config_sha256(cfg: NightlyAuditConfig) -> str:
    """Hash of every setting that decides an audit's result (sampling, prompts, filter, trainset,
    embedder, index, match, model kind and revision)."""
    c = redact(plain(cfg))  # a credential (a URL's user:password@) never changes a result: memex/redact.py
    for k in NOT_IN_CONFIG_HASH:
        c.pop(k, None)
    for k in NOT_IN_CONFIG_HASH_MODEL:
        c["model"].pop(k, None)
    drop_unset_added(c)  # keys added after ledgers existed (model.lora, index.train_size): count only when set
    if cfg.nightly.ema:  # EMA weights are another series of results: gated against the raw UNet's rows they
        c["nightly_ema"] = True  # read as growth or its absence (only when on: ledgers of before keep their hash)
    # ${memex_home:} paths (the demo's trainset) are written back as the variable: the checkout on
    # a laptop and its copy in a Ray job's working_dir must give the same hash
    text = identity_text(c)
    return hashlib.sha256(text.encode()).hexdigest()


def night_of(cfg: NightlyAuditConfig) -> str:
    return cfg.nightly.night or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")


def ledger_root(cfg: NightlyAuditConfig) -> str:
    return cfg.nightly.ledger or posixpath.join(cfg.storage.root.rstrip("/"), "_nightly")


def rotated(only: str, location: str) -> bool:
    """Whether nightly.only names a path under nightly.location that is gone: a checkpoint the plan listed
    and the trainer deleted (checkpoints_total_limit) while its job waited in Ray's queue, which is skipped
    like one deleted during a whole night, not a failed job; a path elsewhere, or one that is there, is a
    wrong nightly.only (refused)."""
    a, b = posixpath.normpath(only), posixpath.normpath(location).rstrip("/")
    if not a.startswith(b + "/"):
        return False
    try:
        fs, path = fsspec.core.url_to_fs(only)
        return not fs.exists(path)
    except Exception:  # noqa: BLE001 - cannot tell: refused as a wrong nightly.only, naming it
        return False


def plan(cfg: NightlyAuditConfig) -> NightlyResult:
    """Steps 1-2: the checkpoints under nightly.location not yet audited with this config."""
    validate_nightly(cfg)
    n = cfg.nightly
    found = discover(n.location, n.base_model, n.settle_minutes * 60, n.ema)
    names = series_names({c.series for c in found}, n.location)  # before nightly.only: the same in every job
    last: dict[str, int] = {}  # series -> its last checkpoint step (a final model is logged there), before .only too
    by_series: dict[str, dict[str, Checkpoint]] = {}  # series -> location -> checkpoint, before .only too
    for c in found:
        if c.step is not None:
            last[c.series] = max(last.get(c.series, c.step), c.step)
        by_series.setdefault(c.series, {})[redact(c.location)] = c  # as its ledger rows hold it
    if n.only is not None:
        # the plan prints locations redacted (memex/redact.py), so nightly.only may be one
        found = [c for c in found if posixpath.normpath(c.location) == posixpath.normpath(n.only)
                 or posixpath.normpath(redact_text(c.location)) == posixpath.normpath(n.only)]
        if not found and rotated(n.only, n.location):  # planned, then deleted while its job queued
            return NightlyResult(config_sha256(cfg), 0, [], skipped=[{
                "location": redact_text(n.only), "reason": "deleted before its audit began"}])
        if not found:
            raise NightlyError(redact_text(f"nightly.only={n.only} is not a checkpoint under "
                                           f"nightly.location={n.location}"))
    sha = config_sha256(cfg)
    ledger = Ledger(ledger_root(cfg), cfg.storage.options)
    rows = ledger.read().to_pylist()
    done, known = ledger.audited(sha, rows), ledger.known_hashes(rows)
    pending, skipped = [], []
    for c in found:
        try:
            sig = files_signature(c)
            weights = known.get((redact_text(c.location), sig)) or weights_sha256(c)  # rows are redacted
        except FileNotFoundError as e:  # deleted since found (checkpoints_total_limit): nothing left to audit
            log.warning("%s: left out, %s", redact_text(c.location), e)
            continue
        except (CheckpointError, OSError) as e:
            # one checkpoint's files (a pipeline folder with no weights, a file this user cannot read) stopped
            # the plan, and with it every other checkpoint's audit, every night until someone fixed the folder
            log.warning("%s: skipped, %s", redact_text(c.location), e)
            skipped.append({"location": redact_text(c.location), "reason": redact_text(f"{type(e).__name__}: {e}")})
            continue
        if weights not in done:
            pending.append(Pending(c, weights, sig, names[c.series],
                                   c.step if c.step is not None else last.get(c.series), by_series[c.series]))
    pending = once_per_model(pending, last, cfg.model.variant)
    return NightlyResult(sha, len(found), pending, ledger=ledger.uri, skipped=skipped)


def once_per_model(pending: list[Pending], last: dict[str, int], variant: str | None = None) -> list[Pending]:
    """`pending` less the checkpoints that hold another candidate's model in their series: audited once, as the
    checkpoint-<step> one, whose step orders the gate. diffusers' scripts save checkpoint-<last step>/ and then
    the final pipeline (or pytorch_lora_weights.safetensors) with the same weights, and kohya's sd-scripts
    <name>-step<N>.safetensors and then <name>.safetensors: each was audited twice (two rows, the gate
    comparing a model with itself; plan mode ran both jobs at once). A final model is compared with its
    series' checkpoint at its own step, or at the last step when it has none (loaded_model_sha256); two others
    of one series by their weights hash. Its cost: a final model left out has no row to know its files by, so
    each night hashes it, and its checkpoint too where the ledger knew that one's hash (~5 s each for SD 1.5's
    ~4 GB, once a process). The series' candidates are the plan's before nightly.only: a job for the final
    model alone leaves it out too."""
    out: list[Pending] = []
    seen: dict[tuple[str, str], Checkpoint] = {}
    for p in pending:  # in discovery's order: a final model after its series' checkpoints
        c = p.ckpt
        twin = seen.get((c.series, p.weights)) or _twin(p, last.get(c.series), variant)
        if twin is not None:
            log.info("%s: left out, it holds the weights of %s (audited as that one, whose step orders the "
                     "gate)", redact_text(c.location), redact_text(twin.location))
            continue
        seen[(c.series, p.weights)] = c
        out.append(p)
    return out


def _twin(p: Pending, last_step: int | None, variant: str | None) -> Checkpoint | None:
    """The checkpoint of `p`'s series that holds the very model `p` does, where `p` is a final model (is_final)
    and the series has a checkpoint at its step (its last step when it has none), or None. Either unreadable
    (deleted since, a variant-only folder): None, and both are audited as before."""
    c = p.ckpt
    step = c.step if c.step is not None else last_step
    if not is_final(c) or step is None:
        return None
    for t in p.series_checkpoints.values():
        if t.step == step and not is_final(t):
            try:
                if (mine := loaded_model_sha256(c, variant)) is not None and mine == loaded_model_sha256(t, variant):
                    return t
            except (OSError, MemexError) as e:
                log.debug("%s: not compared with %s (%s)", redact_text(c.location), redact_text(t.location), e)
    return None


def series_names(series: set[str], location: str) -> dict[str, str]:
    """series folder -> the name its tracker run (mlflow, wandb) goes by: its path under nightly.location
    (sd15-ft/ for one directly under it; the location's own name for the location itself). By folder name
    alone, two series of one name (diffusers' default output_dir, sd-model-finetuned-lora, under two
    parents) logged into one run, each overwriting the other's metrics at the same steps. From the path
    alone, a series keeps its name whatever other series appear or go."""
    out = {}
    for s in series:
        rel = posixpath.relpath(s, location)
        out[s] = posixpath.basename(s.rstrip("/")) if rel.startswith("..") or rel == "." else rel
    return out


def _previous(rows: list[dict], series: str, step: int | None, sha: str,
              rewritten: Callable[[dict], bool] | None = None) -> dict | None:
    """The ledger's finished row of the same series and config with the largest step below `step`. A final
    model (step None: the pipeline or LoRA saved beside checkpoint-<step>/, the one that ships) comes after
    every checkpoint: it was gated against nothing, and a jump from its last checkpoint passed as ok.
    `rewritten(row)` (_rewritten): whether the checkpoint at that row's location now holds other weights than
    the row audited. Such a row audited an earlier training run's weights (training restarted into the same
    output_dir): it is passed over, as _next passes over an earlier run's later steps; it gated a new step,
    audited before its retried previous one, against the old run's."""
    earlier = sorted((r for r in rows if r["series"] == series and r["config_sha256"] == sha and r["outcome"] in DONE
                      and r["step"] is not None and (step is None or r["step"] < step)),
                     key=lambda r: (r["step"], r["finished"]), reverse=True)
    return next((r for r in earlier if rewritten is None or not rewritten(r)), None)


def _next(rows: list[dict], series: str, step: int | None, sha: str, written: float | None = None) -> dict | None:
    """The ledger's finished row of the same series and config with the smallest step above `step`, a final
    model's (step None) after every step: its job may finish first (plan mode), and the last checkpoints audited
    after it are gated against it here (they were compared with nothing after them, and a jump to the model that
    ships passed as ok). Only among the rows that finished after this checkpoint was written (`written`, epoch
    seconds): a later step audited first is one of this training run's; one that finished before this checkpoint
    existed is an earlier run's (training restarted into the same output_dir), and gated every new step against
    the old run's next one (a false "grew" each night). A final model has no next (step None: None)."""
    if step is None:
        return None
    later = [r for r in rows if r["series"] == series and r["config_sha256"] == sha and r["outcome"] in DONE
             and (r["step"] is None or r["step"] > step) and _finished_after(r, written)]
    return min(later, key=lambda r: (r["step"] is None, r["step"] or 0, r["finished"])) if later else None


def _finished_after(row: dict, written: float | None) -> bool:
    """Whether a ledger row finished after a checkpoint was written (epoch seconds; None: not known, counted as
    yes). The ledger keeps whole seconds (`finished` is cut to its second): a checkpoint written within the
    second its row finished counts as written before it, not as rewritten since."""
    return written is None or row["finished"] is None or _epoch(row["finished"]) + 1 > written


def _epoch(t) -> float:
    """A ledger time (a datetime, UTC; naive ones are UTC) as epoch seconds."""
    if isinstance(t, dt.datetime):
        return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()
    return float(t)


def _written_of(checkpoints: dict[str, Checkpoint]) -> Callable[[dict], float | None]:
    """row -> when the checkpoint at its location was last written (written_at), among the checkpoints the plan
    found; None for one not found or gone since (rotated away)."""
    def of(row: dict) -> float | None:
        c = checkpoints.get(row["location"])
        if c is None:
            return None
        try:
            return written_at(c)
        except (OSError, CheckpointError):
            return None
    return of


def _rewritten(checkpoints: dict[str, Checkpoint]) -> Callable[[dict], bool]:
    """row -> whether the checkpoint at its location, among those the plan found, holds other weights than the
    row audited: its files' signature (names, sizes, mtimes) differs from the row's and so does its weights hash.
    By the hash, not by the files' times: a copy that does not keep mtimes (cp -r, rsync without -t, a mirror
    synced again) or a base folder refreshed in place made every earlier row look rewritten, and each new step
    was compared with nothing (a missed "grew"). The hash is read only when the signature differs (rare: ~a
    minute for an SD UNet), and once a process (checkpoints._DIGESTS). One not found or gone since (rotated
    away), or unreadable: not known, and the row counts, as before."""
    def of(row: dict) -> bool:
        c = checkpoints.get(row["location"])
        if c is None:
            return False
        try:
            if row.get("files_signature") and files_signature(c) == row["files_signature"]:
                return False
            return weights_sha256(c) != row["weights_sha256"]
        except (OSError, CheckpointError):
            return False
    return of


def _paged_already(rows: list[dict], previous: dict | None, following: dict | None, sha: str, margin: int | None,
                   rewritten: Callable[[dict], bool] | None = None,
                   written_of: Callable[[dict], float | None] | None = None) -> bool:
    """Whether the growth from `previous` to `following`, the rows a step audited late falls between (a retried
    failure, plan mode's jobs finishing out of order), was paged already: it is over the margin, and whichever
    of the two finished second was gated against the other (as its previous step, or as its next one audited
    first), with nothing between them finished yet. Two rows finished in the same second: not known, so no."""
    if margin is None or previous is None or following is None \
            or following["extracted"] - previous["extracted"] <= margin \
            or previous["finished"] is None or following["finished"] is None \
            or _epoch(previous["finished"]) == _epoch(following["finished"]):
        return False
    first, second = sorted((previous, following), key=lambda r: _epoch(r["finished"]))
    before = [r for r in rows if r["finished"] is not None and _epoch(r["finished"]) < _epoch(second["finished"])]
    if second is following:
        seen = _previous(before, following["series"], following["step"], sha, rewritten)
    else:
        seen = _next(before, previous["series"], previous["step"], sha, written_of(previous) if written_of else None)
    return seen is first


def _named(row: dict) -> str:
    return "the final model" if row["step"] is None else f"step {row['step']}"


def gate(row: dict, previous: dict | None, budget: int | None, margin: int | None,
         following: dict | None = None, paged: bool = False) -> tuple[str, str]:
    """(outcome, message) of a finished audit's row. `following`: the next step's row where it finished
    first (nights' jobs run side by side, and a failed audit is retried the next night): its gate compared
    it with an earlier step, or with none, so the growth from this step to it is checked here.

    `paged` (_paged_already): the growth from `previous` to `following` was checked, over the margin, and paged
    when the later of the two finished. This step lies inside that jump, and each growth is paged once: the
    growth from this step to `following` is part of it (not checked), and the growth from `previous` to this
    step is paged only where this step peaks beyond `following` by more than the margin (and so beyond
    `previous` too): a level the page did not tell. Without it, step 2000 retried after 3000 paged the jump
    from 1000 that 3000 had paged the night before."""
    msgs, outcome = [], "ok"
    if budget is not None and row["extracted"] > budget:
        outcome = "over_budget"
        msgs.append(f"extracted {row['extracted']} training images, budget is {budget}")
    grew = margin is not None and previous is not None and row["extracted"] - previous["extracted"] > margin
    if paged:
        grew = grew and row["extracted"] - following["extracted"] > margin
    if grew:
        outcome = "grew" if outcome == "ok" else outcome
        peak = (f" and {row['extracted'] - following['extracted']} more than {_named(following)} "
                f"({following['extracted']}), audited before this one, whose growth over step {previous['step']} "
                "was paged then") if paged else ""
        msgs.append(f"extracted {row['extracted']} training images, {row['extracted'] - previous['extracted']} more "
                    f"than step {previous['step']} ({previous['extracted']}){peak}; growth margin is {margin}")
    if not paged and margin is not None and following is not None \
            and following["extracted"] - row["extracted"] > margin:
        outcome = "grew" if outcome == "ok" else outcome
        msgs.append(f"{_named(following)}, audited before this one, extracted {following['extracted']} "
                    f"training images, {following['extracted'] - row['extracted']} more than this step "
                    f"({row['extracted']}); growth margin is {margin}")
    return outcome, "; ".join(msgs)


def gone(c: Checkpoint) -> bool:
    """Whether a checkpoint's files are no longer there (checkpoints_total_limit deleted it)."""
    return not all(Path(p).exists() for p in (c.location, c.unet, c.lora, c.text_encoder) if p)


# the run folder and the row are named by the weights hashed at plan time (a whole-night job's last audit
# starts hours later): weights rewritten in place since (training restarted into the same output_dir; an
# SD checkpoint's files keep their sizes) were audited as the planned ones, under their hash
REWRITTEN = "rewritten since it was planned (audited under its new weights the next night)"


def rewritten(c: Checkpoint, p: "Pending") -> bool:
    """Whether the checkpoint's weight files changed (names, sizes, mtimes: a stat each) since the plan."""
    try:
        return files_signature(c) != p.signature
    except (OSError, CheckpointError):
        return False  # gone or unreadable: the audit's own error, or gone(), says so


def audit_one(cfg: NightlyAuditConfig, p: Pending, sha: str, ledger: Ledger,
              claim: Callable[[dict], None] | None = None) -> dict | str:
    """Steps 3-5 for one checkpoint; returns the ledger row it appended, or why it wrote none: a
    checkpoint deleted before or during its audit (no error to retry: it is gone), or one another
    job holds now (nights overlap: plan mode submits a job per checkpoint each night, and a job
    still queued or running from the night before takes it first). `claim`: called with an alarm
    row just before it is appended (run: this job claims it, so no other night pages it)."""
    from memex.lease import LeaseHeld, hold

    c = p.ckpt
    acfg = replace(cfg, model=replace(cfg.model, name=c.name, path=c.base, unet=c.unet, lora=c.lora,
                                      text_encoder=c.text_encoder),
                   run=replace(cfg.run, name=p.run_name(sha)),
                   # a run per series and kind of weights: raw and EMA audits of one training run are two curves
                   tracker=at_checkpoint(cfg.tracker, p.tracker_step, c.series, p.series_name,
                                         "ema" if cfg.nightly.ema else None))
    layout = RunLayout(cfg.storage.root, p.run_name(sha), cfg.storage.options)
    row = {"location": c.location, "series": c.series, "step": c.step, "base": c.base if c.unet else "",
           "weights_sha256": p.weights, "files_signature": p.signature, "config_sha256": sha, "run": layout.uri,
           "report": layout.store.uri_of(layout.report_path),
           "started": dt.datetime.now(dt.timezone.utc).replace(microsecond=0)}
    row = redact(row)  # no credential in the ledger, the payload or the printout: memex/redact.py
    if gone(c):
        return "deleted before its audit began"
    if rewritten(c, p):
        return REWRITTEN
    # The run folder's lease from the ledger check to the row's append (audit.run takes it again,
    # re-entrant): a job that found no row and took the lease the moment another job's audit released it
    # resumed the finished folder and appended a second row (alarms announced twice).
    try:
        with hold(layout.store, cfg.storage, f"run folder {layout.uri}"):
            if p.weights in ledger.audited(sha):
                return "audited by another job since"
            return _audit_and_record(cfg, acfg, c, p, row, sha, ledger, claim)
    except LeaseHeld as e:
        log.info("%s: another job audits it now: %s", row["location"], e)
        return "another job audits it now (its run folder's lease)"


def _audit_and_record(cfg: NightlyAuditConfig, acfg, c, p: Pending, row: dict, sha: str, ledger: Ledger,
                      claim: Callable[[dict], None] | None = None) -> dict:
    """`audit_one` under the run folder's lease (audit.run's own is re-entrant: it cannot be refused
    here): the audit, the gate and the ledger row."""
    from memex.stages import audit

    log.info("auditing %s (step %s, weights %s)", row["location"], c.step, p.weights[:12])
    tracker_error, rows = None, None
    try:
        try:
            s = audit.run(acfg, weights=False)  # the run folder's name holds the weights' hash
        except TrackerError as e:  # the audit finished and wrote its results; only the tracker failed
            if e.summary is None:
                raise
            s, tracker_error = e.summary, e
    except Exception as e:  # noqa: BLE001 - recorded in the ledger and reported by the exit status
        if gone(c):
            log.warning("audit of %s stopped: the checkpoint was deleted meanwhile (%s)", row["location"], e)
            runner.release_failed_pools()
            return "deleted while it was audited"
        log.exception("audit of %s failed", row["location"])
        row.update(samples=0, extracted=0, extracted_generations=0, flagged_prompts=0, outcome="error",
                   message=redact_text(f"{type(e).__name__}: {e}"))
    else:
        if rewritten(c, p):  # during the audit: its actors may have loaded either; no row, the next night redoes it
            log.warning("%s: its weights were rewritten while it was audited; no ledger row (run folder %s holds "
                        "an audit of unknown weights)", row["location"], row["run"])
            return REWRITTEN
        row.update(samples=s["samples"], extracted=s["extracted_unique_train_images"],
                   extracted_generations=s["extracted_generations"], flagged_prompts=s["prompts_flagged"])
        rows = ledger.read().to_pylist()  # (read once after the audit: the gate's neighbours, and the check below)
        row["outcome"], row["message"] = _gate_among(rows, row, c, p, sha, cfg.nightly)
        if tracker_error is not None:  # an error (retried next night: the audit resumes, the tracker is redone)
            log.error("audit of %s: %s", row["location"], tracker_error)
            gated = f"{row['outcome']}: {row['message']}" if row["message"] else row["outcome"]
            if row["outcome"] in ALARMS:
                # still this night's alarm (ALARM line, exit 3, the webhook's alarms): an error row alone hid it
                # for as long as the tracker failed. Not a ledger column: the row's message says it.
                row["gate_alarm"] = row["outcome"]
            row["outcome"], row["message"] = "error", redact_text(f"{tracker_error} (the gate said {gated})")
    if row["outcome"] == "error":
        runner.release_failed_pools()  # a failed audit's actors end before the next audit asks for GPUs
    row["finished"] = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    # read again before the append: a job that took the run folder's lease over while this one was alive
    # (its heartbeats stalled past resources.lease_timeout_s) audited it too, and its row is final
    if p.weights in ledger.audited(sha, rows):
        return "audited by another job since"
    if claim is not None and (row["outcome"] in ALARMS or row.get("gate_alarm")):
        claim(row)  # before the append: a night that reads the row finds it claimed by a live job
    ledger.append(row)
    return row


def _gate_among(rows: list[dict], row: dict, c: Checkpoint, p: Pending, sha: str,
                n: NightlyConfig) -> tuple[str, str]:
    """gate() of a finished audit's row against its series' neighbours among the ledger's `rows`."""
    try:
        written = written_at(c)
    # deleted since the audit: no later step is told from an earlier run's. CheckpointError too: a rotation that
    # is still deleting the folder leaves it without weight files (a traceback ended the night, and its row)
    except (OSError, CheckpointError):
        written = None
    rewritten = _rewritten(p.series_checkpoints)
    prev = _previous(rows, row["series"], c.step, sha, rewritten)
    nxt = _next(rows, row["series"], c.step, sha, written)
    paged = _paged_already(rows, prev, nxt, sha, n.growth_margin, rewritten, _written_of(p.series_checkpoints))
    return gate(row, prev, n.budget, n.growth_margin, nxt, paged)


def write_trend(cfg: NightlyAuditConfig, ledger: Ledger) -> str:
    """Rebuild <ledger root>/report/index.html from every ledger row; returns its URI."""
    from memex.report import render_trend

    page_dir = Store(ledger_root(cfg), cfg.storage.options).child("report")
    page = render_trend(ledger.read(), lambda r: trend_link(r["report"], page_dir.uri))
    page_dir.write_bytes(page_dir.join("index.html"), page.encode())
    return page_dir.uri_of(page_dir.join("index.html"))


def trend_link(report: str, page_dir: str) -> str:
    """A run's report as the trend page in `page_dir` links it: relative on the same storage, so a
    copied or synced folder (or a static website on the bucket) keeps working; absolute otherwise. An
    object store's first path part is its bucket, which ../ cannot leave on a bucket website: the
    ledger in bucket A and the runs in bucket B linked inside A."""
    def split(uri: str) -> tuple[str, str]:
        return tuple(uri.split("://", 1)) if "://" in uri else ("file", uri)

    (proto, path), (here_proto, here) = split(report), split(page_dir)
    same = proto == here_proto and (proto == "file" or path.split("/", 1)[0] == here.split("/", 1)[0])
    return posixpath.relpath(path, here) if same else report


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib follows a 301/302/303 answer to a POST with a GET without the body: the alarm never reached the
    receiver (an http -> https redirect, a moved hook) and the night read the GET's 200 as delivered."""

    def redirect_request(self, *args, **kwargs):
        return None  # the 3xx is raised as an HTTPError, named below


def post_webhook(url: str, payload: dict, timeout: float) -> None:
    req = urllib.request.Request(url, data=json.dumps(payload, default=str).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "memex-nightly"})
    try:
        with urllib.request.build_opener(_NoRedirect).open(req, timeout=timeout) as resp:
            if resp.status >= 300:
                raise NightlyError(f"nightly.webhook={redact_url(url, strict=True)} answered HTTP {resp.status}")
    except urllib.error.HTTPError as e:
        where = e.headers.get("Location") if e.headers else None
        moved = f" (a redirect to {redact_url(where, strict=True)}: give that URL as nightly.webhook)" \
            if 300 <= e.code < 400 and where else ""
        raise NightlyError(f"nightly.webhook={redact_url(url, strict=True)} answered HTTP {e.code}{moved}; the "
                           "ledger and reports are written, only the announcement failed") from e
    # http.client.HTTPException: a server that answers something other than HTTP (BadStatusLine), which is no
    # OSError and escaped as a traceback, exit 1, with no ALARM line on an alarm night
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        raise NightlyError(f"nightly.webhook={redact_url(url, strict=True)} could not be reached "
                           f"({redact_text(str(e))}); the ledger and reports are written, "
                           "only the announcement failed: check the URL") from e


def payload(res: NightlyResult) -> dict:
    return redact({"event": "memex.nightly", "status": res.status, "config_sha256": res.config_sha256,
                   "checkpoints_found": res.checkpoints, "audited": res.rows, "ledger": res.ledger,
                   "trend": res.trend, "alarms": [f"{r['location']}: {r['message']}" for r in res.alarms],
                   "errors": [f"{r['location']}: {r['message']}" for r in res.errors],
                   "skipped": [f"{r['location']}: {r['reason']}" for r in res.skipped]})


def run(cfg: NightlyAuditConfig) -> NightlyResult:
    # under `ray job submit --working-dir .` a relative ledger root is Ray's copy of the working dir, deleted once
    # the job is done: every night's ledger rows (and so which checkpoints were audited) went with it
    key, root = ("nightly.ledger", cfg.nightly.ledger) if cfg.nightly.ledger else ("storage.root", cfg.storage.root)
    why = in_job_working_dir(root, key, os.environ.get(RAY_JOB_CONFIG), os.getcwd())
    if why:
        raise ConfigError(why)
    if cfg.nightly.action == NightlyAction.run:
        check_tracker(cfg.tracker)  # its package, before any weights are hashed
        check_tracker_run(cfg.tracker)  # tracker.run_id a run of its store
    res = plan(cfg)
    if cfg.nightly.action == NightlyAction.plan:
        # plan mode's jobs (nightly.only) announce their own rows: a job killed before its ALARM line leaves its
        # row to the next night's plan, which announces it (its exit 3, the webhook)
        res.earlier_alarms = earlier_alarms(cfg, Ledger(ledger_root(cfg), cfg.storage.options), res)
        if not res.alarms:
            release_job(res)
        return res
    if res.pending:  # a training set, prompts or output folder every audit would fail on: once, no error rows
        from memex.stages.audit import check_shared_inputs

        check_actor_devices(cfg.resources, cfg.sampling.dtype)
        check_shared_inputs(cfg)
    ledger = Ledger(ledger_root(cfg), cfg.storage.options)
    ledger.start_announcing()
    log.info("%d checkpoints under %s, %d not yet audited with config %s", res.checkpoints,
             redact_text(cfg.nightly.location), len(res.pending), res.config_sha256[:12])

    def claim(row: dict) -> None:
        if ledger.announced(row) or not claim_alarm(cfg, res, ledger, row):
            # its alarm was announced by the night whose tracker failed (an error row that kept the gate's
            # alarm): this retry's row is the same alarm, paged again every night the tracker stayed down;
            # or a live job (a night still running) claimed it first, and pages it
            res.announced.add((row["weights_sha256"], row["config_sha256"]))

    for p in res.pending:
        # read again before each audit, which takes minutes to hours: another job (an overlapping
        # night, plan mode's job per checkpoint) may have audited it since this one planned
        if p.weights in ledger.audited(res.config_sha256):
            res.skipped.append({"location": redact_text(p.ckpt.location), "reason": "audited by another job since"})
            continue
        out = audit_one(cfg, p, res.config_sha256, ledger, claim)
        if isinstance(out, str):
            res.skipped.append({"location": redact_text(p.ckpt.location), "reason": out})
            continue
        res.rows.append(out)
        res.trend = write_trend(cfg, ledger)  # after every audit: a crash later still leaves it current
    if res.trend is None:
        res.trend = write_trend(cfg, ledger)
    if cfg.nightly.only is None:  # (a job per checkpoint announces its own row; the plan, and a whole night, all)
        res.earlier_alarms = earlier_alarms(cfg, ledger, res)
    if not res.alarms:  # nothing for this job to page: no other night waits on it
        release_job(res)
    return res


def claim_alarm(cfg: NightlyAuditConfig, res: NightlyResult, ledger: Ledger, row: dict) -> bool:
    """Claim `row`'s alarm for this job, which then pages it; False when another job, alive now, claims it
    (a night still running, or one announcing), or a night announced it since it was read. The job's lease is
    taken before its first claim."""
    from memex.lease import LeaseHeld

    def check_and_claim() -> bool:
        # announced since the caller read it unannounced: its job printed the ALARM line, marked it and released
        # its lease, so it reads as nobody's (mark_announced writes the marks before it releases the lease)
        if ledger.announced(row):
            return False
        if ledger.claimed_by_other(row, res.job, cfg.storage):
            return False
        if res.job_lease is None:
            res.job_lease = ledger.job_lease(res.job, cfg.storage).acquire()
            atexit.register(_release, res.job_lease)  # a job that fails before its ALARM line: its claims lapse
        ledger.claim(row, res.job)
        return True

    try:
        with ledger.claiming(cfg.storage, wait_s=2 * cfg.storage.lease_timeout_s):
            return check_and_claim()
    except LeaseHeld as e:  # a claimer stuck for longer than a stale lease lasts: paged here rather than never
        log.warning("the ledger's alarm claims are locked (%s): claiming %s without the lock", e, row["location"])
        return check_and_claim()


def _release(lease) -> None:
    try:
        lease.release()
        if lease.local:  # its folder, jobs/<id>/, empty now (object stores have no folders)
            with contextlib.suppress(OSError):
                os.rmdir(lease.store.path)
    except Exception as e:  # noqa: BLE001 - a lease left behind goes stale: its claims lapse then
        log.warning("could not release the nightly job's lease (%s: %s)", type(e).__name__, redact_text(str(e)))


def release_job(res: NightlyResult) -> None:
    """This job pages nothing more: another night may take over its unannounced alarm rows."""
    if res.job_lease is not None:
        _release(res.job_lease)
        res.job_lease = None


def earlier_alarms(cfg: NightlyAuditConfig, ledger: Ledger, res: NightlyResult) -> list[dict]:
    """This config's alarm rows no night announced (memex/ledger.py), other than this night's own rows, and
    of those the ones no live job claims (its night still runs, and pages them itself): claimed here."""
    this = {(r["weights_sha256"], r["config_sha256"]) for r in res.rows}
    return [{**r, "message": f"{r['message']} (found {r['finished']:%Y-%m-%d %H:%M} UTC by a night that ended "
                             "before announcing it)"}
            for r in ledger.unannounced(res.config_sha256)
            if (r["weights_sha256"], r["config_sha256"]) not in this and claim_alarm(cfg, res, ledger, r)]


def mark_announced(cfg: NightlyAuditConfig, res: NightlyResult) -> None:
    """After the night's ALARM line is printed: its alarm rows are not announced again, and its claims end."""
    Ledger(ledger_root(cfg), cfg.storage.options).mark_announced(res.alarms)
    release_job(res)


def announce(cfg: NightlyAuditConfig, res: NightlyResult) -> None:
    """Step 6: POST the result to nightly.webhook (if set); raises NightlyError when it fails."""
    if cfg.nightly.webhook:
        post_webhook(cfg.nightly.webhook, payload(res), cfg.nightly.webhook_timeout_s)


def format_result(res: NightlyResult) -> str:
    lines = [f"memex nightly: {res.checkpoints} checkpoints found, {len(res.rows)} audited now "
             f"(config {res.config_sha256[:12]})"]
    if res.checkpoints == 0:  # a new training run, or a wrong nightly.location: say what is looked for
        lines.append("  none under nightly.location: it looks for diffusers pipeline folders (model_index.json), "
                     "checkpoint-<step>/unet folders with weights, and LoRAs (checkpoint-<step>/pytorch_lora_weights"
                     f".safetensors, kohya's <name>-<step>.safetensors), up to {MAX_DEPTH} levels down "
                     "(checkpoint-<step>/ folders one more)")
    for r in res.rows:  # a failed audit counted nothing (no samples): no "0 training images extracted" for it
        counts = "" if r["outcome"] == "error" and not r.get("samples") else \
            f"{r['extracted']} training images extracted, {r['flagged_prompts']} prompts flagged"
        lines.append(f"  {r['outcome']:<11} step {r['step']}: {counts}  {r['location']}"
                     + (f"  -- {r['message']}" if r["message"] else ""))
    for r in res.earlier_alarms:
        counts = "" if r["outcome"] == "error" and not r.get("samples") else \
            f"{r['extracted']} training images extracted"
        lines.append(f"  {r['outcome']:<11} step {r['step']}: {counts}  {r['location']}  -- {r['message']}")
    for r in res.skipped:
        lines.append(f"  skipped     {r['location']}: {r['reason']}")
    lines.append(f"  ledger: {res.ledger}")
    lines.append(f"  trend: {res.trend}")
    return redact_text("\n".join(lines))
