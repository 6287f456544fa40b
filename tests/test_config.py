import dataclasses
import shlex
import subprocess
import sys
import typing

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from memex import cli
from memex import config as C
from memex.cli import CONF_DIR
from memex.config import AuditConfig, ConfigError, DistanceKind, GenerateConfig, ModelKind, PromptSource, SchedulerKind

from conftest import BIN, REPO, compose

GROUPS = ["model", "sampling", "prompts", "storage", "resources"]
FILL = ["model.path=/some/model", "prompts.path=/some/prompts.txt"]  # values left ??? on purpose


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))])
def test_every_group_option_composes(group, option):
    # mandatory values (???) in an option are filled the way a user would
    if (group, option) == ("prompts", "near_duplicates"):  # needs the audit's index
        with pytest.raises(ConfigError, match="memex audit"):
            compose([f"{group}={option}"] + FILL)
        return
    # prompts=none reads no prompt file: a prompts.path there is refused (test_prompt_settings_...)
    fill = FILL[:1] if (group, option) == ("prompts", "none") else FILL
    cfg = compose([f"{group}={option}"] + fill)
    assert isinstance(cfg, GenerateConfig)


AUDIT_GROUPS = GROUPS + ["filter", "trainset", "embedder", "index", "match", "triage", "budget"]
AUDIT_FILL = ["model.path=/some/model", "trainset.path=/data/train.parquet"]


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in AUDIT_GROUPS
                                          for p in sorted((CONF_DIR / g).glob("*.yaml"))])
def test_every_audit_group_option_composes(group, option):
    # sampling options made for `memex generate` may take fewer samples than a clique needs
    fix = ["sampling.samples_per_prompt=16"] if group == "sampling" else []
    fix += ["embedder.path=/models/sscd.pt"] if (group, option) == ("embedder", "sscd") else []  # no default model
    # the prompts options that read a file need one (the audit's default ranks its trainset's captions)
    fix += ["prompts.path=/some/prompts.txt"] if group == "prompts" and option in ("file", "captions") else []
    cfg = compose([f"{group}={option}"] + AUDIT_FILL + fix, config_name="audit")
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
    extra += ["match.candidates=cliques"] if override.startswith("sampling.samples_per_prompt") else []
    with pytest.raises((ConfigError, ValidationError, ConfigCompositionException)) as e:
        compose([override] + extra, config_name="audit")
    assert key in str(e.value) or key in str(e.value.__cause__)


def test_default_config_is_the_demo():
    cfg = compose([])
    assert cfg.model.name == "demo" and cfg.model.kind == ModelKind.pixel_text
    assert cfg.model.path.endswith("demo/models/demo-text")
    assert cfg.prompts.source == PromptSource.file
    assert cfg.storage.root == "runs" and cfg.resources.num_gpus == 0


@pytest.fixture(autouse=True)
def memex_bucket(monkeypatch):
    """storage=s3 reads $MEMEX_BUCKET where no storage.root is given (conf/storage/s3.yaml)."""
    monkeypatch.setenv("MEMEX_BUCKET", "test-bucket")


def test_overrides_reach_typed_fields():
    cfg = compose(["sampling.samples_per_prompt=500", "sampling.scheduler=ddim", "model=sd15", "storage=s3"])
    assert cfg.sampling.samples_per_prompt == 500
    assert cfg.sampling.scheduler == SchedulerKind.ddim
    assert cfg.model.kind == ModelKind.latent_text
    assert cfg.storage.root == "s3://test-bucket/runs"


def test_storage_s3_without_a_root_or_bucket_is_refused(monkeypatch):
    """storage=s3 without storage.root or $MEMEX_BUCKET fell back on s3://memex-runs/runs: a bucket of that
    name is someone else's (S3 names are global), and a Ray job never carries the laptop's $MEMEX_BUCKET.
    Now refused, naming the key; --help shows the key as unset instead of failing."""
    monkeypatch.delenv("MEMEX_BUCKET")
    with pytest.raises(ConfigError, match=r"^storage.root cannot be resolved \(.*MEMEX_BUCKET.*\): add storage.root="):
        compose(["storage=s3"])
    assert compose(["storage=s3", "storage.root=s3://mine/runs"]).storage.root == "s3://mine/runs"
    pairs = dict(cli.common_defaults("audit", cli.compose_config("audit", ["storage=s3"])))
    assert pairs["storage.root"] == "s3://${oc.env:MEMEX_BUCKET}/runs (unset: give storage.root=...)"


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
    ("resources.pixel_cache_mb=-1", "resources.pixel_cache_mb"),
    ("prompts.path=null", "prompts.path"),
    ("run.name=a/b", "run.name"),
    ("storage.lease_timeout_s=0", "storage.lease_timeout_s"),
    ("storage.lease_wait_s=-1", "storage.lease_wait_s"),
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


