"""Config values that were accepted and then did something else than they say: each is refused before any
work, by a ConfigError that names the key and the fix (memex/config.py validate_*, memex/cli.py
check_overrides)."""

from __future__ import annotations

import sys

import pytest

from memex import cli
from memex import config as C
from memex.cli import CONF_DIR
from memex.config import ConfigError

from conftest import compose

MIA = ["members.path=/d/m", "nonmembers.path=/d/n"]  # mia's default sets are the demo's; any two paths compose


# ---- model.name: part of the run folder's name ---------------------------------------------------------
@pytest.mark.parametrize("config_name", ["generate", "audit", "nightly", "mia"])
@pytest.mark.parametrize("name, fix", [
    ("stabilityai/sd-2-1", "model.name=sd-2-1"),  # a hub id: the run went one folder down, stabilityai/sd-2-1-<hash>
    ("../../tmp/escape", "model.name=escape"),  # the run was written outside storage.root
    ("..\\escape", "model.name=escape"),
    ("..", "model.name=my-model"),
    (" ", "model.name=my-model"),
])
def test_a_model_name_that_is_no_single_folder_name_is_refused_by_every_command(config_name, name, fix):
    """model.name names the run folder (generate: <model.name>-<hash>, mia: mia-<model.name>-<key>): a `/` in it
    nested the run a folder down, `..` wrote it outside storage.root. Only run.name was checked."""
    extra = MIA if config_name == "mia" else []
    with pytest.raises(ConfigError) as e:
        compose([*extra, f"model.name='{name}'"], config_name=config_name)
    msg = str(e.value)
    assert msg.startswith(f"model.name={name!r} must be a plain folder name"), msg
    assert fix in msg, msg


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_every_shipped_model_name_is_a_plain_folder_name(option):
    cfg = compose([f"model={option}", "model.path=/some/model"])
    C.check_model_name(cfg.model.name)
    assert "/" not in cfg.model.name and ".." not in cfg.model.name


# ---- NaN and inf in range checks -----------------------------------------------------------------------
@pytest.mark.parametrize("config_name, overrides, key", [
    ("nightly", ["nightly.settle_minutes=nan"], "nightly.settle_minutes"),
    ("generate", ["storage.lease_timeout_s=nan"], "storage.lease_timeout_s"),
    ("generate", ["storage.lease_wait_s=nan"], "storage.lease_wait_s"),
    ("generate", ["resources.num_gpus=nan"], "resources.num_gpus"),
    ("generate", ["resources.num_cpus=nan"], "resources.num_cpus"),
    ("generate", ["resources.start_timeout_s=nan"], "resources.start_timeout_s"),
    ("mia", [*MIA, "storage.lease_timeout_s=nan"], "storage.lease_timeout_s"),
    ("mia", [*MIA, "resources.num_cpus=nan"], "resources.num_cpus"),
    ("audit", ["match=relative", "match.threshold=nan"], "match.threshold"),  # relative l2's own range check
    # inf where the key needs a finite value
    ("nightly", ["nightly.settle_minutes=inf"], "nightly.settle_minutes"),  # no checkpoint would ever settle
    ("generate", ["storage.lease_timeout_s=inf"], "storage.lease_timeout_s"),  # a killed job's lease: held forever
    ("generate", ["resources.num_gpus=inf"], "resources.num_gpus"),
    ("generate", ["resources.num_cpus=inf"], "resources.num_cpus"),
    ("generate", ["resources.start_timeout_s=inf"], "resources.start_timeout_s"),  # Ray's wait takes milliseconds
    ("generate", ["sampling.guidance_scale=inf"], "sampling.guidance_scale"),
    ("nightly", ["nightly.webhook=https://hooks.example.com/x", "nightly.webhook_timeout_s=inf"],
     "nightly.webhook_timeout_s"),  # the socket's OverflowError, after the night's audits
    ("train", ["output=/tmp/out", "trainer.lr=inf"], "trainer.lr"),
])
def test_nan_and_inf_are_refused_by_the_range_checks(config_name, overrides, key):
    """`nan < low` is False: NaN passed every `_at_least` check (a NaN settle time audited every checkpoint at
    once, a NaN lease timeout never took a stale lease over, Ray was asked for nan GPUs)."""
    with pytest.raises(ConfigError) as e:
        compose(overrides, config_name=config_name)
    assert str(e.value).startswith(key), str(e.value)
    assert "nan" in str(e.value) or "inf" in str(e.value), str(e.value)


