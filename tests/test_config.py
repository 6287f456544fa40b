import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import BIN, REPO, compose
from memex.cli import CONF_DIR
from memex.config import ConfigError, GenerateConfig, ModelKind, PromptSource, SchedulerKind

GROUPS = ["model", "sampling", "prompts", "storage", "resources"]
FILL = ["model.path=/some/model", "prompts.path=/some/prompts.txt"]  # values left ??? on purpose


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))])
def test_every_group_option_composes(group, option):
    # mandatory values (???) in an option are filled the way a user would
    cfg = compose([f"{group}={option}"] + FILL)
    assert isinstance(cfg, GenerateConfig)


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