@pytest.mark.parametrize("args, line", [
    (["sampling.seed=0,1"], "memex: error: sampling.seed=0,1 is a sweep (one run per value): add --multirun (-m) "
                            "to run them all; a list is sampling.seed=[0,1], a string with commas is quoted: "
                            "sampling.seed='0,1'"),
    (["-m", "--cfg", "job", "sampling.seed=0,1"], "memex: error: --multirun and --cfg cannot be combined: give one"),
])
def test_cli_a_sweep_without_multirun_and_clashing_modes_are_one_line(args, line, tmp_path):
    """A comma in a value is a Hydra sweep: without --multirun Hydra printed six lines and no `memex:
    error:`; --multirun with --cfg was Hydra's ValueError traceback. Refused before any work."""
    r = subprocess.run([str(BIN / "memex"), "audit", *args, f"storage.root={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and line in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())


# ---- one source of defaults: the dataclasses in memex/config.py -----------------------------
PRIMARIES = {"generate": (C.GenerateConfig, cli.to_generate_config), "audit": (C.AuditConfig, cli.to_audit_config),
             "nightly": (C.NightlyAuditConfig, cli.to_nightly_config), "train": (C.TrainConfig, cli.to_train_config),
             "mia": (C.MiaConfig, cli.to_mia_config)}
# each group's default option: its YAML adds nothing to the group's dataclass defaults
DEFAULT_OPTION = {"model": "local", "sampling": "default", "prompts": "file", "storage": "local", "resources": "local",
                  "filter": "default", "trainset": "manifest", "embedder": "pixels", "index": "flat", "match": "tiled",
                  "nightly": "default", "arch": "text_small", "data": "manifest", "trainer": "demo",
                  "triage": "auto", "budget": "fixed", "tracker": "none", "mia": "default"}


def _raw(config_name: str, overrides=(), hydra_cfg: bool = False):
    """The composed DictConfig, not converted (??? and ${...} left as they are)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra_cfg)


def _home(group: str) -> str:
    """The first primary (generate, audit, nightly, train) whose schema has this group."""
    return next(p for p, (cls, _) in PRIMARIES.items() if group in {f.name for f in dataclasses.fields(cls)})


def _group_class(group: str) -> type:
    return typing.get_type_hints(PRIMARIES[_home(group)][0])[group]


def _options(group: str) -> list[str]:
    return [p.stem for p in sorted((CONF_DIR / group).glob("*.yaml"))]


# conf/preset/ and conf/tune/ are the groups without a dataclass or default option: a preset or a model's
# audit tuning (`# @package _global_`) sets several groups at once (tests/test_documented_commands.py
# checks preset=paper's values and tune/audit_demo.yaml's).
ALL_GROUPS = sorted(d.name for d in CONF_DIR.iterdir()
                    if d.is_dir() and any(d.glob("*.yaml")) and d.name not in ("preset", "tune"))


def test_every_group_has_a_default_option_and_a_dataclass():
    assert sorted(DEFAULT_OPTION) == ALL_GROUPS
    for group, option in DEFAULT_OPTION.items():
        assert option in _options(group), (group, option)
        assert dataclasses.is_dataclass(_group_class(group)), group


@pytest.mark.parametrize("group", ALL_GROUPS)
def test_default_option_is_the_dataclass_defaults(group):
    cls, option = _group_class(group), DEFAULT_OPTION[group]
    assert not OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), "the default option's file must be empty"
    expected = OmegaConf.structured(cls())
    for primary, (schema, _) in PRIMARIES.items():
        if group not in {f.name for f in dataclasses.fields(schema)}:
            continue
        # ~tune: the demo model's tuning (conf/tune/audit_demo.yaml, nightly_demo.yaml) sets sampling and match
        # keys on top
        composed = _raw(primary, [f"{group}={option}", *(["~tune"] if primary in ("audit", "nightly") else [])])[group]
        assert (OmegaConf.to_container(composed, resolve=False)
                == OmegaConf.to_container(expected, resolve=False)), primary


@pytest.mark.parametrize("group,option", [(g, o) for g in ALL_GROUPS for o in _options(g) if o != DEFAULT_OPTION[g]])
def test_option_lists_only_the_keys_it_changes(group, option):
    """An option is merged onto the schema (not onto the default option), so a key equal to the
    dataclass default adds nothing and is a second copy of that default. A ??? adds nothing either:
    Hydra does not merge ??? over a value the schema sets, and over the schema's ??? it is a copy."""
    defaults = dataclasses.asdict(_group_class(group)())
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), resolve=False)
    assert raw, f"{group}/{option}.yaml changes nothing: drop it or make it the default"
    for key, value in raw.items():
        assert key in defaults, f"{group}/{option}.yaml: unknown key {key}"
        # sampling=paper states the paper's 50 steps and guidance 7.5: a model's tuning (conf/tune/) changes them
        assert value != defaults[key] or (group, option, key) in (("sampling", "paper", "num_inference_steps"),
                                                                 ("sampling", "paper", "guidance_scale")), \
            f"{group}/{option}.yaml restates {key}: {value!r} (the default)"
        assert value != "???", f"{group}/{option}.yaml: {key}: ??? does nothing in an option"


def _scalars_reached(raw: dict, typed) -> None:
    for key, value in raw.items():
        if isinstance(value, (dict, list)) or (isinstance(value, str) and ("${" in value or value == "???")):
            continue
        assert getattr(typed, key) == value, key