def test_an_endless_lease_wait_is_still_allowed():
    """storage.lease_wait_s=inf: wait as long as it takes for the run folder (memex/lease.py polls to a deadline
    of inf); the one range key where infinity means something."""
    assert compose(["storage.lease_wait_s=inf"]).storage.lease_wait_s == float("inf")


# ---- a group's kind key without its option -------------------------------------------------------------
@pytest.mark.parametrize("schema, overrides, option", [
    (C.AuditConfig, ["triage.kind=preview"], "triage=preview"),
    (C.GenerateConfig, ["prompts.source=captions", "prompts.path=/d/m.parquet"], "prompts=captions"),
    (C.AuditConfig, ["prompts.source=captions", "prompts.path=/d/m.parquet"], "prompts=captions"),
    (C.GenerateConfig, ["prompts.source=near_duplicates"], "prompts=near_duplicates"),
    (C.NightlyAuditConfig, ["preset=paper", "budget.kind=adaptive"], "budget=adaptive"),  # the preset's is fixed
    (C.NightlyAuditConfig, ["triage.kind=preview", "triage.seeds=8"], "triage=preview"),  # steps still kept
    (C.AuditConfig, ["budget.kind=adaptive"], "budget=adaptive"),
    (C.AuditConfig, ["match.distance=relative_l2"], "match=relative"),
    (C.AuditConfig, ["++index.kind=ivfpq"], "index=ivfpq"),
])
def test_a_kind_key_without_its_option_is_refused_naming_the_option(schema, overrides, option):
    """`triage.kind=preview` kept triage=auto's 4 seeds x 1 step (triage=preview: 8 x 10); `prompts.source=captions`
    kept the prompt limit in force (generate: none, audit: 24; prompts=captions: 1000). Only embedder.kind was
    refused so."""
    group = option.split("=")[0]
    with pytest.raises(ConfigError) as e:
        cli.check_overrides(overrides, schema)
    msg = str(e.value)
    key = next(o for o in overrides if o.lstrip("+").startswith(f"{group}.")).lstrip("+").split("=")[0]
    assert msg.startswith(f"{key}={option.split('=')[1] if group != 'match' else 'relative_l2'} "), msg
    assert f"choose the option {option}" in msg, msg
    # the option, or the key with every value its option sets, is what the user meant
    cli.check_overrides([option] + [o for o in overrides[1:] if not o.startswith(f"{group}.")], schema)
    cli.check_overrides([option, *overrides], schema)  # the option with its own kind repeated


def test_the_kind_keys_refused_did_keep_the_other_options_values():
    """What the refusal prevents, composed: the option's values are not those of its kind key alone."""
    assert compose(["triage.kind=preview"], config_name="audit").triage.seeds == 4
    assert compose(["triage=preview"], config_name="audit").triage.seeds == 8
    gen = ["prompts.source=captions", "prompts.path=/d/m.parquet"]
    assert compose(gen).prompts.limit is None
    assert compose(gen, config_name="audit").prompts.limit == 24
    assert compose(["prompts=captions", "prompts.path=/d/m.parquet"]).prompts.limit == 1000


