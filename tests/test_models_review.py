"""memex/models.py's checks where a reviewer found them silent: a hub id checked only on the worker, models
whose noise schedule is not DDPM's, a text encoder saved with transformers 4, a model.variant of a hub
id, a hub LoRA repo as model.path, a pipeline folder without its scheduler config. No network: the hub
is a fake cache (huggingface_hub.constants.HF_HUB_CACHE) or a faked model-info answer."""

from __future__ import annotations

import json
import os
import re
import shutil
from types import SimpleNamespace

import pytest

from memex.config import ModelKind, SchedulerKind
from memex.models import SCHEDULERS, ModelError, check_local_checkpoint, check_model_inputs, load_model, make_scheduler


def _cache(monkeypatch, root) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))


def _snapshot(root, repo_id: str, sha: str):
    """The folder a cached snapshot of `repo_id` lives in (refs/main pointing at it)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return repo / "snapshots" / sha


def _tiny_unet2d(**config):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8,
                       **config)


def test_a_vq_decoded_pipeline_not_cached_at_the_check_is_refused_when_loaded(tmp_path, monkeypatch):
    """An LDMPipeline (its latents decoded by a vqvae) given as a hub id with no snapshot on the driver, nor
    on a worker before its download: check_sampled_pipeline, which reads model_index.json, never ran; its
    UNet2DModel passed as `unconditional` and the undecoded latents were saved as the pictures (the audit
    found nothing, without a word). The loaded pipeline is refused with the same words."""
    from diffusers import DDIMScheduler, LDMPipeline, VQModel

    import memex.models as models

    _cache(monkeypatch, tmp_path / "hub")
    vq = VQModel(block_out_channels=(8,), norm_num_groups=8, latent_channels=3, num_vq_embeddings=16,
                 down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    LDMPipeline(vqvae=vq, unet=_tiny_unet2d(), scheduler=DDIMScheduler()).save_pretrained(
        _snapshot(tmp_path / "hub", "org/ldm", "a" * 40))
    refusal = (r"^model.path=org/ldm \(LDMPipeline\) decodes its latents with a vqvae \(a VQ autoencoder\)"
               r".*memex samples")
    with pytest.raises(ModelError, match=refusal):  # cached: refused from its configs, as before
        check_model_inputs("org/ldm")
    monkeypatch.setattr(models, "cached_snapshot", lambda *a, **k: None)  # not cached when checked (HF_HUB_OFFLINE)
    assert check_model_inputs("org/ldm") is None  # deferred to the load
    with pytest.raises(ModelError, match=refusal):
        load_model("org/ldm")


def _score_sde(path):
    """A tiny Score-SDE VE pipeline (google/ncsnpp-*'s layout): a fourier-time UNet2DModel, ScoreSdeVeScheduler."""
    from diffusers import ScoreSdeVePipeline, ScoreSdeVeScheduler

    ScoreSdeVePipeline(unet=_tiny_unet2d(time_embedding_type="fourier"),
                       scheduler=ScoreSdeVeScheduler()).save_pretrained(path)
    return str(path)


def test_models_whose_noise_schedule_is_not_ddpms_are_refused_not_sampled_with_a_ddpm_solver(tiny_models, tmp_path,
                                                                                              monkeypatch):
    """A Score-SDE VE model (fourier time embedding, ScoreSdeVeScheduler), a consistency model or an EDM
    scheduler: the refusal said "set sampling.scheduler=<kind> (the model's noise schedule is kept)", false
    there: a solver built from a config without betas runs diffusers' default linear ones (ddpm, ddim,
    euler: NaN images blamed on the weights; dpm_multistep: noise saved without a word). Refused, naming
    the class and that memex samples DDPM-family models only; every scheduler memex samples still builds."""
    import diffusers

    import memex.models as models
    from memex.models import check_scheduler

    ve = _score_sde(tmp_path / "ncsnpp")
    unet_refusal = (rf"^model.path={re.escape(ve)} \(ScoreSdeVePipeline\): its UNet is a score-SDE variance-exploding "
                    r"model \(time_embedding_type='fourier'.*DDPM-family \(variance-preserving\) models only")
    with pytest.raises(ModelError, match=unet_refusal):
        check_model_inputs(ve)
    with pytest.raises(ModelError, match=r"model.unet=.*unet: the UNet is a score-SDE variance-exploding"):
        check_model_inputs(tiny_models["unconditional"], os.path.join(ve, "unet"))
    monkeypatch.setattr(models, "check_model_inputs", lambda *a, **k: None)  # a hub id not cached: the loaded UNet
    with pytest.raises(ModelError, match=r"its UNet is a score-SDE variance-exploding model"):
        load_model(ve)
    monkeypatch.undo()

    # the schedule alone, on a UNet memex samples: refused for every solver, before any work
    sde = str(shutil.copytree(tiny_models["unconditional"], tmp_path / "sde_schedule"))
    ve_config = os.path.join(ve, "scheduler", "scheduler_config.json")
    shutil.copy(ve_config, os.path.join(sde, "scheduler", "scheduler_config.json"))
    for kind in (SchedulerKind.default, SchedulerKind.ddpm, SchedulerKind.dpm_multistep):
        with pytest.raises(ModelError, match=rf"model.path={re.escape(sde)}: its scheduler config names "
                                             r"'ScoreSdeVeScheduler', a variance-exploding, EDM or consistency "
                                             r"schedule .*DDPM-family \(variance-preserving\) models only"):
            check_scheduler(sde, None, kind, 10)
    def saved(cls: str) -> dict:  # a scheduler_config.json as save_pretrained writes it (loaded: the same keys)
        return {**getattr(diffusers, cls)().config, "_class_name": cls}

    for cls in ("CMStochasticIterativeScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"):
        config = saved(cls)
        for kind in (SchedulerKind.default, SchedulerKind.ddim, SchedulerKind.euler):
            with pytest.raises(ModelError, match=rf"names '{cls}', a variance-exploding, EDM or consistency") as e:
                make_scheduler(config, kind, "/ckpt")
            assert "schedule is kept" not in str(e.value)

    # every scheduler memex samples with, from its own saved config: still taken, and by every solver
    for cls in SCHEDULERS.values():
        config = saved(cls)
        assert type(make_scheduler(config, SchedulerKind.default)).__name__ == cls
        assert type(make_scheduler(config, SchedulerKind.ddim)).__name__ == "DDIMScheduler"
    # a DDPM-family class memex does not step (LCM): the schedule-kept advice holds, and is given
    lcm = saved("LCMScheduler")
    with pytest.raises(ModelError, match=r"set sampling.scheduler=<kind>, .*\(the model's noise schedule is kept"):
        make_scheduler(lcm, SchedulerKind.default, "/ckpt")
    assert type(make_scheduler(lcm, SchedulerKind.ddim)).__name__ == "DDIMScheduler"


def _transformers_4_text_encoder(src, dst, intermediate_size=None) -> str:
    """A copy of `src` whose text encoder is keyed as transformers 4 saved it (text_model.encoder...)."""
    from safetensors.torch import load_file, save_file

    path = str(shutil.copytree(src, dst))
    weights = os.path.join(path, "text_encoder", "model.safetensors")
    sd = load_file(weights)
    save_file({"text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}, weights,
              metadata={"format": "pt"})
    if intermediate_size is not None:
        config = os.path.join(path, "text_encoder", "config.json")
        with open(config) as f:
            c = json.load(f)
        c["intermediate_size"] = intermediate_size
        with open(config, "w") as f:
            json.dump(c, f)
    return path


def test_a_transformers_4_text_encoder_of_the_wrong_shape_is_refused_before_load(tiny_models, tmp_path):
    """A text encoder saved with transformers 4 names its tensors text_model.encoder..., transformers 5
    builds encoder...: no name met, so no shape was compared, and a text encoder whose weights disagree with
    its config.json passed the check (the load failed in every sampler). Compared without the prefix."""
    import torch

    base = tiny_models["latent_text"]
    with open(os.path.join(base, "text_encoder", "config.json")) as f:
        width = json.load(f)["intermediate_size"]
    bad = _transformers_4_text_encoder(base, tmp_path / "bad", intermediate_size=2 * width)
    with pytest.raises(ModelError, match=rf"^model.path={re.escape(bad)}: tensor 'text_model\.encoder\.layers\.0"
                                         rf"\.mlp\.fc1\.bias' in .*model\.safetensors has shape \[{width}\] but "
                                         rf".*config\.json makes a CLIPTextModel that needs \[{2 * width}\]"):
        check_model_inputs(bad)
    good = _transformers_4_text_encoder(base, tmp_path / "good")
    assert check_model_inputs(good) == ModelKind.latent_text
    ours, plain = (load_model(p).pipe.text_encoder.state_dict() for p in (good, base))
    assert ours.keys() == plain.keys() and all(torch.equal(ours[k], plain[k]) for k in plain)


def test_model_variant_of_a_cached_hub_id_is_checked_on_its_snapshot(tiny_models, tmp_path, monkeypatch):
    """model.variant was checked on local folders only: a cached hub base with a model.unet saved as the
    variant alone was asked for the variant and failed in every actor ("no such modeling files"), and a
    variant no component has passed the check. Both are judged by the cached snapshot, as a folder is."""
    from diffusers import UNet2DConditionModel

    _cache(monkeypatch, tmp_path / "hub")
    shutil.copytree(tiny_models["latent_text"], _snapshot(tmp_path / "hub", "org/plain", "b" * 40))
    unet = str(tmp_path / "unet_fp16")
    UNet2DConditionModel.from_pretrained(os.path.join(tiny_models["latent_text"], "unet")).save_pretrained(
        unet, variant="fp16")
    assert check_model_inputs("org/plain", unet, variant="fp16") == ModelKind.latent_text
    m = load_model("org/plain", unet=unet, variant="fp16")
    assert m.kind == ModelKind.latent_text and m.model_id == f"org/plain+unet={unet}"
    with pytest.raises(ModelError, match=r"^model.variant=fp16 but no component of model.path=org/plain has fp16 "
                                         r"weights .*\(its snapshot cached at .*snapshots/b{40}; .*"
                                         r"DiffusionPipeline.download\('org/plain', variant='fp16'\)\): leave "
                                         r"model.variant unset"):
        check_model_inputs("org/plain", variant="fp16")
    # online, the load completes a snapshot cached without the variant from the hub, which decides: not refused here
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert check_model_inputs("org/plain", variant="fp16") == ModelKind.latent_text


def test_a_hub_lora_repo_as_model_path_is_named_a_lora(tmp_path, monkeypatch):
    """A LoRA repo (diffusers' LoRA scripts push pytorch_lora_weights.safetensors) given as model.path was
    called a single-file checkpoint, with from_single_file advice; it names model.lora, as a local file does."""
    import huggingface_hub
    import huggingface_hub.constants

    _cache(monkeypatch, tmp_path / "hub")  # nothing cached: the hub is asked
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    repos = {"someone/logo-lora": ["README.md", "pytorch_lora_weights.safetensors", "image_0.png"],
             "someone/single": ["README.md", "v1-5-pruned-emaonly.safetensors"]}
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **k: SimpleNamespace(
        gated=False, siblings=[SimpleNamespace(rfilename=n) for n in repos[repo_id]]))
    with pytest.raises(ModelError, match=r"^model.path=someone/logo-lora: the hub model has no model_index.json, so "
                                         r"it is not a diffusers pipeline; its pytorch_lora_weights.safetensors is a "
                                         r"LoRA: set model.lora=someone/logo-lora and model.path to its base model"):
        check_model_inputs("someone/logo-lora")
    with pytest.raises(ModelError, match=r"v1-5-pruned-emaonly.safetensors is a single-file checkpoint"):
        check_model_inputs("someone/single")


def test_an_uncached_hub_vq_pipeline_is_refused_from_its_file_list(tmp_path, monkeypatch):
    """An LDM pipeline (a vqvae/ folder) asked of the hub is refused by its file list, before any download: it
    was refused only when each worker had downloaded and loaded it."""
    import huggingface_hub
    import huggingface_hub.constants

    _cache(monkeypatch, tmp_path / "hub")  # nothing cached: the hub is asked
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vqvae/config.json", "vqvae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"]
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **k: SimpleNamespace(
        gated=False, siblings=[SimpleNamespace(rfilename=n) for n in files]))
    with pytest.raises(ModelError, match=r"^model.path=org/ldm-celebahq decodes its latents with a vqvae"):
        check_model_inputs("org/ldm-celebahq")


def test_a_pipeline_folder_without_its_scheduler_config_is_refused_naming_it(tiny_models, tmp_path):
    """scheduler/ without scheduler_config.json passed every check before the cluster work (the scheduler
    checks read no config and said nothing); every sampler's load failed. Refused, naming the file."""
    path = str(shutil.copytree(tiny_models["latent_text"], tmp_path / "m"))
    os.remove(os.path.join(path, "scheduler", "scheduler_config.json"))
    message = (rf"^model.path={re.escape(path)}: component 'scheduler' in .*m/scheduler has no "
               r"scheduler_config.json \(the model's noise schedule\)")
    with pytest.raises(ModelError, match=message):
        check_local_checkpoint(path)
    with pytest.raises(ModelError, match=message):
        check_model_inputs(path)
