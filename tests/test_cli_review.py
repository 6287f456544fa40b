"""Bad command lines the review found answered by Hydra (several lines, a traceback, multirun/ written in the cwd)
or accepted and ignored: each is refused in ONE `memex: error:` line naming the key, with nothing written, and
`memex <stage> --help` exits 0 whatever Hydra flags or sweeps come with it (memex/cli.py check_overrides,
memex/config.py validate_nightly). Every command here is refused before any work: no Ray is started."""

from __future__ import annotations

import subprocess

import pytest

from memex.config import ConfigError

from conftest import BIN, compose


def _memex(tmp_path, stage: str, *args: str) -> subprocess.CompletedProcess:
    """`memex <stage> args` run in tmp_path, on the local executor and a storage root under tmp_path/store (which
    no refused command creates)."""
    return subprocess.run([str(BIN / "memex"), stage, *args, "resources.executor=local",
                           f"storage.root={tmp_path / 'store'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)


def _refused_in_one_line(r: subprocess.CompletedProcess, tmp_path, *words: str) -> str:
    errors = [line for line in r.stderr.splitlines() if line.startswith("memex: error:")]
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr and "HYDRA_FULL_ERROR" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in errors[0], errors[0]
    assert not list(tmp_path.iterdir()), sorted(p.name for p in tmp_path.rglob("*"))  # no multirun/, outputs/
    return errors[0]


# ---- 1. nightly names each checkpoint's run folder itself ---------------------------------------------
def test_nightly_refuses_run_name_it_would_ignore(tmp_path):
    """run.name was replaced per checkpoint (<checkpoint>-<weights hash>-<config hash>) and is not in the config
    hash: accepted and silently ignored. The shipped nightly config itself sets none."""
    assert compose([], config_name="nightly").run.name is None
    with pytest.raises(ConfigError, match="drop run.name"):
        compose(["run.name=mine"], config_name="nightly")
    line = _refused_in_one_line(_memex(tmp_path, "nightly", "run.name=mine"), tmp_path, "run.name",
                                "<checkpoint>-<weights hash>-<config hash>")
    assert line.endswith("drop run.name"), line


# ---- 2. a config group of another stage --------------------------------------------------------------
@pytest.mark.parametrize("stage, args, words", [
    ("audit", ["data=manifest"], ["data is not a config group of memex audit", "did you mean trainset"]),
    ("audit", ["+data=manifest"], ["data is not a config group of memex audit", "trainset"]),
    ("generate", ["+triage=none"], ["triage is not a config group of memex generate", "model, sampling"]),
    ("train", ["tune=audit_demo"], ["tune is not a config group of memex train", "arch, data, trainer"]),
])
def test_a_config_group_of_another_stage_is_named_with_the_stages_groups(tmp_path, stage, args, words):
    """Hydra advised `+data=manifest`, which then failed composing (ConfigKeyError): the group's option file
    existed, so only the stage's defaults list tells."""
    _refused_in_one_line(_memex(tmp_path, stage, *args), tmp_path, *words)


# ---- 3. each value of a -m sweep, before Hydra writes multirun/ -----------------------------------------
@pytest.mark.parametrize("args, words", [
    (["-m", "index.kind=flat,bogus"], ["index.kind=bogus is not a choice", "flat, ivfpq"]),
    (["-m", "index=flat,bogus"], ["index=bogus is not an option of index"]),
    (["-m", "sampling.samples_per_prompt=4,abc"], ["sampling.samples_per_prompt=abc is not a whole number"]),
    (["-m", "budget.rounds=[4],5"], ["budget.rounds=5 is not a list"]),
    (["-m", "index.kind=flat,null"], ["index.kind cannot be null"]),
])
def test_each_value_of_a_sweep_is_checked_before_anything_is_written(tmp_path, args, words):
    """A sweep's values were not checked: Hydra's multi-line error came after multirun/<date>/<time>/multirun.yaml
    was written in the cwd."""
    _refused_in_one_line(_memex(tmp_path, "audit", *args), tmp_path, *words)


# ---- 4. null, non-string choices, list items, a list for one value ----------------------------------------
@pytest.mark.parametrize("stage, args, words", [
    ("audit", ["index.kind=null"], ["index.kind cannot be null", "flat, ivfpq"]),
    ("audit", ["model.path=null"], ["model.path cannot be null"]),
    ("audit", ["index.kind=1"], ["index.kind=1 is not a choice", "flat, ivfpq"]),
    ("audit", ["index.kind=true"], ["index.kind=true is not a choice"]),
    ("audit", ["budget=adaptive", "budget.rounds=[4,abc]"], ["budget.rounds=[4, abc]", "abc is not a whole number"]),
    ("audit", ["budget=adaptive", "budget.rounds=[4,null]"], ["budget.rounds=[4, null]", "null"]),
    ("audit", ["model.path=[a,b]"], ["model.path=[a, b] is a list", "takes one value", "model.path='a,b'"]),
    ("audit", ["index.kind=[flat]"], ["index.kind=[flat] is a list", "flat, ivfpq"]),
    ("audit", ["match.threshold=[0.1]"], ["match.threshold=[0.1] is a list", "a number"]),
    ("mia", ["mia.attacks=[loss,1]"], ["mia.attacks=1 is not a choice", "loss, pia, secmi"]),
])
def test_a_null_a_number_for_a_choice_a_list_item_and_a_list_for_one_value_are_one_line(tmp_path, stage, args,
                                                                                      words):
    """Each was Hydra's six-line merge error ("field 'index.kind' is not Optional", "Invalid value '1'", "Value
    'abc' ... could not be converted to Integer", "Cannot convert 'list' to string")."""
    _refused_in_one_line(_memex(tmp_path, stage, *args), tmp_path, *words)


# ---- 5. --resolve without --cfg ------------------------------------------------------------------------
def test_resolve_without_cfg_is_one_line(tmp_path):
    """Hydra's ValueError, as a raw traceback."""
    _refused_in_one_line(_memex(tmp_path, "audit", "--resolve"), tmp_path, "--resolve goes with --cfg job")


# ---- 6. --help with Hydra's flags and a sweep --------------------------------------------------------
@pytest.mark.parametrize("args, shown", [
    (["--cfg", "job", "--help"], "match.threshold"),
    (["-c", "job", "-h"], "match.threshold"),
    (["-m", "match.threshold=0.1,0.2", "--help"], "a -m sweep: shown for its first job, match.threshold=0.1"),
])
def test_stage_help_with_cfg_or_a_sweep_exits_0(tmp_path, args, shown):
    """`--cfg job --help` read `job` as an override ("Error parsing override 'job'"); a sweep was "Ambiguous value
    for argument". README: `memex <stage> --help` exits 0."""
    r = _memex(tmp_path, "audit", *args)
    assert r.returncode == 0, r.stderr
    assert "memex: error" not in r.stderr and "usage: memex" in r.stdout and shown in r.stdout, r.stdout
    assert not list(tmp_path.iterdir())