@pytest.mark.parametrize("schema, overrides", [
    (C.AuditConfig, ["triage.kind=noise_norm"]),  # its option sets nothing else
    (C.AuditConfig, ["triage.kind=none"]),
    (C.GenerateConfig, ["prompts.source=none", "prompts.path=null"]),
    (C.GenerateConfig, ["prompts.source=file"]),  # generate's prompts=demo is of kind file (it sets the path)
    (C.AuditConfig, ["budget.kind=fixed"]),  # (nightly's budget=adaptive sets rounds: refused, below)
    (C.TrainConfig, ["arch=uncond_small", "arch.kind=pixel_text"]),  # uncond_small sets its kind alone
    (C.AuditConfig, ["preset=paper", "prompts.source=file", "prompts.path=/d/p.txt"]),  # the preset's limit
    # the option in force already sets that kind (nightly's budget=adaptive, the audit's prompts=near_duplicates)
    (C.NightlyAuditConfig, ["budget.kind=adaptive"]),
    (C.AuditConfig, ["prompts.source=near_duplicates"]),
    (C.AuditConfig, ["index.kind=flat"]),
    (C.AuditConfig, ["match.distance=tiled_l2"]),
    (C.AuditConfig, ["tracker.kind=mlflow"]),
    (C.TrainConfig, ["arch.kind=unconditional"]),
    # the kind with every value its option sets
    (C.AuditConfig, ["triage.kind=preview", "triage.seeds=8", "triage.steps=10"]),
    (C.GenerateConfig, ["prompts.source=captions", "prompts.path=/d/m.parquet", "prompts.limit=50"]),
    (C.AuditConfig, ["budget.kind=adaptive", "budget.rounds=[4,80]"]),
    (C.AuditConfig, ["match.distance=relative_l2", "match.threshold=0.9"]),
    (C.AuditConfig, ["embedder.kind=sscd", "embedder.size=288"]),
    # a sweep or an interpolation is Hydra's to resolve
    (C.AuditConfig, ["-m", "triage.kind=preview,none"]),
    (C.AuditConfig, ["triage.kind=${oc.env:KIND,none}"]),
])
def test_a_kind_key_whose_option_sets_nothing_else_or_with_its_values_passes(schema, overrides):
    cli.check_overrides(overrides, schema)


# the option in force (the command line's, or the stage's) of another kind, whose other values were kept
@pytest.mark.parametrize("config_name, overrides, kept, option", [
    ("audit", ["prompts.source=file", "prompts.path=/d/p.txt"], "prompts.limit=24", "prompts=file"),
    ("nightly", ["prompts.source=file", "prompts.path=/d/p.txt"], "prompts.limit=24", "prompts=file"),
    ("audit", ["triage=preview", "triage.kind=noise_norm"], "triage.seeds=8, triage.steps=10", "triage=noise_norm"),
    ("audit", ["match=relative", "match.distance=tiled_l2"], "match.threshold=0.9", "match=tiled"),
    ("audit", ["embedder=sscd", "embedder.path=/m/s.pt", "embedder.kind=pixels", "embedder.path=null"],
     "embedder.size=288", "embedder=pixels"),
    ("audit", ["index=ivfpq", "index.kind=flat"], "index.shards=16", "index=flat"),
    # nightly's budget=adaptive: its rounds [4, samples_per_prompt] were refused by validation at any sample count
    # but 16 as "budget.rounds is set ... drop budget.rounds", a key the command line never set
    ("nightly", ["budget.kind=fixed", "sampling.samples_per_prompt=32"], "budget.rounds=[4, ", "budget=fixed"),
    ("nightly", ["budget.kind=fixed"], "budget.rounds=[4, ", "budget=fixed"),
    ("generate", ["prompts.source=none"], "prompts.path=", "prompts=none"),  # prompts=demo's path
])
def test_a_kind_key_over_an_option_of_another_kind_is_refused_naming_the_option(config_name, overrides, kept,
                                                                                option):
    """`memex audit prompts.source=file prompts.path=...` kept prompts=near_duplicates' limit of 24: the first 24
    prompts of the file audited (prompts=file: all of them). Only the new kind's own option's values were checked."""
    group = option.split("=")[0]
    kind = next(o for o in overrides if o.startswith(f"{group}.{cli.KIND_KEYS[group]}="))
    with pytest.raises(ConfigError) as e:
        cli.check_overrides(overrides, cli.SCHEMAS[config_name])
    msg = str(e.value)
    assert msg.startswith(f"{kind} keeps {kept}"), msg
    assert f"choose the option {option}" in msg, msg
    fixed = [option if o.startswith(f"{group}=") else o for o in overrides if o != kind]
    fixed = fixed if option in fixed else [option, *fixed]
    cli.check_overrides(fixed, cli.SCHEMAS[config_name])
    compose(fixed, config_name=config_name)


@pytest.mark.parametrize("overrides, start, option", [
    (["embedder=clip", "embedder.kind=sscd"], "embedder.kind=sscd keeps the clip embedder's embedder.size of 224",
     "embedder=sscd"),
    (["triage=noise_norm", "triage.kind=preview"], "triage.kind=preview keeps the other triage settings",
     "triage=preview"),
])
def test_a_kind_key_after_another_option_on_the_command_line_is_refused_too(overrides, start, option):
    """The group's option on the command line was taken for the kind's own: embedder=clip embedder.kind=sscd fed
    SSCD 224 px images (it takes 288), triage=noise_norm triage.kind=preview previewed 4 seeds x 1 step (8 x 10)."""
    with pytest.raises(ConfigError) as e:
        cli.check_overrides(overrides, C.AuditConfig)
    assert str(e.value).startswith(start) and f"choose the option {option}" in str(e.value), str(e.value)
    cli.check_overrides([option], C.AuditConfig)


