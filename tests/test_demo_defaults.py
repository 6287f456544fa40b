"""The shipped demo's defaults (model=demo, trainset=demo, conf/tune/*_demo.yaml) kept on another model: memex
nightly of other checkpoints matched them against the demo's logos, and memex audit model.path=<another model>
audited it with the demo's name, kind and tuning. Refused before any work now, naming the options to give."""

from __future__ import annotations

import pytest

from memex.config import ConfigError, ModelKind
from memex.models import ModelError, check_kind

from conftest import REPO, compose

DEMO = REPO / "demo" / "models" / "demo-text"
SD_NIGHT = ["nightly=default", "nightly.location=/fsx/train/sd15-ft", "nightly.base_model=/fsx/models/sd15",
            "storage=s3", "storage.root=s3://b/memex-runs", "resources=gpu"]  # README's one-job command, as it was


def test_nightly_of_other_checkpoints_refuses_the_demos_training_set(tmp_path):
    """trainset=demo is the demo's training_manifest.parquet, and memex nightly replaces model.* per checkpoint but
    never trainset.path: every checkpoint of another training run was matched against the demo's 256 logos (~0
    extracted, the gate passed). Under model=sd15 the default derived a relative path from its hub id."""
    for overrides in (SD_NIGHT, [*SD_NIGHT, "model.kind=latent_text"],  # the kind a kind refusal asked for
                      ["nightly.location=/fsx/pipelines", "nightly.base_model=/fsx/models/sd15"]):  # nightly=demo
        with pytest.raises(ConfigError, match=r"^trainset.path=.*demo/models/demo-text/training_manifest.parquet is "
                                              r"the demo's training set .* model=local \(or their option, e.g. "
                                              r"model=sd15\) trainset=manifest trainset.path=<the training set of "
                                              r"these checkpoints>$"):
            compose(overrides, config_name="nightly")
    # another model's option: its model.path is a hub id that nightly throws away, with no training_manifest.parquet
    with pytest.raises(ConfigError, match=r"^trainset.path=stable-diffusion-v1-5/stable-diffusion-v1-5/training_"
                                          r"manifest.parquet does not exist: .* model.path=stable-diffusion-v1-5/"
                                          r"stable-diffusion-v1-5, a hub id .* trainset=manifest trainset.path="):
        compose([*SD_NIGHT, "model=sd15"], config_name="nightly")
    with pytest.raises(ConfigError, match=r"does not exist: .* which holds none"):
        compose([*SD_NIGHT, "model=local", f"model.path={tmp_path}"], config_name="nightly")
    # what runs: the documented command, a `memex train` output (its manifest beside it), the demo's own nightly
    # (its folder or one below it) and copies of the demo's run on the demo model (nightly=demo's base_model)
    given = compose([*SD_NIGHT, "model=sd15", "trainset=manifest", "trainset.path=s3://b/train.parquet"],
                    config_name="nightly")
    assert given.trainset.path == "s3://b/train.parquet" and given.sampling.guidance_scale == 7.5
    (tmp_path / "training_manifest.parquet").write_bytes(b"")
    trained = compose([*SD_NIGHT, "model=local", f"model.path={tmp_path}"], config_name="nightly")
    assert trained.trainset.path == f"{tmp_path}/training_manifest.parquet"
    demo = compose([], config_name="nightly")
    assert demo.trainset.path == f"{DEMO}/training_manifest.parquet"
    compose([f"nightly.location={REPO / 'demo' / 'checkpoints' / 'demo-text-run'}"], config_name="nightly")
    copies = compose([f"nightly.location={tmp_path / 'watch'}"], config_name="nightly")
    assert copies.nightly.base_model == str(DEMO)


def test_audit_model_path_under_the_demo_option_is_refused(tmp_path):
    """model.path=<another model> without model=local kept model=demo's name, kind (pixel_text) and tuning (80
    samples x 10 steps, guidance 3, 2 copies of a picture); model.kind=latent_text, the preflight's advice, went
    deeper into it."""
    (tmp_path / "sd15-ft").mkdir()
    common = ["trainset=manifest", "trainset.path=s3://b/train.parquet"]
    for path in (tmp_path / "sd15-ft", "someone/sd15-ft"):  # a folder, a hub id
        for extra in ([], ["model.kind=latent_text"]):
            with pytest.raises(ConfigError, match=rf"^model.path={path} is set, and the model option is still "
                                                  r"model=demo, the shipped demo's \(model=demo is the default\): "
                                                  r".* add model=local"):
                compose([f"model.path={path}", *common, *extra], config_name="audit")
    with pytest.raises(ConfigError, match=r"model=demo_uncond, the shipped demo's"):
        compose(["model=demo_uncond", "prompts=none", "match=relative", f"model.path={tmp_path / 'sd15-ft'}",
                 *common], config_name="audit")
    local = compose(["model=local", f"model.path={tmp_path / 'sd15-ft'}", *common], config_name="audit")
    assert (local.model.name, local.sampling.samples_per_prompt, local.sampling.guidance_scale) == ("local", 16, 7.5)
    # the demo itself: no overrides, its own path given, the unconditional demo
    assert compose([], config_name="audit").sampling.samples_per_prompt == 80
    compose([f"model.path={DEMO}"], config_name="audit")
    compose(["model=demo_uncond", "prompts=none", "match=relative"], config_name="audit")


def test_a_rematch_of_a_run_made_under_the_demo_option_with_another_path_is_not_refused(tmp_path):
    """A run folder memex generate made with model.path=<another model> under model=demo (it allows that: it has no
    demo tuning), or an audit made so before the refusal, records model.name=demo. Its re-match loads no model
    and must give the source's model.*: the refusal left no override that could, and stranded the generations."""
    (tmp_path / "m").mkdir()
    source = compose([f"model.path={tmp_path / 'm'}", "model.kind=latent_text"])  # memex generate, as it recorded
    again = compose(["run.samples_from=demo-x", f"model.path={tmp_path / 'm'}", "model.kind=latent_text",
                     "trainset=manifest", "trainset.path=s3://b/train.parquet"], config_name="audit")
    assert (again.model.name, again.model.path) == (source.model.name, source.model.path) == ("demo",
                                                                                             str(tmp_path / "m"))


def test_the_kind_refusal_names_model_local_when_the_kind_is_the_demos():
    """The preflight's kind refusal said only `set model.kind=latent_text`: under model=demo (the default) that
    kept the demo's name and tuning on the other model."""
    with pytest.raises(ModelError, match=r"^model.kind=pixel_text \(the kind of model=demo, a shipped demo's option, "
                                         r"unless you set it; model=demo is the default: .* give model=local, .*\) "
                                         r"but /ckpt/sd15-ft holds a latent_text model "
                                         r"\(model_index.json\): set model.kind=latent_text \(or auto\)$"):
        check_kind("/ckpt/sd15-ft", ModelKind.pixel_text, ModelKind.latent_text, True)
    with pytest.raises(ModelError, match=r"^model.kind=latent_text but"):  # no demo option's kind: as before
        check_kind("/ckpt/x", ModelKind.latent_text, ModelKind.pixel_text, True)
    with pytest.raises(ModelError, match=r"^model.kind=pixel_text but"):  # a demo model's own folder
        check_kind(str(DEMO.parent / "demo-uncond"), ModelKind.pixel_text, ModelKind.unconditional, False)
