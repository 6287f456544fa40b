"""Command line: `memex <stage> key=value ...`, with the same Hydra overrides as `python jobs/<stage>.py`.

This is where Hydra stops: the composed config is turned into the typed dataclasses of
`memex.config` (which also validates types and enum choices) and handed to the stage's `run`.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from memex import config as C

CONF_DIR = C.CONF_DIR

# ${memex_home:} in YAML: the checkout holding conf/ (where the demo model and data live).
OmegaConf.register_new_resolver("memex_home", lambda: C.MEMEX_HOME, replace=True)

# Schema: every group's YAML is merged onto its dataclass field, so unknown keys and bad types fail.
_cs = ConfigStore.instance()
_cs.store(name="generate_schema", node=C.GenerateConfig)
_cs.store(name="train_schema", node=C.TrainConfig)
_cs.store(name="audit_schema", node=C.AuditConfig)
_cs.store(name="nightly_schema", node=C.NightlyAuditConfig)


def _typed(cfg: DictConfig, cls: type, validate):
    from omegaconf.errors import MissingMandatoryValue

    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:  # a ??? left in the config: name the key to set
        raise C.ConfigError(f"{e.full_key} is not set: add {e.full_key}=... to the command") from None
    assert isinstance(obj, cls), type(obj)
    validate(obj)
    return obj


def to_generate_config(cfg: DictConfig) -> C.GenerateConfig:
    return _typed(cfg, C.GenerateConfig, C.validate_generate)


def to_train_config(cfg: DictConfig) -> C.TrainConfig:
    return _typed(cfg, C.TrainConfig, C.validate_train)


def to_audit_config(cfg: DictConfig) -> C.AuditConfig:
    return _typed(cfg, C.AuditConfig, C.validate_audit)


def to_nightly_config(cfg: DictConfig) -> C.NightlyAuditConfig:
    return _typed(cfg, C.NightlyAuditConfig, C.validate_nightly)


def _report_errors(fn):
    """Known user errors print one line naming the fix and exit 1 (Hydra would print a traceback)."""

    def wrapper(cfg: DictConfig) -> None:
        try:
            fn(cfg)
        except C.MemexError as e:
            print(f"memex: error: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@_report_errors
def _generate(cfg: DictConfig) -> None:
    from memex.stages import generate

    gcfg = to_generate_config(cfg)
    summary = generate.run(gcfg, generate.prepare(gcfg))
    print(f"memex generate: {summary['rows']} samples in {summary['shards']} shards "
          f"({summary['generated_shards']} generated now) -> {summary['run']}")


generate_main = hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="generate")(_generate)



@_report_errors
def _train(cfg: DictConfig) -> None:
    from memex.training import train

    out = train(to_train_config(cfg))
    print(f"memex train: model saved to {out}")


train_main = hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")(_train)


@_report_errors
def _audit(cfg: DictConfig) -> None:
    from memex.stages import audit

    summary = audit.run(to_audit_config(cfg))
    print(audit.format_summary(summary))


audit_main = hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="audit")(_audit)


GATE_EXIT = 3  # nightly: a checkpoint crossed the budget or the growth margin (1: errors, 2: usage)


def _logs_to_stderr() -> None:
    """Hydra's job_logging writes to stdout; move it to stderr where stdout is a machine-read result."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


@_report_errors
def _nightly(cfg: DictConfig) -> None:
    from memex.stages import nightly

    if cfg.nightly.action == C.NightlyAction.plan.value:
        _logs_to_stderr()  # stdout is read by `... | while read id ckpt`: only those lines, no log line (faiss')
    ncfg = to_nightly_config(cfg)
    res = nightly.run(ncfg)
    if ncfg.nightly.action == C.NightlyAction.plan:
        for p in res.pending:  # "<submission id> <checkpoint folder>", one per line, for a shell loop
            print(p.submission_id(res.config_sha256, nightly.night_of(ncfg)), p.ckpt.location)
        return
    print(nightly.format_result(res))
    nightly.announce(ncfg, res)
    if res.errors:
        raise C.MemexError(f"{len(res.errors)} audits failed: " + "; ".join(
            f"{r['location']}: {r['message']}" for r in res.errors) + " (they are retried on the next run)")
    if res.alarms:
        print("memex nightly: ALARM: " + "; ".join(f"{r['location']}: {r['message']}" for r in res.alarms),
              file=sys.stderr)
        raise SystemExit(GATE_EXIT)


nightly_main = hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="nightly")(_nightly)


def report_main() -> None:
    """`memex report RUN`: rebuild RUN/report/index.html from the run folder alone (no Hydra config)."""
    import argparse
    import json

    from memex.report import build_report

    ap = argparse.ArgumentParser(prog="memex report", description=report_main.__doc__)
    ap.add_argument("run", help="run folder: a local path or fsspec URI (s3://bucket/runs/<name>)")
    ap.add_argument("--storage-options", default="{}",
                    help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://minio:9000"}\'')
    a = ap.parse_args(sys.argv[1:])
    try:
        print(f"memex report: {build_report(a.run, json.loads(a.storage_options))}")
    except (C.MemexError, json.JSONDecodeError) as e:
        print(f"memex: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


STAGES = {"audit": audit_main, "generate": generate_main, "nightly": nightly_main, "report": report_main,
          "train": train_main}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:
        print(f"usage: memex {{{','.join(STAGES)}}} [key=value ...]   (Hydra overrides; --help for a stage's config)\n"
              "       memex report RUN_FOLDER",
              file=sys.stderr)
        sys.exit(2)
    stage = sys.argv.pop(1)
    sys.argv[0] = f"memex {stage}"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    STAGES[stage]()
