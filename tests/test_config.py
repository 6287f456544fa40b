import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import BIN, REPO, compose
from memex.cli import CONF_DIR
from memex.config import AuditConfig, ConfigError, DistanceKind, GenerateConfig, ModelKind, PromptSource, SchedulerKind

GROUPS = ["model", "sampling", "prompts", "storage", "resources"]
FILL = ["model.path=/some/model", "prompts.path=/some/prompts.txt"]  # values left ??? on purpose


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))])
def test_every_group_option_composes(group, option):
    # mandatory values (???) in an option are filled the way a user would
    if (group, option) == ("prompts", "near_duplicates"):  # needs the audit's index
        with pytest.raises(ConfigError, match="memex audit"):
            compose([f"{group}={option}"] + FILL)
        return
    cfg = compose([f"{group}={option}"] + FILL)
    assert isinstance(cfg, GenerateConfig)


AUDIT_GROUPS = GROUPS + ["filter", "trainset", "embedder", "index", "match"]
AUDIT_FILL = ["model.path=/some/model", "trainset.path=/data/train.parquet", "embedder.path=/models/sscd.pt"]


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in AUDIT_GROUPS
                                          for p in sorted((CONF_DIR / g).glob("*.yaml"))])
def test_every_audit_group_option_composes(group, option):
    # sampling options made for `memex generate` may take fewer samples than a clique needs
    fix = ["sampling.samples_per_prompt=16"] if group == "sampling" else []
    cfg = compose([f"{group}={option}", "prompts.path=/some/prompts.txt"] + AUDIT_FILL + fix, config_name="audit")
    assert isinstance(cfg, AuditConfig)
    assert getattr(cfg, group) is not None


def test_default_audit_is_the_demo_against_its_own_training_set():
    cfg = compose([], config_name="audit")
    assert cfg.model.path.endswith("demo/models/demo-text")
    assert cfg.trainset.path == cfg.model.path + "/training_manifest.parquet"
    assert cfg.prompts.source == PromptSource.near_duplicates
    assert cfg.sampling.samples_per_prompt >= cfg.filter.min_clique  # the demo scales the paper's 10-of-500 down
    assert (cfg.match.distance, cfg.match.threshold) == (DistanceKind.tiled_l2, 0.15)


@pytest.mark.parametrize("override,key", [
    ("filter.edge_threshold=1.5", "filter.edge_threshold"),
    ("sampling.samples_per_prompt=4", "filter.min_clique"),
    ("embedder=sscd", "embedder.path"),
    ("match.threshold=0.1", "match.threshold"),  # with match=relative below
    ("index.shards=0", "index.shards"),
])
def test_audit_out_of_range_names_the_key(override, key):
    extra = ["match=relative"] if override.startswith("match.threshold") else []
    with pytest.raises((ConfigError, ValidationError, ConfigCompositionException)) as e:
        compose([override] + extra, config_name="audit")
    assert key in str(e.value) or key in str(e.value.__cause__)


def test_default_config_is_the_demo():
    cfg = compose([])
    assert cfg.model.name == "demo" and cfg.model.kind == ModelKind.pixel_text
    assert cfg.model.path.endswith("demo/models/demo-text")
    assert cfg.prompts.source == PromptSource.file
    assert cfg.storage.root == "runs" and cfg.resources.num_gpus == 0


def test_overrides_reach_typed_fields():
    cfg = compose(["sampling.samples_per_prompt=500", "sampling.scheduler=ddim", "model=sd15", "storage=s3"])
    assert cfg.sampling.samples_per_prompt == 500
    assert cfg.sampling.scheduler == SchedulerKind.ddim
    assert cfg.model.kind == ModelKind.latent_text
    assert cfg.storage.root.startswith("s3://")


@pytest.mark.parametrize("override,key", [
    ("sampling.foo=1", "sampling.foo"),
    ("sampling.batch_size=abc", "sampling.batch_size"),
    ("sampling.scheduler=bogus", "sampling.scheduler"),
    ("model.kind=gan", "model.kind"),
])
def test_wrong_override_names_the_key(override, key):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as e:
        compose([override])
    assert key in str(e.value) or key in str(e.value.__cause__)


@pytest.mark.parametrize("override,key", [
    ("sampling.batch_size=0", "sampling.batch_size"),
    ("sampling.height=30", "sampling.height"),
    ("resources.max_actors=0", "resources.max_actors"),
    ("prompts.path=null", "prompts.path"),
    ("run.name=a/b", "run.name"),
])
def test_out_of_range_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose([override])


@pytest.mark.parametrize("entry", [[str(BIN / "memex"), "generate"], [sys.executable, "jobs/generate.py"]])
def test_cli_and_job_fail_on_unknown_key_before_any_work(entry, tmp_path):
    """`memex generate` and `python jobs/generate.py` parse the same overrides and fail the same way."""
    r = subprocess.run(entry + ["sampling.typo=3", f"storage.root={tmp_path}/runs"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "sampling.typo" in r.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started or written


def test_cli_range_error_is_one_clear_line(tmp_path):
    r = subprocess.run([str(BIN / "memex"), "generate", "sampling.batch_size=0", f"storage.root={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "memex: error: sampling.batch_size must be >= 1, got 0" in r.stderr
    assert "Traceback" not in r.stderr