def test_the_kind_keys_over_another_kinds_option_did_keep_its_values():
    path = ["prompts.path=/d/p.txt"]
    assert compose(["prompts.source=file", *path], config_name="audit").prompts.limit == 24
    assert compose(["prompts=file", *path], config_name="audit").prompts.limit is None
    assert compose(["match=relative", "match.distance=tiled_l2"], config_name="audit").match.threshold == 0.9
    assert compose(["match=tiled"], config_name="audit").match.threshold == 0.15


def test_the_cli_refuses_a_kind_key_without_its_option_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["memex", "audit", "triage.kind=preview"])
    monkeypatch.setitem(cli.STAGES, "audit", lambda: pytest.fail("the audit ran"))  # refused before, or this fails
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("memex: error: triage.kind=preview "), err
    assert "choose the option triage=preview" in err[0] and "triage.seeds=8" in err[0], err
    assert not any(tmp_path.iterdir())


def test_every_documented_command_passes_the_override_check():
    """The refusals above are made before Hydra composes (memex/cli.py check_overrides): no command the
    documentation shows may meet one."""
    from test_documented_commands import CHECKED

    for c in CHECKED:
        if c.stage in cli.SCHEMAS:
            try:
                cli.check_overrides(c.to_compose(), cli.SCHEMAS[c.stage])
            except ConfigError as e:
                pytest.fail(f"{c.where}: `{c.text}`: {e}", pytrace=False)


# ---- a clique no prompt can reach ----------------------------------------------------------------------
@pytest.mark.parametrize("config_name, overrides, fix", [
    # the default candidates=all: the filter still runs, and flags nothing
    ("audit", ["sampling.samples_per_prompt=4"], "filter.min_clique=4"),
    ("audit", ["model=sd15", "filter.min_clique=20"], "filter.min_clique=16"),  # another model's 16 samples
    ("audit", ["budget=adaptive", "sampling.samples_per_prompt=4", "budget.rounds=[2,4]"], "filter.min_clique=4"),
    ("nightly", ["sampling.samples_per_prompt=4", "budget.rounds=[2,4]"], "filter.min_clique=4"),
    ("audit", ["match.candidates=cliques", "sampling.samples_per_prompt=4"], "filter.min_clique=4"),
])
def test_a_clique_no_prompt_can_reach_is_refused_whenever_the_filter_runs(config_name, overrides, fix):
    """Refused only with match.candidates=cliques: with candidates=all (the default) 4 samples against the demo's
    clique of 5 was accepted, and no prompt could be flagged, so a low-complexity picture's route through a
    flagged clique (one copying generation in it) never applied, without a word."""
    with pytest.raises(ConfigError) as e:
        compose(overrides, config_name=config_name)
    msg = str(e.value)
    assert "filter.min_clique" in msg and "sampling.samples_per_prompt" in msg and fix in msg, msg
    assert "no prompt can be flagged" in msg, msg
    compose([*overrides, fix], config_name=config_name)


def test_a_clique_of_any_size_passes_without_a_filter_stage():
    """prompts=none (an unconditional model's one prompt) runs no filter: its min_clique is not read."""
    compose(["model=demo_uncond", "prompts=none", "match=relative", "sampling.samples_per_prompt=4"],
            config_name="audit")


@pytest.mark.parametrize("config_name", ["audit", "nightly"])
@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "sampling").glob("*.yaml")))
def test_every_sampling_option_reaches_the_demo_filters_clique(config_name, option):
    """sampling=fast took 4 samples a prompt, below filter=demo's clique of 5: `memex audit sampling=fast` is
    refused by the check above unless the option itself samples enough."""
    extra = ["resources.device=cuda"] if option == "paper" else []  # float16
    cfg = compose([f"sampling={option}", *extra], config_name=config_name)
    assert cfg.sampling.samples_per_prompt >= cfg.filter.min_clique
