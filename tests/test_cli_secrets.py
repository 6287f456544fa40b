"""A credential on the command line is not repeated by memex's own refusals (memex/cli.py): a whole mapping given
to a storage option (storage.options={key: ..., secret: ...}) that the config lacks, and an override typed before
the stage name. Hydra's answer to the first, and memex's to the second, printed the value on stderr, which CI logs
and a Ray job's log keep. Every command here is refused before any work: no Ray is started."""

from __future__ import annotations

import subprocess

import pytest

from memex import cli

from conftest import BIN

SECRET = "wJalrFAKEsecretQ7Z"  # distinctive: found nowhere unless leaked
ACCESS = "AKIAFAKEKEY4CLI"
HOOK = "memexHOOKpath5e8d0a"


def _memex(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "memex"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=180)


def _one_line_error(r: subprocess.CompletedProcess, code: int, *leaked: str) -> str:
    out = r.stdout + r.stderr
    for value in leaked:
        assert value not in out, out
    assert r.returncode == code, (r.returncode, out)
    errors = [line for line in r.stderr.splitlines() if line.startswith("memex: error:")]
    assert len(errors) == 1 and "Traceback" not in out, out
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "override", "named"), [
    ("audit", f"storage.options={{key:{ACCESS},secret:{SECRET}}}",
     "storage.options.key is not in the config, so storage.options={...} has nothing to override there: put a + "
     "before it to add it (+storage.options={...}; the value is not repeated here)"),
    ("audit", f"storage={{options:{{secret:{SECRET}}}}}", "storage.options.secret is not in the config, so storage="),
    ("train", f"data.storage_options={{token:{SECRET}}}", "(+data.storage_options={...}; the value is not repeated"),
    ("train", f"data={{storage_options:{{token:{SECRET}}}}}", "data.storage_options.token is not in the config"),
    ("audit", f"storage={{secret_key:{SECRET}}}", "storage.secret_key is not a setting"),
])
def test_a_mapping_of_storage_options_the_config_lacks_is_refused_without_its_value(tmp_path, stage, override, named):
    """No `+`: Hydra refused the mapping with "To append to your config use +<the override>", on stderr, with the
    keys and secrets in it. memex refuses it first, naming the key it lacks and +<key>={...}."""
    where = f"storage.root={tmp_path / 'store'}" if stage == "audit" else f"output={tmp_path / 'model'}"
    r = _memex(tmp_path, stage, override, where)
    assert named in _one_line_error(r, 1, SECRET, ACCESS)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("stage", "overrides", "key", "value"), [
    ("audit", [f"+storage.options={{key:{ACCESS},secret:{SECRET}}}"], "storage.options.secret", SECRET),
    ("audit", [f"++storage={{options:{{secret:{SECRET}}}}}"], "storage.options.secret", SECRET),
    ("train", [f"+data={{storage_options:{{token:{SECRET}}}}}"], "data.storage_options.token", SECRET),
    # keys the config holds (storage=s3's client_kwargs): merged without a +
    ("audit", ["storage=s3", "storage.options={client_kwargs:{endpoint_url:'http://127.0.0.1:9'}}"],
     "storage.options.client_kwargs.endpoint_url", "http://127.0.0.1:9"),
    ("audit", ["storage=s3", "storage={options:{client_kwargs:{endpoint_url:'http://127.0.0.1:9'}}}"],
     "storage.options.client_kwargs.endpoint_url", "http://127.0.0.1:9"),
    ("audit", ["storage=s3", "storage.options={client_kwargs:null}"], "storage.options.client_kwargs", None),
    # below a null the merge replaces it whole: nothing is added
    ("audit", ["+storage.options.client_kwargs=null", "storage.options={client_kwargs:{region_name:eu}}"],
     "storage.options.client_kwargs.region_name", "eu"),
    ("audit", ["storage={root:/tmp/memex-runs}", "storage.options={}"], "storage.root", "/tmp/memex-runs"),
])
def test_a_mapping_hydra_merges_is_accepted(stage, overrides, key, value):
    cli.check_overrides(overrides, cli.SCHEMAS[stage])
    cfg = cli.compose_config(stage, overrides)  # Hydra composes it as given
    cli.check_schema(cfg, cli.SCHEMAS[stage])
    assert cli.OmegaConf.select(cfg, key) == value


def test_a_mapping_that_adds_below_an_existing_option_is_refused_and_a_sweep_says_which_option():
    with pytest.raises(cli.C.ConfigError) as e:
        cli.check_overrides(["storage=s3", f"storage.options.client_kwargs={{region_name:{SECRET}}}"],
                            cli.C.AuditConfig)
    assert "storage.options.client_kwargs.region_name is not in the config" in str(e.value)
    assert SECRET not in str(e.value)
    with pytest.raises(cli.C.ConfigError) as e:
        cli.check_overrides(["-m", "storage=s3,local", f"storage.options={{client_kwargs:{{endpoint_url:{SECRET}}}}}"],
                            cli.C.AuditConfig)
    assert "with storage=local" in str(e.value) and "+storage.options={...}" in str(e.value)
    assert SECRET not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize(("args", "leaked", "named"), [
    ([f"+storage.options.secret={SECRET}", "audit", "trainset.path=/x"], SECRET,
     "+storage.options.secret=... comes before the stage: the stage comes first, memex audit key=value ..."),
    ([f"nightly.webhook=https://hooks.slack.com/services/T0/B0/{HOOK}", "nightly"], HOOK,
     "nightly.webhook=... comes before the stage: the stage comes first, memex nightly key=value ..."),
])
def test_an_override_before_the_stage_is_named_without_its_value(tmp_path, args, leaked, named):
    """memex printed `'<the override>' is not a stage`, the value with it."""
    line = _one_line_error(_memex(tmp_path, *args), 2, leaked)
    assert named in line, line


@pytest.mark.slow
def test_an_override_and_no_stage_lists_the_stages_without_its_value(tmp_path):
    r = _memex(tmp_path, f"storage.options.token={SECRET}")
    line = _one_line_error(r, 2, SECRET)
    assert "memex <stage> key=value" in line and "audit" in r.stderr, r.stderr