def _missing(node, prefix: str = "") -> list[str]:
    """Keys left ??? (without resolving interpolations that point at them)."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _missing(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "???" else []


NEEDS_PATH = {("prompts", "file"): "prompts.path", ("prompts", "captions"): "prompts.path",
              ("embedder", "sscd"): "embedder.path", ("tracker", "tensorboard"): "tracker.log_dir"}


# 87 compositions, ~22 s: the full suite's; the unit tier composes every option once per group
# (test_every_group_option_composes, test_every_audit_group_option_composes)
@pytest.mark.slow
@pytest.mark.parametrize("primary,group,option", [(p, g, o) for p, (cls, _) in PRIMARIES.items()
                                                  for g in ALL_GROUPS if g in {f.name for f in dataclasses.fields(cls)}
                                                  for o in _options(g)])
def test_every_option_converts_to_the_typed_config(primary, group, option):
    cls, convert = PRIMARIES[primary]
    overrides = [f"{group}={option}"]
    # values left ??? on purpose are filled the way a user would
    missing = _missing(OmegaConf.to_container(_raw(primary, overrides), resolve=False))
    overrides += [f"{key}=/some/{key}" for key in missing]
    if (primary, group, option) == ("generate", "prompts", "near_duplicates"):  # needs the audit's index
        with pytest.raises(ConfigError, match="memex audit"):
            convert(_raw(primary, overrides))
        return
    if primary in ("audit", "nightly") and group == "sampling":
        # every sampling option reaches filter=demo's clique of 5 (fewer samples are refused: no prompt could be
        # flagged, whatever match.candidates)
        assert convert(_raw(primary, overrides)).sampling.samples_per_prompt >= 5
    n = OmegaConf.load(CONF_DIR / group / f"{option}.yaml").get("samples_per_prompt") if group == "sampling" else None
    if primary == "nightly" and n is not None and n <= 4:
        # nightly samples in rounds that end at samples_per_prompt (conf/budget/adaptive.yaml): 4 gives [4, 4]
        with pytest.raises(ConfigError, match=r"budget\.rounds must increase .*sampling\.samples_per_prompt=4"):
            convert(_raw(primary, overrides))
        overrides.append(f"budget.rounds=[1,{n}]")
    elif primary == "nightly" and n is not None:
        assert convert(_raw(primary, overrides)).budget.rounds == [4, n]
    if (primary, group) == ("nightly", "model") and not option.startswith("demo"):
        # trainset=demo derives its path from a model.path that nightly replaces per checkpoint: refused
        with pytest.raises(ConfigError, match=r"does not exist: trainset=demo \(the default\) reads"):
            convert(_raw(primary, overrides))
        overrides += ["trainset=manifest", "trainset.path=/some/train.parquet"]
    if (primary, group, option) == ("nightly", "nightly", "default"):
        # the demo's training set (trainset=demo, the default) for checkpoints that are not the demo's: refused
        with pytest.raises(ConfigError, match=r"is the demo's training set .* trainset=manifest"):
            convert(_raw(primary, overrides))
        overrides += ["trainset=manifest", "trainset.path=/some/train.parquet"]
    if (group, option) in NEEDS_PATH:  # optional in the schema, required by this option: validation names it
        with pytest.raises(ConfigError, match=NEEDS_PATH[group, option].replace(".", r"\.")):
            convert(_raw(primary, overrides))
        overrides.append(f"{NEEDS_PATH[group, option]}=/some/file")
    typed = convert(_raw(primary, overrides))
    assert isinstance(typed, cls) and isinstance(getattr(typed, group), _group_class(group))
    _scalars_reached(OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml")), getattr(typed, group))


@pytest.mark.parametrize("primary", PRIMARIES)
def test_primaries_share_one_hydra_block(primary):
    raw = OmegaConf.load(CONF_DIR / f"{primary}.yaml")
    assert "hydra" not in raw and "memex_hydra" in raw.defaults
    assert not any("hydra/" in str(d) for d in raw.defaults)  # the job_logging override lives in memex_hydra
    h = _raw(primary, hydra_cfg=True).hydra
    assert (h.run.dir, h.output_subdir, h.job.chdir) == (".", None, False)
    assert h.runtime.choices["hydra/job_logging"] == "stdout"
    assert h.job_logging.handlers.console.stream == "ext://sys.stdout"


def test_only_memex_hydra_sets_hydra():
    files = sorted(CONF_DIR.rglob("*.yaml"))
    setting = [p.name for p in files if "hydra" in OmegaConf.load(p) or "hydra/" in p.read_text()]
    assert setting == ["memex_hydra.yaml"]


@pytest.mark.parametrize("embedder,value,expected", [
    ("clip", "0.05", r"index\.dup_threshold=0\.05 does not fit embedder clip \(metric ip\).*cosine similarity"
                     r".*\[0\.5, 1\.0\)"),
    ("sscd", "1.0", r"index\.dup_threshold=1\.0 does not fit embedder sscd .*\[0\.5, 1\.0\)"),
    ("pixels", "0.95", r"index\.dup_threshold=0\.95 does not fit embedder pixels \(metric l2\).*RMS.*\(0\.0, 0\.5\]"),
])
def test_dup_threshold_outside_the_embedders_metric_names_the_key(embedder, value, expected):
    """A cosine threshold of 0.05 (a distance) would make every image a copy of every other: refused up front."""
    with pytest.raises(ConfigError, match=expected):
        compose([*_embedder(embedder), f"index.dup_threshold={value}"], config_name="audit")


def _embedder(kind: str) -> list[str]:
    return [f"embedder={kind}"] + ([] if kind == "pixels" else ["embedder.path=x"])  # pixels loads no model


@pytest.mark.parametrize("embedder,default", [("pixels", 0.05), ("sscd", 0.95), ("clip", 0.95)])
def test_dup_threshold_default_resolves_per_embedder(embedder, default):
    from memex.index import EMBEDDER_METRIC, resolve_dup_threshold

    cfg = compose([*_embedder(embedder)], config_name="audit")
    assert cfg.index.dup_threshold is None  # null: the embedder's own default
    assert resolve_dup_threshold(cfg.index.dup_threshold, EMBEDDER_METRIC[embedder], embedder) == default
    valid = "0.1" if embedder == "pixels" else "0.9"  # an explicit value in the metric's range is kept
    cfg = compose([*_embedder(embedder), f"index.dup_threshold={valid}"], config_name="audit")
    assert cfg.index.dup_threshold == float(valid)


def test_dup_k_below_two_names_the_key():
    with pytest.raises(ConfigError, match=r"index\.dup_k must be >= 2"):
        compose(["index.dup_k=1"], config_name="audit")


@pytest.mark.parametrize("overrides,key", [
    (["budget=adaptive", "budget.rounds=[4,4]"], "budget.rounds must increase"),  # rounds that do not increase
    (["budget=adaptive", "budget.rounds=[8,4]"], "budget.rounds must increase"),
    (["budget=adaptive", "budget.rounds=[]"], "budget.rounds is empty"),
    (["budget=adaptive", "budget.rounds=[0,4]"], "budget.rounds[0]"),  # a budget below one round
    (["budget=adaptive", "match.candidates=cliques"], "match.candidates=all"),
    (["budget=adaptive", "budget.continue_factor=0.5"], "budget.continue_factor"),
    # adaptive on a text model: the last round is a prompt's budget, so a different samples_per_prompt
    # would be ignored (rounds of one's own that end elsewhere); conf/budget/adaptive.yaml's end at it
    (["budget=adaptive", "budget.rounds=[4,16]", "sampling.samples_per_prompt=500"], "budget.rounds=[4,500]"),
    (["budget=adaptive", "budget.rounds=[8,16]", "sampling.samples_per_prompt=4"], "sampling.samples_per_prompt=16"),
    (["budget=adaptive", "sampling.samples_per_prompt=4"], "rounds end at sampling.samples_per_prompt=4"),
    # settings the budget in force does not read fail instead of being ignored
    (["budget.rounds=[4,2]"], "budget.rounds is set, but budget=fixed"),
    (["budget.rounds=[4,32]"], "add budget=adaptive"),
    (["budget.continue_factor=2.0"], "budget.continue_factor is set"),
    (["budget.continue_triage_z=null"], "budget.continue_triage_z is set"),
    (["model=demo_uncond", "prompts=none", "match=relative", "budget=adaptive", "budget.rounds=[2,8]"],
     "an unconditional model (prompts=none) keeps the fixed budget"),
    (["triage=noise_norm", "model=demo_uncond", "prompts=none"], "triage=auto"),  # triage on an unconditional model
    (["triage=preview", "model=demo_uncond", "prompts=none"], "triage=auto"),
    (["triage=preview", "match=relative"], "match=tiled"),  # its distance is compared with match.threshold
    (["triage.steps=51"], "triage.steps"),
    (["sampling.guidance_scale=-2"], "sampling.guidance_scale must be >= 0"),  # ran as no guidance, silently
    (["triage.seeds=0"], "triage.seeds"),
    (["match.min_generations=0"], "match.min_generations"),
    (["match.max_margin=1.5"], "match.max_margin"),
    (["match.max_margin=0"], "match.max_margin"),
    (["sampling.dtype=float16", "resources.device=cpu"], "sampling.dtype=float16 needs a GPU"),
    (["index.nlist=4096"], "index.nlist is set, and index=flat"),  # IVF-PQ's, ignored by the exact index
    (["embedder.path=/models/sscd.pt"], "embedder.path is set, and embedder=pixels"),
    (["match.n_neighbors=8"], "match.n_neighbors is set, and match.distance=tiled_l2"),  # relative l2's
    (["match=relative", "match.max_margin=0.5"], "match.max_margin is set, and match.distance=relative_l2"),
    (["triage=none", "triage.keep=5"], "triage.keep"),
    (["triage=none", "triage.seeds=8"], "triage.seeds is set"),  # ignored otherwise
    # triage=auto is off on an unconditional model: its settings were ignored without a word
    # preset=paper sets prompts.limit after the prompts option: the fix is an override, which the message names
    (["preset=paper", "model=demo_uncond", "prompts=none", "match=relative"], "add prompts.limit=null (a preset"),
    (["model=demo_uncond", "prompts=none", "match=relative", "triage.keep=5"],
     "triage.keep is set, and an unconditional model (prompts=none) has no prompts to score"),
    (["preset=paper", "triage.steps=2"], "triage.steps is set"),
    # the filter is skipped for one prompt: every sample was generated, then match failed on every rerun
    (["preset=paper", "model=demo_uncond", "prompts=none", "prompts.limit=null", "match=relative"],
     "match.candidates=cliques verifies the filter's cliques, and prompts=none"),
    (["triage.keep=0"], "triage.keep"),
    # relative l2 is at most 1 / alpha: every generation was a copy of its nearest picture
    (["match=relative", "match.alpha=1.5"], "every generation would count as a copy"),
    (["match=relative", "match.threshold=2.5"], "every generation would count as a copy"),
    (["match=relative", "match.alpha=0"], "match.alpha=0.0 must be > 0"),
    (["filter.max_expansions=-1"], "filter.max_expansions"),  # the clique search raised it after generation
    # 0 or below extended half the prompts or more (and every prompt when the scores had no spread)
    (["budget=adaptive", "budget.continue_triage_z=0"], "budget.continue_triage_z must be > 0"),
    (["budget=adaptive", "triage=none", "budget.continue_triage_z=1.5"], "budget.continue_triage_z is set, and "
     "triage=none"),
    (["model.path=s3://b/ckpt/step-20000"], "model.path=s3://b/ckpt/step-20000: models are read from a local"),
    (["model.lora=s3://b/lora"], "model.lora=s3://b/lora: models are read"),  # was "no such folder" on each node
    (["run.name=.."], "run.name must be a plain folder name"),  # wrote into storage.root's parent
    (["run.name=."], "run.name must be a plain folder name"),
    (["run.name=_index"], "run.name=_index is the folder memex keeps the membership indexes"),
])
def test_triage_and_budget_settings_that_cannot_work_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        compose(overrides, config_name="audit")
    assert key in str(e.value)


@pytest.mark.parametrize("config_name,overrides,key", [
    # `prompts.source=none` keeps the demo's prompt file (a field override, not the group option)
    ("generate", ["prompts.source=none"], "prompts.path is set, and prompts.source=none"),
    ("generate", ["prompts=none", "prompts.limit=4"], "prompts.limit is set"),
    ("generate", ["prompts.caption_column=text"], "prompts.caption_column is set, and prompts.source=file"),
    ("generate", ["prompts=captions", "prompts.path=/d/m.parquet", "prompts.column=text"], "prompts.column is set"),
    ("audit", ["prompts.path=/some/prompts.txt"], "prompts.path is set, and prompts.source=near_duplicates"),
    ("audit", ["prompts.caption_column=text"], "trainset.caption_column"),  # the audit ranks its trainset's
])
def test_prompt_settings_the_source_does_not_read_name_the_key(config_name, overrides, key):
    with pytest.raises(ConfigError) as e:
        compose(overrides + ["model.path=/some/model", "trainset.path=/d/t.parquet"][: 1 + (config_name == "audit")],
                config_name=config_name)
    assert key in str(e.value)
    # the same keys under the source that reads them compose
    if config_name == "generate":
        compose(["prompts=captions", "prompts.path=/d/m.parquet", "prompts.caption_column=text", "model.path=/m"])
        compose(["prompts=file", "prompts.path=/d/p.jsonl", "prompts.column=text", "prompts.id_column=id",
                 "model.path=/m"])


def test_nightly_refuses_a_sample_count_its_adaptive_budget_would_ignore():
    # memex nightly runs budget=adaptive, whose rounds end at samples_per_prompt (conf/budget/adaptive.yaml):
    # sampling=paper's 500 gives [4, 500]; rounds of one's own that end elsewhere are refused
    assert compose(["sampling=paper", "resources.device=cuda"], config_name="nightly").budget.rounds == [4, 500]
    with pytest.raises(ConfigError, match=r"budget.rounds\[-1\]=16"):
        compose(["sampling=paper", "resources.device=cuda", "budget.rounds=[4,16]"], config_name="nightly")
    cfg = compose(["sampling=paper", "resources.device=cuda", "budget.rounds=[50,500]"], config_name="nightly")
    assert cfg.budget.rounds[-1] == cfg.sampling.samples_per_prompt == 500
    assert compose(["sampling=paper", "resources.device=cuda", "budget=fixed"], config_name="nightly")


def test_triage_auto_and_the_adaptive_budget_are_for_text_models():
    from memex.config import adaptive
    from memex.stages.triage import triage_on

    uncond = ["model=demo_uncond", "prompts=none", "match=relative"]
    assert triage_on(compose([], config_name="audit"))
    assert not triage_on(compose(uncond, config_name="audit"))
    assert not triage_on(compose(["triage=none"], config_name="audit"))
    # memex nightly runs the adaptive budget; an unconditional model keeps the fixed one
    assert adaptive(compose([], config_name="nightly"))
    assert not adaptive(compose(uncond, config_name="nightly")) and not adaptive(compose([], config_name="audit"))


@pytest.mark.parametrize("overrides, stage", [
    ([], False),  # samples 0..3 of every prompt carry the scores for free
    (["budget=adaptive"], False),  # the first round's 4 samples are the triage's 4 seeds
    (["triage.keep=5"], True),  # prompts ranked before any generation
    (["triage.steps=2"], True),  # generation records the first step only
    (["sampling.guidance_scale=1"], True),  # no guidance: no free score
    (["budget=adaptive", "budget.rounds=[2,80]"], True),  # fewer first-round samples than triage.seeds
    (["triage=none"], False),
    (["triage=preview"], True),  # previews are not the run's samples
])
def test_the_triage_stage_runs_only_when_the_samples_cannot_give_its_scores(overrides, stage):
    from memex.stages.triage import needs_stage

    assert needs_stage(compose(overrides, config_name="audit")) is stage


# ---- keys outside the schema, whatever their prefix (issue 14) ------------------------------
TYPO = "sampling.sample_per_prompt is not a setting; did you mean sampling.samples_per_prompt?"


@pytest.mark.parametrize("primary", ["generate", "audit", "nightly"])
@pytest.mark.parametrize("prefix", ["+", "++"])
def test_an_added_key_outside_the_schema_is_refused_naming_the_nearest(primary, prefix):
    """`+key=` opens Hydra's struct mode: the key used to be added, ignored, and the default run."""
    with pytest.raises(ConfigError) as e:
        compose([f"{prefix}sampling.sample_per_prompt=5"], config_name=primary)
    assert str(e.value) == TYPO


