"""`memex --help` lists the stages and `memex <stage> --help` describes one (issue 16, item 3): exit 0,
named memex (never Hydra's "cli" template), groups read from conf/, common keys with their composed values."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from memex import cli

HYDRA_STAGES = ["audit", "generate", "nightly", "train"]


def _run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["memex", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _no_hydra_boilerplate(text: str) -> None:
    assert "Powered by Hydra" not in text and "== Config ==" not in text
    assert not re.search(r"\bcli\b", text), text


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_memex_help_lists_every_stage_one_line_each_and_exits_0(monkeypatch, capsys, flag):
    code, out, _ = _run(monkeypatch, capsys, flag)
    assert code == 0
    for stage in cli.STAGES:
        assert len([line for line in out.splitlines() if line.strip().startswith(stage + " ")]) == 1, stage
    _no_hydra_boilerplate(out)


def test_memex_without_a_stage_is_a_usage_error_with_the_same_listing(monkeypatch, capsys):
    code, out, err = _run(monkeypatch, capsys)
    assert code == 2 and out == ""
    assert err.strip() == cli.stage_list().strip()


def test_an_unknown_stage_is_named(monkeypatch, capsys):
    code, _, err = _run(monkeypatch, capsys, "audt")
    assert code == 2 and "'audt' is not a stage" in err and "audit" in err


@pytest.mark.parametrize("stage", HYDRA_STAGES)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_stage_help_names_memex_the_stage_its_groups_and_keys(monkeypatch, capsys, stage, flag):
    code, out, _ = _run(monkeypatch, capsys, stage, flag)
    assert code == 0
    _no_hydra_boilerplate(out)
    assert f"memex {stage}" in out and cli.SUMMARIES[stage] in out
    assert f"memex {stage} [key=value ...] --cfg job" in out
    # the groups: every one of conf/<stage>.yaml's defaults list, with every option in conf/<group>/
    groups = cli.config_groups(stage)
    assert groups
    for group, option, options in groups:
        line = next(x for x in out.splitlines() if x.strip().startswith(f"{group}="))
        assert line.strip().startswith(f"{group}={option if option is not None else 'null'}")
        assert set(options) == {p.stem for p in (cli.CONF_DIR / group).glob("*.yaml")}
        for o in options:
            assert o in line, (group, o)
    # the common keys: real keys of the composed config, shown with its value
    cfg = cli.compose_config(stage, [])
    shown = dict(re.findall(r"^  ([a-z_]+(?:\.[a-z_]+)*)\s{2,}(.+)$", out.split("common keys")[1], re.M))
    assert list(shown) == cli.COMMON_KEYS[stage]
    for key, value in shown.items():
        assert cli.check_key(key, cli.SCHEMAS[stage]) is None, key
        if OmegaConf.is_missing(cfg, key):
            assert value.startswith("???")
        else:
            assert value == cli.format_default(OmegaConf.select(cfg, key)), key


def test_stage_help_shows_the_values_the_overrides_give(monkeypatch, capsys):
    """Values are read from the composed config, not written into the help."""
    code, out, _ = _run(monkeypatch, capsys, "generate", "sampling.samples_per_prompt=7", "storage=s3", "--help")
    assert code == 0
    assert re.search(r"^  sampling\.samples_per_prompt\s+7$", out, re.M)
    assert re.search(r"^  storage=s3\b", out, re.M)
    assert re.search(r"^  storage\.root\s+s3://", out, re.M)


def test_stage_help_masks_a_webhook_url(monkeypatch, capsys):
    """A webhook's URL is its secret: --help cut it as every file memex writes does (it printed it whole)."""
    code, out, _ = _run(monkeypatch, capsys, "nightly", "nightly.webhook=https://hooks.example.com/abc/SECRET123",
                        "--help")
    assert code == 0 and "SECRET123" not in out
    assert re.search(r"^  nightly\.webhook\s+https://hooks\.example\.com/\*\*\*$", out, re.M), out


def test_stage_help_lists_the_options_a_preset_chose_and_the_models_tuning(monkeypatch, capsys):
    """--help listed the options named on the command line only: under preset=paper it said triage=auto,
    sampling=default and filter=demo beside common keys at the paper's values; the demo's tuning
    (conf/tune/, which sets 80 samples at 10 steps) was not listed at all."""
    code, out, _ = _run(monkeypatch, capsys, "audit", "preset=paper", "model=sd15", "--help")
    assert code == 0
    for line in ("  triage=none   (", "  sampling=paper   (", "  filter=default   ("):
        assert line in out, out
    assert "tune=" not in out  # sd15 has no tuning of its own
    code, out, _ = _run(monkeypatch, capsys, "audit", "--help")
    assert code == 0 and "  tune=audit_demo   (this model's own tuning, conf/tune/; ~tune drops it)" in out


