import json
import os
import re
import shutil
import sys

import pytest

from memex import tiny
from memex.config import ModelKind, SchedulerKind
from memex.models import SCHEDULERS, ModelError, check_local_checkpoint, load_model, make_scheduler
from memex.tiny import SD15_SCHEDULER


@pytest.mark.parametrize("kind", tiny.KINDS)
def test_tiny_model_round_trips_through_from_pretrained(tiny_models, kind):
    m = load_model(tiny_models[kind])
    assert m.kind == ModelKind(kind)
    assert m.model_id == tiny_models[kind]
    files = {f for _, _, fs in os.walk(tiny_models[kind]) for f in fs}
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pkl", ".pt")) for f in files)  # never pickle


def test_tiny_grayscale_model_round_trips(tmp_path):
    m = load_model(str(tiny.build("unconditional", tmp_path / "gray", channels=1)))
    assert m.kind == ModelKind.unconditional and m.pipe.unet.config.in_channels == 1
    with pytest.raises(ValueError, match="only the unconditional tiny model"):
        tiny.build("latent_text", tmp_path / "x", channels=1)


@pytest.mark.parametrize("kind", list(SCHEDULERS), ids=[k.value for k in SCHEDULERS])
def test_every_scheduler_kind_builds_from_sd15s_config(kind):
    s = make_scheduler(SD15_SCHEDULER, kind, "sd")
    assert type(s).__name__ == SCHEDULERS[kind]
    assert s.config.beta_schedule == "scaled_linear" and s.config.num_train_timesteps == 1000  # the model's schedule
    assert type(make_scheduler({**SD15_SCHEDULER, "_class_name": SCHEDULERS[kind]}, SchedulerKind.default)) is type(s)
    assert set(SCHEDULERS) == set(SchedulerKind) - {SchedulerKind.default}  # every option has a class


def test_unknown_scheduler_class_names_the_path_and_the_fix():
    with pytest.raises(ModelError, match=r"model.path=/ckpt: its scheduler config names 'FancyScheduler', which memex "
                                         r"does not sample with \(sampling.scheduler=default\); set "
                                         r"sampling.scheduler=<kind>, one of ddim, ddpm, pndm, euler"):
        make_scheduler({"_class_name": "FancyScheduler"}, SchedulerKind.default, "/ckpt")


def test_declared_kind_must_match(tiny_models):
    with pytest.raises(ModelError, match=r"model.kind=latent_text but .* holds a pixel_text model \(\w+\): "
                                         r"set model.kind=pixel_text \(or auto\)$"):
        load_model(tiny_models["pixel_text"], ModelKind.latent_text)
    with pytest.raises(ModelError, match=r"holds an unconditional model \(DDPMPipeline\): set "
                                         r"model.kind=unconditional \(or auto\) with prompts=none$"):
        load_model(tiny_models["unconditional"], ModelKind.pixel_text)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"model.path=.*nowhere: no such folder"):
        load_model(str(tmp_path / "nowhere"))


def test_folder_without_model_index(tmp_path, tiny_models):
    with pytest.raises(ModelError, match=r"has no model_index.json: not a diffusers pipeline folder \(save one"):
        check_local_checkpoint(str(tmp_path))
    # the two likely slips name the folder meant: a pipeline's component, a folder of pipelines
    pipe = tiny_models["latent_text"]
    with pytest.raises(ModelError, match=rf"unet has no model_index.json: not a diffusers pipeline folder but the "
                                         rf"unet component of one: set model.path={re.escape(pipe)}, the pipeline"):
        check_local_checkpoint(os.path.join(pipe, "unet"))
    root = os.path.dirname(pipe)  # tiny_models: one folder per family
    with pytest.raises(ModelError, match=r"; it holds 3 pipeline folder\(s\): latent_text, pixel_text, unconditional "
                                         rf"\(set model.path={re.escape(os.path.join(root, 'latent_text'))}, say\)"):
        check_local_checkpoint(root)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_component_folder_is_named(tiny_models, tmp_path):
    path = _copy(tiny_models["latent_text"], tmp_path / "m")
    shutil.rmtree(os.path.join(path, "vae"))
    with pytest.raises(ModelError, match="lists component 'vae' but folder .*vae is missing"):
        load_model(path)


def test_missing_weights_are_named(tiny_models, tmp_path):
    path = _copy(tiny_models["unconditional"], tmp_path / "m")
    os.remove(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelError, match="component 'unet' .* has no weights"):
        load_model(path)


