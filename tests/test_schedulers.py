"""Every scheduler memex offers, against diffusers' own pipelines: same model, seeds, noise, guidance.

The reference is the pipeline's `__call__` with the scheduler swapped in the documented way
(`cls.from_config(pipe.scheduler.config)`), fed the noise the Sampler draws: one CPU generator per
sample seeded with the sample seed; the initial latents drawn from it as `Sampler._initial_noise`
does, and the same (now advanced) generators passed as `generator=`, so ancestral schedulers draw
their step noise from where the sampler's do. The pipeline runs the same batch shape (batch_size
samples of one prompt), so the pixels agree exactly, not just to within 1/255.

StableDiffusionPipeline (the latent_text tiny model) drives every scheduler: it scales model
inputs, multiplies by init_noise_sigma and passes `generator` only where `step` takes one.
DDPMPipeline (the unconditional tiny model) does none of that: it passes `generator` to every
`step` (a TypeError for PNDM, LMS, Heun, UniPC, DEIS, KDPM2) and skips the sigma scaling that the
Euler/LMS/Heun/KDPM2 families need, so it is a valid reference only for the sigma-free schedulers
whose `step` takes a generator (ddpm, ddim, dpm_multistep, dpm_singlestep); the unconditional model
is checked with the other schedulers for batch invariance (tests/test_sampling.py).
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from memex import tiny
from memex.config import SamplingConfig, SchedulerKind
from memex.images import encode_png
from memex.models import SCHEDULERS, ModelError, load_model, make_scheduler
from memex.sampling import Sampler, sample_seed, takes_generator

# every scheduler against the diffusers pipeline itself: real pipelines, ~20 s in all
pytestmark = pytest.mark.slow

KINDS = [k for k in SchedulerKind if k != SchedulerKind.default]
PROMPT = "a red apple"
STEPS, GUIDANCE, BATCH = 4, 3.0, 3


def _seeds(n=BATCH, pid="p1"):
    return [sample_seed(0, pid, i) for i in range(n)]


def _as_uint8(images) -> np.ndarray:
    return (np.asarray(images) * 255).round().astype(np.uint8)  # as Sampler._decode rounds


def _pipeline_with(pipe, kind: SchedulerKind):
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[kind]).from_config(pipe.scheduler.config)
    return pipe


def _sd_pipeline(pipe, seeds, steps=STEPS, guidance=GUIDANCE) -> np.ndarray:
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    shape = (1, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    latents = torch.cat([torch.randn(shape, generator=g) for g in gens])  # as Sampler._initial_noise
    out = pipe(PROMPT, num_images_per_prompt=len(seeds), latents=latents, generator=gens, num_inference_steps=steps,
               guidance_scale=guidance, output_type="np")
    return _as_uint8(out.images)


def _sampler(path, kind, steps=STEPS, guidance=GUIDANCE, batch=BATCH):
    model = load_model(path)
    return model, Sampler(model, SamplingConfig(scheduler=kind, num_inference_steps=steps, guidance_scale=guidance,
                                                batch_size=batch))


def _assert_same(got: np.ndarray, want: np.ndarray):
    assert got.shape == want.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() == 0, f"{(diff > 0).sum()} pixels differ, by up to {diff.max()}/255"


@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
def test_sampler_matches_stable_diffusion_pipeline(tiny_models, kind):
    model, s = _sampler(tiny_models["latent_text"], kind)
    seeds = _seeds()
    got = s.generate(["p1"] * BATCH, [PROMPT] * BATCH, seeds)
    want = _sd_pipeline(_pipeline_with(model.pipe, kind), seeds)
    _assert_same(got, want)
    assert s.scheduler_name == type(model.pipe.scheduler).__name__ == SCHEDULERS[kind]
    assert len(set(encode_png(x) for x in got)) == BATCH  # seeds matter (and the noise is not all one sample's)


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpm_multistep", "dpm_singlestep"])
def test_sampler_matches_ddpm_pipeline(tiny_models, kind):
    kind = SchedulerKind(kind)
    model, s = _sampler(tiny_models["unconditional"], kind)
    seeds = _seeds(pid="uncond")
    got = s.generate(["uncond"] * BATCH, [""] * BATCH, seeds)
    pipe = _pipeline_with(model.pipe, kind)
    gens = [torch.Generator("cpu").manual_seed(x) for x in seeds]  # DDPMPipeline draws the initial noise from them
    want = _as_uint8(pipe(batch_size=BATCH, generator=gens, num_inference_steps=STEPS, output_type="np").images)
    _assert_same(got, want)


def test_grayscale_model_matches_ddpm_pipeline(tmp_path):
    path = str(tiny.build("unconditional", tmp_path / "gray", channels=1))  # MNIST-style, DDPM as saved
    model, s = _sampler(path, SchedulerKind.default)
    seeds = _seeds(pid="uncond")
    got = s.generate(["uncond"] * BATCH, [""] * BATCH, seeds)
    gens = [torch.Generator("cpu").manual_seed(x) for x in seeds]
    want = _as_uint8(model.pipe(batch_size=BATCH, generator=gens, num_inference_steps=STEPS, output_type="np").images)
    assert want.shape == (BATCH, 16, 16, 1)
    _assert_same(got, want)


def test_step_generator_only_where_step_takes_one():
    # the schedulers that draw no step noise have no `generator` parameter: passing one is a TypeError
    config = make_scheduler({"_class_name": "DDPMScheduler"}, SchedulerKind.ddpm).config
    takes = {k.value for k in KINDS if takes_generator(make_scheduler(config, k))}
    assert {"ddpm", "ddim", "euler_ancestral", "kdpm2_ancestral"} <= takes
    assert not takes & {"pndm", "lms", "heun", "kdpm2", "unipc", "deis"}


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return str(tiny.build_sd15(tmp_path_factory.mktemp("sd15") / "m", image_size=512))


def test_sd15_layout_with_pndm_samples_with_the_default_scheduler(sd15):
    """SD 1.5 ships PNDMScheduler, whose step takes no generator; `scheduler: default` must sample it at 512 px."""
    with open(os.path.join(sd15, "scheduler", "scheduler_config.json")) as f:
        saved = json.load(f)
    assert saved["_class_name"] == "PNDMScheduler" and saved["skip_prk_steps"] and not saved["clip_sample"]
    model, s = _sampler(sd15, SchedulerKind.default, steps=3, batch=1)
    assert s.scheduler_name == "PNDMScheduler" and (s.height, s.width) == (512, 512)
    got = s.generate(["p1"], [PROMPT], _seeds(1))
    assert got.shape == (1, 512, 512, 3)
    _assert_same(got, _sd_pipeline(model.pipe, _seeds(1), steps=3))


def _with_scheduler_class(src, dst, name):
    path = shutil.copytree(src, dst)
    for file, key in (("model_index.json", "scheduler"), ("scheduler/scheduler_config.json", None)):
        with open(os.path.join(path, file)) as f:
            cfg = json.load(f)
        if key:
            cfg[key] = ["diffusers", name]
        else:
            cfg["_class_name"] = name
        with open(os.path.join(path, file), "w") as f:
            json.dump(cfg, f)
    return str(path)


def test_unknown_scheduler_class_is_refused_with_the_fix(tiny_models, tmp_path):
    # LCM loads (a diffusers class) but needs a guidance-embedding UNet: not one memex samples with
    path = _with_scheduler_class(tiny_models["latent_text"], tmp_path / "m", "LCMScheduler")
    model = load_model(path)
    with pytest.raises(ModelError, match=r"model.path=.*m: its scheduler config names 'LCMScheduler'.*"
                                         r"set sampling.scheduler=<kind>, one of ddim, ddpm, pndm"):
        Sampler(model, SamplingConfig(num_inference_steps=2))
    s = Sampler(model, SamplingConfig(scheduler=SchedulerKind.ddim, num_inference_steps=2))  # the fix works
    assert s.generate(["p1"], [PROMPT], [1]).shape == (1, 16, 16, 3)


def test_solvers_a_checkpoint_cannot_step_are_refused_before_any_work(tiny_models, tmp_path):
    """An x0-predicting model on PNDM, Euler ancestral or KDPM2, and PNDM under 4 steps on a DDPM config
    (memex train's, an unconditional model's), failed in every sampler with diffusers' words ("prediction_type
    given as sample must be one of epsilon or v_prediction", "operands could not be broadcast together"), after
    the index was built and run.json written. Refused from the folder's scheduler config first."""
    from memex.config import ConfigError
    from memex.models import check_scheduler
    from memex.stages import generate

    from conftest import compose

    x0 = str(shutil.copytree(tiny_models["pixel_text"], tmp_path / "x0"))
    conf = os.path.join(x0, "scheduler", "scheduler_config.json")
    with open(conf) as f:
        base = json.load(f)
    with open(conf, "w") as f:
        json.dump(base | {"prediction_type": "sample"}, f)
    for kind in (SchedulerKind.pndm, SchedulerKind.euler_ancestral, SchedulerKind.kdpm2):
        with pytest.raises(ModelError, match=rf"predicts x0 .* the {kind.value} solver cannot step: set "
                                             r"sampling.scheduler to one of ddim, ddpm"):
            check_scheduler(x0, None, kind, 10)
    check_scheduler(x0, None, SchedulerKind.ddim, 10)
    ddpm_config = tiny_models["pixel_text"]
    with pytest.raises(ConfigError, match=r"sampling.num_inference_steps=2: PNDM .* needs at least 4 steps"):
        check_scheduler(ddpm_config, None, SchedulerKind.pndm, 2)
    check_scheduler(ddpm_config, None, SchedulerKind.pndm, 4)
    # the Sampler checks the same (a hub id is known only once loaded)
    with pytest.raises(ModelError, match="the euler_ancestral solver cannot step"):
        Sampler(load_model(x0), SamplingConfig(scheduler=SchedulerKind.euler_ancestral, num_inference_steps=2))
    assert Sampler(load_model(x0), SamplingConfig(scheduler=SchedulerKind.euler, num_inference_steps=2)).generate(
        ["p1"], [PROMPT], [1]).shape[0] == 1
    # and memex generate refuses it before its run folder is claimed
    cfg = compose([f"model.path={ddpm_config}", "sampling.scheduler=pndm", "sampling.num_inference_steps=2",
                   f"storage.root={tmp_path / 'runs'}", "resources.executor=local"])
    with pytest.raises(ConfigError, match="PNDM"):
        generate.prepare(cfg)
    assert not (tmp_path / "runs").exists()