@pytest.mark.parametrize("override,primary,message", [
    ("+sampeling.samples_per_prompt=3", "audit",
     "sampeling.samples_per_prompt is not a setting; did you mean sampling.samples_per_prompt?"),
    ("++nightly.budgt=2", "nightly", "nightly.budgt is not a setting; did you mean nightly.budget?"),
    ("+trainer.step=10", "train", "trainer.step is not a setting; did you mean trainer.steps?"),
    ("+run.nme=x", "generate", "run.nme is not a setting; did you mean run.name?"),
    ("+zzz=1", "generate", "zzz is not a setting (the settings are under model, prompts, resources, run, sampling, "
                           "storage; --cfg job prints them all)"),
])
def test_unknown_key_message_names_the_key_and_the_nearest_valid_one(override, primary, message):
    extra = ["output=/tmp/never"] if primary == "train" else []
    with pytest.raises(ConfigError) as e:
        compose([override, *extra], config_name=primary)
    assert str(e.value) == message


def test_free_form_options_still_take_any_added_key():
    """storage.options and data.storage_options go to fsspec/s3fs as they are: any key is theirs."""
    cfg = compose(["+storage.options.endpoint_url=http://minio:9000", "++storage.options.anon=true"])
    assert cfg.storage.options == {"endpoint_url": "http://minio:9000", "anon": True}
    cfg = compose(["+storage.options.client_kwargs.region_name=eu-west-1"], config_name="audit")
    assert cfg.storage.options == {"client_kwargs": {"region_name": "eu-west-1"}}
    tcfg = compose(["+data.storage_options.anon=true", "output=/tmp/never"], config_name="train")
    assert tcfg.data.storage_options == {"anon": True}
    assert compose(["++sampling.samples_per_prompt=5"]).sampling.samples_per_prompt == 5  # a real key: a change