def test_corrupt_model_index_is_named(tiny_models, tmp_path):
    path = _copy(tiny_models["unconditional"], tmp_path / "m")
    with open(os.path.join(path, "model_index.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ModelError, match="model_index.json is not valid JSON"):
        load_model(path)


def test_truncated_weights_fail_with_the_path(tiny_models, tmp_path):
    path = _copy(tiny_models["pixel_text"], tmp_path / "m")
    w = os.path.join(path, "unet", "diffusion_pytorch_model.safetensors")
    with open(w, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ModelError, match=r"m/unet/diffusion_pytorch_model\.safetensors is truncated"):
        load_model(path)  # found by the header check, before diffusers reads anything (tests/test_preflight.py)


def test_tokenizer_saves_and_loads_offline(tmp_path):
    from transformers import CLIPTokenizer

    tiny.build_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    ids = tok("a red apple").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "aredapple"
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 16


def test_device_cuda_where_the_worker_sees_no_gpu_names_the_key_and_why(monkeypatch):
    """resources.device=cuda with no GPU visible failed at the first .to() with torch's "Torch not
    compiled with CUDA enabled". Each cause gets its fix; Ray hides the GPUs from a worker that asked
    for none (CUDA_VISIBLE_DEVICES=""), the usual one on a GPU node. The GPU is hidden by hand here."""
    import torch

    from memex.config import ConfigError
    from memex.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    for cuda, visible, why, fix in [
            (None, None, "torch here is a CPU build", "install a CUDA build of torch"),
            ("12.4", "", 'CUDA_VISIBLE_DEVICES=""', "set resources.num_gpus=1"),
            ("12.4", None, "torch finds no CUDA device", "run it on a GPU node")]:
        monkeypatch.setattr(torch.version, "cuda", cuda)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        with pytest.raises(ConfigError) as e:
            resolve_device("cuda")
        assert str(e.value).startswith(f"resources.device=cuda, but this worker sees no GPU ({why}): {fix}")
        assert str(e.value).endswith("or set resources.device=auto (a GPU where one is visible, else the CPU)")


def _device_in_a_worker_given_no_gpu(requested: str) -> str:
    """resolve_device in a Ray task that asked for no GPU, on a node whose GPU it can see (Ray 2.60 no
    longer hides it: ray #54868; torch.cuda.is_available is made True here, the node has none)."""
    import torch

    from memex.models import resolve_device

    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        return resolve_device(requested)
    except Exception as e:  # noqa: BLE001 - its message, back to the test
        return f"{type(e).__name__}: {e}"
    finally:  # the worker stays in the session's pool and runs other tests' tasks
        torch.cuda.is_available = real


def test_a_ray_worker_given_no_gpu_runs_on_the_cpu_though_it_sees_one(ray_head):
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES as it is for a worker that asked for num_gpus=0, so on a GPU node
    resources.device=auto took the GPU Ray had not reserved (several actors to one GPU, out of memory), and
    device=cuda with num_gpus=0 was not refused. A worker given no GPU now runs on the CPU; cuda is refused,
    naming resources.num_gpus. Outside Ray (the driver, resources.executor=local) auto still finds the GPU."""
    import ray
    import torch
    from ray import cloudpickle

    from memex.models import resolve_device

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    task = ray.remote(num_gpus=0, num_cpus=0.5)(_device_in_a_worker_given_no_gpu)
    assert ray.get(task.remote("auto")) == "cpu"
    assert ray.get(task.remote("cuda")) == ("ConfigError: resources.device=cuda, but Ray gave this worker no GPU "
                                            "(resources.num_gpus=0): set resources.num_gpus=1 (resources=gpu), or "
                                            "resources.device=auto to run on the CPU")
    real = torch.cuda.is_available
    try:
        torch.cuda.is_available = lambda: True  # the driver is no Ray worker: the GPU it sees is its own
        assert resolve_device("auto") == "cuda"
    finally:
        torch.cuda.is_available = real


def _device_in_a_worker(requested: str) -> tuple[str, str | None]:
    import os

    from memex.models import resolve_device

    return resolve_device(requested), os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.mark.gpu
def test_on_a_gpu_node_a_ray_worker_gets_the_gpu_only_when_it_reserved_one(ray_head):
    """The rule above on a real GPU node (the CPU test fakes torch.cuda.is_available): a worker that asked
    for num_gpus=1 runs on the GPU Ray gave it, one that asked for none on the CPU, whatever it sees."""
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    given = ray.get(ray.remote(num_gpus=1, num_cpus=0.5)(_device_in_a_worker).remote("auto"))
    assert given[0] == "cuda" and given[1] not in (None, ""), given
    assert ray.get(ray.remote(num_gpus=0, num_cpus=0.5)(_device_in_a_worker).remote("auto"))[0] == "cpu"


def _with_safety_checker(src: str, dst) -> str:
    """The SD 1.x hub layout: the tiny latent text model plus a (tiny) CLIP safety checker and its
    feature extractor, listed in model_index.json as stable-diffusion-v1-5 lists them."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=dict(small, vocab_size=1000),
                                                      vision_config=dict(small, image_size=32, patch_size=4),
                                                      projection_dim=32)).eval()
    base = StableDiffusionPipeline.from_pretrained(src)
    parts = {k: getattr(base, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    features = CLIPImageProcessor(size=32, crop_size=32)
    StableDiffusionPipeline(**parts, safety_checker=checker, feature_extractor=features,
                            requires_safety_checker=True).save_pretrained(dst, safe_serialization=True)
    index = json.loads((dst / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    return str(dst)


def test_the_safety_checker_is_neither_loaded_nor_read(tiny_models, tmp_path):
    """memex samples with the UNet, scheduler, VAE and text encoder only and must see raw images: an
    SD 1.x folder's safety checker (1.2 GB, CLIP ViT-L/14) was loaded onto every actor's device
    anyway. Now it is passed as None (nothing loaded, nothing downloaded from the hub), and its
    weights are not checked: damaged, the model still loads and samples the same images."""
    import numpy as np

    from memex.config import SamplingConfig
    from memex.models import check_model_inputs
    from memex.sampling import Sampler

    path = _with_safety_checker(tiny_models["latent_text"], tmp_path / "sd")
    m = load_model(path)
    assert m.kind == ModelKind.latent_text
    assert m.pipe.safety_checker is None and m.pipe.feature_extractor is None
    assert m.pipe.config.requires_safety_checker is False
    weights = next((tmp_path / "sd" / "safety_checker").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: reading it would fail
    assert check_model_inputs(path) == ModelKind.latent_text
    gen = SamplingConfig(num_inference_steps=2, batch_size=2)
    ours = Sampler(load_model(path), gen).generate(["p", "p"], ["a red logo"] * 2, [1, 2])
    plain = Sampler(load_model(tiny_models["latent_text"]), gen).generate(["p", "p"], ["a red logo"] * 2, [1, 2])
    assert all(np.array_equal(a, b) for a, b in zip(ours, plain))

    # the checker's folders deleted (1.2 GB), model_index.json left listing them, as people trim SD 1.5:
    # refused as "lists component 'safety_checker' but folder ... is missing", though nothing reads them
    import shutil

    for name in ("safety_checker", "feature_extractor"):
        shutil.rmtree(tmp_path / "sd" / name)
    assert check_model_inputs(path) == ModelKind.latent_text
    trimmed = Sampler(load_model(path), gen).generate(["p", "p"], ["a red logo"] * 2, [1, 2])
    assert all(np.array_equal(a, b) for a, b in zip(trimmed, plain))


def test_a_hub_ids_unused_components_come_from_its_cached_index(tiny_models, tmp_path, monkeypatch):
    """A hub id: its cached model_index.json decides, as a folder's does; not downloaded yet, every
    unused component is passed as None (reading the index first would be a request that, offline,
    retries for ~23 s), so SD 1.5's 1.2 GB safety checker is not downloaded either."""
    import huggingface_hub.constants

    from memex.models import UNUSED_COMPONENTS, _unused_components

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    everything = {**dict.fromkeys(UNUSED_COMPONENTS), "requires_safety_checker": False}
    assert _unused_components("some-org/not-cached", None) == everything
    repo = tmp_path / "hub" / "models--some-org--sd"
    sha = "0" * 40
    _with_safety_checker(tiny_models["latent_text"], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    listed = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    assert _unused_components("some-org/sd", None) == listed
    assert _unused_components(str(repo / "snapshots" / sha), None) == listed
    assert _unused_components(tiny_models["latent_text"], None) == {}  # saved with none of them