def test_a_sweep_runs_every_job_and_fails_at_its_end(tmp_path, monkeypatch, capsys):
    """`memex <stage> -m a=1,2`: a refused value ended the whole sweep (SystemExit from its first job), the
    later values never ran and nothing said so. Each job now prints its own error, the others run, and the
    command exits 1 at the end naming the failed jobs."""
    monkeypatch.chdir(tmp_path)  # Hydra's multirun/ folder
    monkeypatch.setenv("MEMEX_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(cli, "SWEEP_FAILURES", [])
    import logging

    from memex import console

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code, _, err = _run(monkeypatch, capsys, "train", "-m", "trainer.lr=0,-1", f"output={tmp_path / 'm'}")
    finally:  # a command's logging set up in this process (the console's, Hydra's per job): as it was
        console.finish(keep=False)
        logging.captureWarnings(False)
        root.handlers[:] = handlers
        root.setLevel(level)
    assert code == 1
    assert "trainer.lr must be > 0, got 0.0" in err and "trainer.lr must be > 0, got -1.0" in err  # both ran
    assert "memex: 2 job(s) of the sweep failed: #0 trainer.lr=0 " in err and "; #1 trainer.lr=-1 " in err
    assert "Error executing job with overrides" not in err


def test_cfg_job_prints_the_config_with_credentials_redacted(monkeypatch, capsys):
    """`memex <stage> ... --cfg job`, which --help points to, was Hydra's own printout: a storage secret and a
    webhook's secret path in plain text."""
    import yaml

    code, out, _ = _run(monkeypatch, capsys, "nightly", "+storage.options.secret=TOPSECRET", "sampling.seed=3",
                        "nightly.webhook=https://hooks.example.com/abc/SECRET123", "--cfg", "job")
    assert code == 0 and "TOPSECRET" not in out and "SECRET123" not in out
    got = yaml.safe_load(out)
    assert got["storage"]["options"]["secret"] == "***" and got["nightly"]["webhook"] == "https://hooks.example.com/***"
    assert got["sampling"]["seed"] == 3 and "${" in out  # unresolved, as Hydra prints it
    code, out, _ = _run(monkeypatch, capsys, "audit", "--cfg", "job", "--resolve")
    assert code == 0 and "${" not in out and yaml.safe_load(out)["sampling"]["samples_per_prompt"] == 80
    code, _, err = _run(monkeypatch, capsys, "audit", "sampling.sample_per_prompt=1", "--cfg", "job")
    assert code == 1 and "did you mean sampling.samples_per_prompt" in err


def test_stage_help_with_an_unknown_key_names_the_nearest(monkeypatch, capsys):
    code, out, err = _run(monkeypatch, capsys, "audit", "sampling.sample_per_prompt=1", "--help")
    assert code == 1 and out == ""
    assert "did you mean sampling.samples_per_prompt" in err


def test_installed_memex_help_exits_0():
    exe = Path(sys.executable).with_name("memex")
    # pyproject.toml declares the script: its absence is a packaging fault, not a missing optional dependency
    assert exe.exists(), f"no memex script beside {sys.executable}: install the package (pip install -e .)"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(stage in r.stdout for stage in cli.STAGES)


def test_a_ray_job_on_an_image_older_than_its_checkout_is_refused_naming_the_packages(monkeypatch, capsys,
                                                                                         tmp_path):
    """`ray job submit --working-dir .` runs the checkout's code on the image's packages: a checkout whose
    constraints.txt moved a pin ran on yesterday's image, and every sampler actor failed after the index
    build. In a job (Ray's $RAY_JOB_CONFIG_JSON_ENV_VAR) the pins are compared with what is installed, and
    a difference refused before any work; a local tag (+cu130) is no difference, nor a package the node
    lacks (faiss-cpu on a GPU image)."""
    from memex import config as C
    from memex.cli import pin_mismatches
    from memex.storage import RAY_JOB_CONFIG

    have = {"torch": "2.13.0+cu130", "diffusers": "0.42.1", "transformers": "5.24.0"}
    pins = "# comment\ntorch==2.13.0\ndiffusers==0.42.1  # ok\ntransformers==5.25.0\nfaiss-cpu==1.15.1\n"
    assert pin_mismatches(pins, have.get) == ["transformers: pinned 5.25.0, installed 5.24.0"]
    (tmp_path / "constraints.txt").write_text("diffusers==0.0.1\n")
    monkeypatch.setattr(C, "MEMEX_HOME", str(tmp_path))
    monkeypatch.setenv(RAY_JOB_CONFIG, '{"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}')
    code, _, err = _run(monkeypatch, capsys, "generate")
    assert code == 1 and "pins other versions than this job's Python has (diffusers: pinned 0.0.1, installed " \
        in err and "rebuild the image from this checkout" in err, err