@pytest.mark.parametrize("stage", ["generate", "audit", "nightly", "train"])
@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_cli_refuses_a_key_outside_the_schema_in_one_line(stage, prefix, monkeypatch, capsys, tmp_path):
    """The command line is checked before Hydra composes: Hydra's own message for `key=` advises
    `+key=`, which it would then accept. One line, the same for every prefix and entry point."""
    key = "trainer.step" if stage == "train" else "sampling.sample_per_prompt"
    monkeypatch.setattr(sys, "argv", ["memex", stage, f"{prefix}{key}=5", f"storage.root={tmp_path}/runs"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"memex: error: {key} is not a setting; did you mean {key}s?"
                                if stage == "train" else f"memex: error: {TYPO}"]
    assert not (tmp_path / "runs").exists()


def test_cli_override_check_leaves_groups_hydra_and_options_to_hydra():
    cli.check_overrides(["sampling=fast", "+preset=paper", "hydra.verbose=true", "--cfg", "job", "~run.name",
                         "+storage.options.key=abc", "model.path=/m", "data.duplication=[]"], C.AuditConfig)


@pytest.mark.parametrize("kind", ["sscd", "clip"])
def test_an_embedder_kind_without_its_option_is_refused_naming_the_option(kind):
    """`embedder.kind=sscd` kept the pixels embedder's size 32: SSCD embedded 32 px images without a word."""
    with pytest.raises(C.ConfigError, match=rf"^embedder.kind={kind} keeps the pixels embedder's embedder.size of 32 "
                                            rf".*choose the option embedder={kind}"):
        cli.check_overrides([f"embedder.kind={kind}", "embedder.path=/m/e.pt"], C.AuditConfig)
    for fine in ([f"embedder={kind}", "embedder.path=/m/e.pt"], [f"embedder.kind={kind}", "embedder.size=288"]):
        cli.check_overrides(fine, C.AuditConfig)


@pytest.mark.parametrize("stage, override, message, good", [
    ("audit", "index.kind=foo", "index.kind=foo is not a choice: use one of flat, ivfpq", "ivfpq"),
    ("mia", "mia.attacks=[loss,bar]", "mia.attacks=bar is not a choice: use one of loss, pia, secmi", "[loss,pia]"),
    ("train", "arch.kind=unconditionl", "arch.kind=unconditionl is not a choice: use one of unconditional, pixel_text",
     "unconditional"),
    # a group option that does not exist (Hydra: twelve lines, the config search path included)
    ("audit", "sampling=fats", "sampling=fats is not an option of sampling: use one of default, fast, "
     "paper", "fast"),
    ("nightly", "+preset=papr", "preset=papr is not an option of preset: use one of paper", "paper"),
    # a value of the wrong type (Hydra: six lines of "Error merging override")
    ("audit", "sampling.samples_per_prompt=1.5", "sampling.samples_per_prompt=1.5 is not a whole number", "'16'"),
    ("generate", "sampling.guidance_scale=high", "sampling.guidance_scale=high is not a number", "1e1"),
    ("train", "data.resize=maybe", "data.resize=maybe is not true or false", "no"),
    ("audit", "sampling.samples_per_prompt=null", "sampling.samples_per_prompt cannot be null: give a whole number",
     "3"),
    ("nightly", "nightly.budget=abc", "nightly.budget=abc is not a whole number", "null"),  # Optional: null is fine
    # one value for a list (Hydra: six lines of "Invalid value assigned: int is not a ListConfig")
    ("audit", "budget.rounds=4", "budget.rounds=4 is not a list: give it in brackets, budget.rounds=[4] (or more "
     "items, comma-separated)", "[4,16]"),
    ("mia", "mia.attacks=loss", "mia.attacks=loss is not a list: give it in brackets, mia.attacks=[loss] (or more "
     "items, comma-separated)", "[loss]"),
    ("train", "data.duplication=3", "data.duplication=3 is not a list: give a list of entries with keys copies, "
     'count, ids, quoted for the shell, e.g. "data.duplication=[{copies: ..., count: ...}]"',
     "[{copies: 2, count: 1}]"),
])
def test_cli_names_a_value_that_is_not_a_choice_in_one_line(stage, override, message, good, monkeypatch, capsys):
    """A value outside an enum's choices, a group option that does not exist, a value of the wrong
    type: one line naming the key and what it takes (each was a multi-line Hydra error ending on
    HYDRA_FULL_ERROR)."""
    monkeypatch.setattr(sys, "argv", ["memex", stage, override])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1 and capsys.readouterr().err.splitlines() == [f"memex: error: {message}"]
    key = override.split("=")[0]
    # a valid value passes, and interpolations and sweeps (with --multirun) are left to Hydra
    cli.check_overrides(["-m", f"{key}={good}", f"{key}=${{oc.env:X,flat}}", f"{key}={good},{good}"],
                        cli.SCHEMAS[stage])


@pytest.mark.parametrize("stage, override, reason", [
    # a Hive-partitioned path: "mismatched input '=' expecting <EOF>" was the whole message
    ("audit", "trainset.path=s3://lake/laion/date=2026-12-01/part-0.parquet", "mismatched input '='"),
    ("generate", "prompts.path=/data/prompts (copy).txt", "mismatched input ' ('"),
    ("train", "data.path=/data/données/train.parquet", "token recognition error at: 'é'"),
    ("mia", "members.path=/data/it's/members.parquet", "token recognition error"),
])
def test_an_override_hydra_cannot_parse_is_named_with_its_quoted_form(stage, override, reason, monkeypatch, capsys):
    """A value Hydra's override grammar stops at (=, a space, brackets, a non-ASCII letter, a quote):
    one line naming the override and the quoted form, which then reads back the same value."""
    monkeypatch.setattr(sys, "argv", ["memex", stage, override])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 1 and len(err) == 1
    assert err[0].startswith(f"memex: error: cannot read the override {override}: {reason}")
    fix = shlex.split(err[0].split("the override for the shell: ")[1])
    assert len(fix) == 1
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parsed = OverridesParser.create().parse_override(fix[0])
    key, value = override.split("=", 1)
    assert (parsed.key_or_group, parsed.value()) == (key, value)
    cli.check_overrides(fix, cli.SCHEMAS[stage])


def test_a_key_and_value_given_as_two_arguments_are_named_as_such(monkeypatch, capsys):
    """`memex audit match.threshold 0.1` (a space, not =): the fix said "quote its value", which does
    not help. It names the one-argument form."""
    monkeypatch.setattr(sys, "argv", ["memex", "audit", "match.threshold", "0.1"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 1 and len(err) == 1
    assert err[0].startswith("memex: error: cannot read the override match.threshold: ")
    assert err[0].endswith("give the setting and its value as one argument, match.threshold=<value> "
                           "(no space around =)")


def test_job_entry_point_refuses_an_added_unknown_key(tmp_path):
    r = subprocess.run([sys.executable, "jobs/audit.py", "+sampling.sample_per_prompt=5", f"storage.root={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == f"memex: error: {TYPO}"
    assert not any(tmp_path.iterdir())


# a protocol fsspec does not know, or whose package is missing (gs:// needs gcsfs, az:// adlfs), was an
# ImportError or ValueError traceback from inside the stage for these keys (trainset.path and the mia
# sets named it, "cannot be reached"); now every URI key is checked when the config is read
@pytest.mark.parametrize("config_name,overrides,key", [
    ("generate", ["storage.root=gs://b/runs"], "storage.root"),
    ("generate", ["prompts=file", "prompts.path=foo://b/p.txt"], "prompts.path"),
    ("generate", ["storage.root=simplecache::gs://b/runs"], "storage.root"),  # each protocol of a chain
    ("audit", ["index.root=az://c/index"], "index.root"),
    ("audit", ["trainset.path=foo://b/t.parquet"], "trainset.path"),
    ("nightly", ["nightly.ledger=gs://b/ledger"], "nightly.ledger"),
    ("train", ["data.path=gs://b/t.parquet", "output=/tmp/out"], "data.path"),
    ("mia", ["members.path=gs://b/m", "nonmembers.path=/d/n"], "members.path"),
    ("mia", ["members.path=/d/m", "nonmembers.path=/d/n", "queries.path=foo://q"], "queries.path"),
])
def test_a_uri_no_installed_filesystem_reads_names_the_key(config_name, overrides, key):
    with pytest.raises(ConfigError) as e:
        compose(overrides, config_name=config_name)
    msg = str(e.value)
    assert msg.startswith(f"{key}="), msg
    assert ("needs a package that is not installed" in msg) or ("fsspec knows no protocol foo://" in msg), msg
    # the protocols memex ships with pass the same check
    good = [o.replace("gs://", "s3://").replace("az://", "s3://").replace("foo://", "s3://") for o in overrides]
    compose(good, config_name=config_name)


def test_cli_names_an_uninstalled_protocol_in_one_line(tmp_path):
    r = subprocess.run([str(BIN / "memex"), "generate", "storage.root=gs://bucket/runs"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith("memex: error: storage.root=gs://bucket/runs: gs:// needs a package"), r.stderr
    assert "gcsfs" in r.stderr and "Traceback" not in r.stderr and "HYDRA_FULL_ERROR" not in r.stderr
    assert not any(tmp_path.iterdir())  # nothing written, not even a log


@pytest.mark.parametrize("config_name", ["generate", "audit", "mia"])
def test_a_run_name_outside_storage_root_is_refused_by_every_command(config_name):
    """run.name=.. wrote run.json, samples/ and report/ into storage.root's parent (the checkout, by
    default); memex mia did not check run.name at all."""
    extra = ["members.path=/d/m", "nonmembers.path=/d/n"] if config_name == "mia" else []
    with pytest.raises(ConfigError, match="run.name must be a plain folder name"):
        compose([*extra, "run.name=.."], config_name=config_name)
    compose([*extra, "run.name=my-run"], config_name=config_name)


def test_preset_paper_composes_with_relative_l2():
    """preset=paper switches the distinct-copy margin off (match.max_margin=null); with match=relative,
    which never reads it, that is no setting to refuse (it was refused as "match.max_margin is set")."""
    cfg = compose(["preset=paper", "match=relative"], config_name="audit")
    assert cfg.match.max_margin is None and cfg.match.distance.value == "relative_l2"


@pytest.mark.parametrize("override, message", [
    ("sampling.dtype=float16", "resources.num_gpus=0 gives each Ray actor none"),
    ("resources.device=cuda", "resources.device=cuda, and resources.num_gpus=0"),
])
def test_a_gpu_setting_with_ray_actors_given_no_gpu_is_refused_before_any_work(tmp_path, override, message):
    """A Ray actor given no GPU (resources.num_gpus=0, the default resources) runs on the CPU, so
    float16 sampling or resources.device=cuda failed at the first sampler actor, after the index was
    built (`preset=paper model=sd15` without resources=gpu). Refused by the audit and by generate
    before any work; nothing is written. The config itself still composes (a laptop composes configs
    for a GPU cluster), and resources=gpu is accepted."""
    from memex.stages import audit, generate

    for stage, config_name in ((audit.run, "audit"), (generate.prepare, "generate")):
        cfg = compose([f"storage.root={tmp_path / 'runs'}", override], config_name=config_name)
        with pytest.raises(ConfigError, match=message):
            stage(cfg)
        assert not (tmp_path / "runs").exists()
    ok = compose([f"storage.root={tmp_path / 'runs'}", override, "resources=gpu"], config_name="audit")
    from memex.config import check_actor_devices

    check_actor_devices(ok.resources, ok.sampling.dtype)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for a machine with no GPU")
def test_float16_on_the_local_executor_of_a_machine_with_no_gpu_is_refused_before_any_work(tmp_path):
    """resources.executor=local samples in this process: check_actor_devices let it through (it looked at
    Ray actors only), and float16 failed at the sampler, after the index build and run.json."""
    from memex.stages import audit, generate

    for stage, config_name in ((audit.run, "audit"), (generate.prepare, "generate")):
        cfg = compose([f"storage.root={tmp_path / 'runs'}", "resources.executor=local", "sampling.dtype=float16"],
                      config_name=config_name)
        with pytest.raises(ConfigError, match=r"sampling.dtype=float16 needs a GPU, and this machine has none "
                                              r"\(resources.executor=local samples here\)"):
            stage(cfg)
        assert not (tmp_path / "runs").exists()


def test_a_models_audit_tuning_is_its_own_and_yields_to_an_option_or_a_key():
    """conf/tune/audit_<model>.yaml tunes the audit of that model only (audit.yaml's `optional tune:
    audit_${model}`): the demo's 80 samples at 10 steps and 2 copying generations reached every
    `memex audit` when they were the sampling and match defaults, a Stable Diffusion checkpoint's PNDM at
    10 steps included. Another model keeps the groups' settings; a sampling option or preset, or a key,
    wins over the tuning; memex nightly has none."""
    def got(overrides, name="audit"):
        c = compose(overrides, config_name=name)
        return c.sampling.samples_per_prompt, c.sampling.num_inference_steps, c.match.min_generations

    assert got([]) == (80, 10, 2)
    assert got(["model=sd15"]) == got(["model=local", "model.path=/ckpt"]) == (16, 50, 1)
    assert got(["model=demo_uncond", "prompts=none", "match=relative"]) == (16, 50, 1)
    assert got(["preset=paper"]) == (500, 50, 1)
    assert got(["~tune"]) == (16, 50, 1)  # the tuning dropped (conf/README.md); an empty option keeps it
    assert got(["sampling=default", "match=tiled"]) == (80, 10, 2)
    assert got(["sampling=fast"])[:2] == (8, 10) and got(["sampling.num_inference_steps=25"])[1] == 25
    assert got([], "nightly") == (16, 50, 1)


def test_nightly_on_an_unconditional_model_takes_any_sample_count():
    """conf/budget/adaptive.yaml ends its rounds at sampling.samples_per_prompt; an unconditional model keeps
    the fixed budget, and its check of keys it does not read took those rounds for the user's: memex
    nightly on one was refused at any sample count but 16."""
    cfg = compose(["model=demo_uncond", "prompts=none", "match=relative", "sampling.samples_per_prompt=8"],
                  config_name="nightly")
    assert cfg.budget.rounds == [4, 8] and cfg.sampling.samples_per_prompt == 8
    with pytest.raises(ConfigError, match=r"budget.rounds is set, but an unconditional model"):
        compose(["model=demo_uncond", "prompts=none", "match=relative", "budget.rounds=[2,8]",
                 "sampling.samples_per_prompt=8"], config_name="nightly")
