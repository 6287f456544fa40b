import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from memex import tiny
from memex.config import SamplingConfig, SchedulerKind
from memex.images import decode, encode_png
from memex.models import ModelError, load_model
from memex.sampling import Sampler, sample_seed

PROMPTS = {"p1": "a red apple", "p2": "a lighthouse at dusk", "p3": "blue logo"}


def _sampler(path, **kw):
    settings = dict(num_inference_steps=4, guidance_scale=3.0, batch_size=4)
    settings.update(kw)
    return Sampler(load_model(path), SamplingConfig(**settings))


def _batch(n_per_prompt=3, run_seed=0):
    ids = [pid for pid in PROMPTS for _ in range(n_per_prompt)]
    idx = [i for _ in PROMPTS for i in range(n_per_prompt)]
    return ids, [PROMPTS[p] for p in ids], [sample_seed(run_seed, p, i) for p, i in zip(ids, idx)]


PINNED_SEED = 5788409701804392049  # sample_seed(0, "p1", 0) since the first run folders


def test_sample_seed_is_stable_and_distinct():
    # pinned: a seed that moved (another hash, another byte order) would regenerate other images on resume
    # and break byte-identical reruns of every existing run folder
    assert sample_seed(0, "p1", 0) == PINNED_SEED
    seeds = {sample_seed(r, p, i) for r in range(3) for p in PROMPTS for i in range(50)}
    assert len(seeds) == 3 * len(PROMPTS) * 50
    assert all(0 <= s < 2**63 for s in seeds)


# Every scheduler at least once. DDPM and the ancestral ones add fresh noise at every step, so they
# also check the per-sample step noise; PNDM, LMS, Heun, UniPC, DEIS and KDPM2 take no generator
# (and keep state across steps: multistep histories, Heun's and KDPM2's first half of a step).
# Four cases in the unit tier (one per family, a stateless, a stochastic and a multistep
# scheduler); every other scheduler in the full suite.
_FAST = [("unconditional", "ddpm"), ("latent_text", "default"), ("pixel_text", "ddpm"),
         ("pixel_text", "euler_ancestral")]
_EVERY = [
    ("unconditional", "pndm"), ("unconditional", "lms"), ("unconditional", "heun"), ("unconditional", "unipc"),
    ("unconditional", "kdpm2_ancestral"), ("latent_text", "pndm"), ("latent_text", "heun"), ("latent_text", "kdpm2"),
    ("pixel_text", "euler"), ("pixel_text", "dpm_multistep"), ("pixel_text", "dpm_singlestep"), ("pixel_text", "deis"),
]


@pytest.mark.parametrize("kind,scheduler", _FAST + [pytest.param(*c, marks=pytest.mark.slow) for c in _EVERY])
def test_a_sample_regenerated_alone_is_byte_identical(tiny_models, kind, scheduler):
    s = _sampler(tiny_models[kind], scheduler=SchedulerKind(scheduler))
    ids, texts, seeds = _batch()
    batch = s.generate(ids, texts, seeds)
    assert batch.shape == (len(ids), 16, 16, 3) and batch.dtype == np.uint8
    fresh = _sampler(tiny_models[kind], scheduler=SchedulerKind(scheduler))  # new process state
    for j in (0, 4, len(ids) - 1):
        alone = fresh.generate(ids[j : j + 1], texts[j : j + 1], seeds[j : j + 1])[0]
        assert encode_png(alone) == encode_png(batch[j])
    # different seeds of one prompt give different images
    assert not np.array_equal(batch[0], batch[1])


def test_channels_last_regenerates_byte_identically_and_is_part_of_the_run_identity(tiny_models):
    """sampling.channels_last is a faster UNet memory format (bench/RESULTS.md): regeneration stays
    byte-exact under it, the UNet's conv weights really change format, and the run settings name it
    only when true (runs made before the key existed still resume)."""
    import pyarrow as pa

    from memex.config import GenerateConfig
    from memex.stages.generate import run_settings

    path = tiny_models["pixel_text"]
    s = _sampler(path, channels_last=True)
    conv = next(p for p in s.unet.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    ids, texts, seeds = _batch()
    batch = s.generate(ids, texts, seeds)
    fresh = _sampler(path, channels_last=True)
    assert np.array_equal(fresh.generate(ids[4:5], texts[4:5], seeds[4:5])[0], batch[4])
    plain = _sampler(path)  # a loaded model is put back in the default format
    assert next(p for p in plain.unet.parameters() if p.dim() == 4).is_contiguous()

    prompts = pa.table({"prompt_id": ["p1"], "prompt": ["a red apple"]})
    cfg = GenerateConfig()
    assert "channels_last" not in run_settings(cfg, prompts)["sampling"]
    cfg.sampling.channels_last = True
    assert run_settings(cfg, prompts)["sampling"]["channels_last"] is True


def test_decode_batch_size_decodes_in_chunks_and_is_part_of_the_run_identity(tiny_models, tmp_path):
    """sampling.decode_batch_size caps the VAE decode's memory (SD 1.x's decoder holds ~0.8 GB an
    image at 512 px in float32: 12 GB for the default batch of 16): the decoder sees chunks of that
    many rows, the images are the same up to 1 of 255 (other conv batch shapes), and the run
    settings name it only when set (runs made before it keep resuming)."""
    import pyarrow as pa

    from memex.config import ConfigError, GenerateConfig, validate_generate
    from memex.stages.generate import run_settings

    path = tiny_models["latent_text"]
    ids, texts, seeds = _batch()  # 9 samples: batches of 4, 4 and 1 padded to 4
    whole = _sampler(path).generate(ids, texts, seeds)
    s = _sampler(path, decode_batch_size=3)
    rows, decode = [], s.vae.decode
    s.vae.decode = lambda z: rows.append(len(z)) or decode(z)
    chunked = s.generate(ids, texts, seeds)
    assert rows == [3, 3] * 3  # each batch of 4: 3 rows, then 1 padded to 3 (one shape for every chunk)
    assert chunked.shape == whole.shape and np.abs(chunked.astype(int) - whole).max() <= 1
    # a sample regenerated alone is its row byte for byte, wherever the row sat in its chunks: the last,
    # shorter chunk's rows were decoded at another shape, breaking that promise (on SD's VAE layout at
    # 128 px: rows 3 and 7 of batches of 4 were 1-2 pixels off by 1/255)
    from memex.tiny import build_sd15

    sd = _sampler(str(build_sd15(tmp_path / "sd", image_size=128)), decode_batch_size=3)
    chunked = sd.generate(ids, texts, seeds)
    for j in (2, 3, 7):
        assert np.array_equal(sd.generate([ids[j]], [texts[j]], [seeds[j]])[0], chunked[j]), j

    prompts = pa.table({"prompt_id": ["p1"], "prompt": ["a red apple"]})
    cfg = GenerateConfig()
    assert "decode_batch_size" not in run_settings(cfg, prompts)["sampling"]
    cfg.sampling.decode_batch_size = 4
    assert run_settings(cfg, prompts)["sampling"]["decode_batch_size"] == 4
    cfg.model.path, cfg.prompts.path, cfg.sampling.decode_batch_size = path, "p.txt", 0
    with pytest.raises(ConfigError, match="sampling.decode_batch_size must be >= 1, got 0"):
        validate_generate(cfg)


def test_running_out_of_gpu_memory_names_the_setting_to_lower(tiny_models):
    """torch's "CUDA out of memory. Tried to allocate ..." named no memex setting: the UNet's names
    sampling.batch_size, the VAE decode's sampling.decode_batch_size (what caps it alone)."""
    s = _sampler(tiny_models["latent_text"])
    ids, texts, seeds = _batch(1)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    decode = s.vae.decode
    s.vae.decode = oom
    with pytest.raises(torch.OutOfMemoryError, match=r"^the VAE decode of 4 images of 16x16 ran out of cpu memory "
                                                     r".*set sampling\.decode_batch_size .*Tried to allocate 2\.00"):
        s.generate(ids, texts, seeds)
    s.vae.decode, s.unet.forward = decode, oom
    with pytest.raises(torch.OutOfMemoryError, match=r"^a batch of 4 samples \(8 UNet rows with guidance\) of 16x16 "
                                                     r"ran out of cpu memory: lower sampling\.batch_size"):
        s.generate(ids, texts, seeds)


def test_png_decodes_to_the_same_pixels(tiny_models):
    img = _sampler(tiny_models["unconditional"]).generate(["uncond"], [""], [7])[0]
    assert np.array_equal(decode(encode_png(img)), img)


@pytest.fixture(scope="module")
def gray_model(tmp_path_factory):
    return str(tiny.build("unconditional", tmp_path_factory.mktemp("gray") / "m", channels=1))


def test_grayscale_model_gives_one_channel_stored_as_l_png(gray_model):
    s = _sampler(gray_model, scheduler=SchedulerKind.ddpm)
    seeds = [sample_seed(0, "uncond", i) for i in range(5)]
    batch = s.generate(["uncond"] * 5, [""] * 5, seeds)
    assert s.channels == 1 and batch.shape == (5, 16, 16, 1) and batch.dtype == np.uint8
    assert np.array_equal(s.generate(["uncond"], [""], seeds[4:]), batch[4:])  # batch-invariant, as RGB
    png = encode_png(batch[0])
    assert Image.open(io.BytesIO(png)).mode == "L"  # 8-bit grayscale, not RGB with three equal channels
    assert np.array_equal(decode(png), np.repeat(batch[0], 3, axis=2))  # the gray value in R, G and B
    assert np.array_equal(decode(png, channels=1), batch[0])
    assert s.generate([], [], []).shape == (0, 16, 16, 1)


def test_four_channel_model_is_refused_when_the_sampler_is_built(tmp_path):
    """... and before any work, from its configs (it was refused in every sampler, after the index build)."""
    from memex.models import check_unet_fits

    path = str(tiny.build("unconditional", tmp_path / "rgba", channels=4))
    with pytest.raises(ModelError, match=r"model.path=.*rgba: its unet makes 4-channel images; memex samples only "
                                         r"1-channel \(grayscale\) or 3-channel \(RGB\)"):
        Sampler(load_model(path), SamplingConfig(num_inference_steps=2))
    with pytest.raises(ModelError, match=r"model.path=.*rgba: its UNet makes 4-channel images; memex samples only"):
        check_unet_fits(path, None, None, None, None, None)
    check_unet_fits(str(tiny.build("unconditional", tmp_path / "gray", channels=1)), None, None, None, None, None)


def test_a_latent_model_whose_vae_config_is_not_cached_is_not_called_four_channel(tiny_models, tmp_path, monkeypatch):
    """A hub cache made by from_pretrained(id, vae=...) holds no vae/config.json: the check fell back to the
    UNet's 4 latent channels and refused a Stable Diffusion model as making 4-channel images."""
    import json
    import shutil

    from memex import models

    folder = shutil.copytree(tiny_models["latent_text"], tmp_path / "cache")
    (folder / "vae" / "config.json").unlink()
    index = json.loads((folder / "model_index.json").read_text())
    monkeypatch.setattr(models, "_pipeline_index", lambda path, revision=None: (str(folder), index))
    models.check_unet_fits("org/sd-like", None, None, None, None, None)


def test_text_is_encoded_once_per_prompt(tiny_models):
    s = _sampler(tiny_models["latent_text"])
    assert s.prompts_encoded == 0  # nothing before the first batch
    ids, texts, seeds = _batch(n_per_prompt=4)
    s.generate(ids, texts, seeds)
    s.generate(ids[:5], texts[:5], seeds[:5])  # a second batch of the same prompts
    assert s.prompts_encoded == 1 + len(PROMPTS)  # + the empty prompt, for classifier-free guidance


def test_a_full_prompt_cache_keeps_the_prompts_of_the_batch_it_serves(tiny_models, monkeypatch):
    """A long-lived actor past EMBED_CACHE prompts (adaptive rounds coming back to kept prompts, triage):
    a new prompt evicting the least recently used one dropped a cached prompt of the same batch, and the
    batch failed with a bare KeyError. Each row still gets its own prompt's embedding."""
    import memex.sampling

    monkeypatch.setattr(memex.sampling, "EMBED_CACHE", 3)
    s = _sampler(tiny_models["latent_text"])
    texts = {f"q{i}": f"prompt number {i}" for i in range(6)}
    alone = {pid: s.embeddings([pid], [t])[0] for pid, t in texts.items()}  # each encoded once
    ids = ["q3", "q0", "q1", "q0"]  # q3 the least recently used cached one; q0, q1 evicted, encoded again
    got = s.embeddings(ids, [texts[i] for i in ids])
    assert all(torch.equal(g, alone[i]) for g, i in zip(got, ids))
    assert len(s._embeds) == 3 and list(s._embeds)[-2:] == ["q0", "q1"]


def test_prompt_changes_the_image(tiny_models):
    s = _sampler(tiny_models["pixel_text"], guidance_scale=7.5)
    a = s.generate(["p1"], [PROMPTS["p1"]], [5])[0]
    b = s.generate(["p2"], [PROMPTS["p2"]], [5])[0]
    assert not np.array_equal(a, b)


def test_guidance_off_skips_the_unconditional_pass(tiny_models):
    s = _sampler(tiny_models["pixel_text"], guidance_scale=1.0)
    assert not s.cfg and s.prompts_encoded == 0
    assert s.generate(["p1"], [PROMPTS["p1"]], [1]).shape == (1, 16, 16, 3)
    # the prompt only (no empty prompt), and one pass a step over the padded batch of 4 (not 2 x 4 x 4)
    assert s.prompts_encoded == 1 and s.unet_evaluations == 4 * 4
    g = _sampler(tiny_models["pixel_text"], guidance_scale=3.0)
    g.generate(["p1"], [PROMPTS["p1"]], [1])
    assert g.prompts_encoded == 2 and g.unet_evaluations == 2 * 4 * 4  # guided: both passes


def test_image_size_from_config(tiny_models):
    s = _sampler(tiny_models["latent_text"], height=24, width=32)
    assert s.generate(["p1"], [PROMPTS["p1"]], [1]).shape == (1, 24, 32, 3)
    with pytest.raises(ValueError, match="multiple of 2"):
        _sampler(tiny_models["latent_text"], height=25)


def test_a_non_square_native_size_is_sampled_as_height_by_width(tiny_models, tmp_path):
    """A UNet whose sample_size is (height, width): both sides were taken from the height."""
    from diffusers import UNet2DModel

    path = tmp_path / "wide"
    shutil.copytree(tiny_models["unconditional"], path)
    unet = UNet2DModel.from_pretrained(path / "unet")
    shutil.rmtree(path / "unet")
    UNet2DModel.from_config({**unet.config, "sample_size": [16, 24]}).save_pretrained(path / "unet")
    assert _sampler(str(path)).generate(["uncond"], [""], [1]).shape == (1, 16, 24, 3)


def test_all_three_families_exist():
    assert set(tiny.KINDS) == {"unconditional", "latent_text", "pixel_text"}


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_unet_evaluations_count_every_row_padding_and_guidance(tiny_models, guidance):
    s = _sampler(tiny_models["pixel_text"], guidance_scale=guidance)  # batch 4, 4 steps
    ids, texts, seeds = _batch(n_per_prompt=2)  # 6 samples: one full batch and one padded with 2 rows
    s.generate(ids, texts, seeds)
    per_row = 4 * (2 if guidance > 1 else 1)  # steps x (uncond + text rows under guidance)
    assert s.unet_evaluations == 8 * per_row  # 2 batches of 4 rows were computed
    assert s.padded_evaluations == 2 * per_row


def test_free_first_step_score_equals_the_triage_of_the_same_seeds(tiny_models):
    """Generation records Wen et al.'s first-step score at no cost; triage computes it alone for
    a few UNet calls. Same seeds, same batch shape: the same numbers."""
    s = _sampler(tiny_models["pixel_text"])
    ids, texts, seeds = _batch(n_per_prompt=2)
    images, scores = s.generate_scored(ids, texts, seeds)
    before = s.unet_evaluations
    alone = _sampler(tiny_models["pixel_text"]).triage(ids, texts, seeds, steps=1)
    np.testing.assert_array_equal(scores, alone)
    assert scores.shape == (6,) and (scores > 0).all() and len(set(scores.tolist())) == 6
    two = s.triage(ids, texts, seeds, steps=2)  # the mean over the first two steps differs
    assert not np.allclose(two, scores) and s.unet_evaluations - before == 8 * 2 * 2
    assert _sampler(tiny_models["pixel_text"], guidance_scale=1.0).generate_scored(ids, texts, seeds)[1] is None


def test_triage_refuses_an_unconditional_model_and_too_many_steps(tiny_models):
    with pytest.raises(ModelError, match="triage=none"):
        _sampler(tiny_models["unconditional"]).triage(["uncond"], [""], [0])
    with pytest.raises(ValueError, match="triage steps"):
        _sampler(tiny_models["pixel_text"]).triage(["p1"], ["a"], [0], steps=5)


def _rebuilt_unet(src: str, dst, cls: str, scheduler_config: dict | None = None, **config) -> str:
    """A copy of a tiny pipeline whose UNet is rebuilt with `config` changed (and its scheduler's config)."""
    import json

    import diffusers

    shutil.copytree(src, dst)
    unet = getattr(diffusers, cls).from_pretrained(dst / "unet")
    shutil.rmtree(dst / "unet")
    getattr(diffusers, cls).from_config({**unet.config, **config}).save_pretrained(dst / "unet")
    if scheduler_config:
        path = dst / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **scheduler_config}))
    return str(dst)


@pytest.mark.parametrize("kind", ["pixel_text", "unconditional"])
def test_a_learned_variance_reaches_the_scheduler_that_reads_it(tiny_models, tmp_path, kind):
    """IF-style UNets predict a variance beside the noise (out_channels = 2 x in_channels), and IF ships
    DDPMScheduler(variance_type="learned_range"), whose step reads it. The sampler cut it off, and the
    step failed in every worker ("unsupported operand type(s) for +: 'NoneType' and 'int'"). Now the
    guided noise goes with the text branch's variance, as diffusers' IF pipeline does; a scheduler that
    does not read one (PNDM) still gets the noise alone."""
    cls = "UNet2DModel" if kind == "unconditional" else "UNet2DConditionModel"
    path = _rebuilt_unet(tiny_models[kind], tmp_path / "if", cls, {"variance_type": "learned_range"}, out_channels=6)
    s = _sampler(path, scheduler=SchedulerKind.ddpm)
    seen, raw = [], []  # what the scheduler's step got; what the UNet returned
    step, unet = s.scheduler.step, s.unet
    s.scheduler.step = lambda out, *a, **k: seen.append(out.clone()) or step(out, *a, **k)

    class Spy:  # the UNet, its outputs kept
        def __getattr__(self, name):
            return getattr(unet, name)

        def __call__(self, *a, **k):
            out = unet(*a, **k)
            raw.append(out.sample.clone())
            return out

    s.unet = Spy()
    ids, texts, seeds = (["uncond"], [""], [1]) if kind == "unconditional" else (["p1"], [PROMPTS["p1"]], [1])
    images = s.generate(ids, texts, seeds)
    assert images.shape == (1, 16, 16, 3) and {x.shape[1] for x in seen} == {6} and len(seen) == len(raw)
    for got, out in zip(seen, raw):
        if kind == "unconditional":
            torch.testing.assert_close(got, out)
        else:  # rows [uncond; text]: guided noise, the text branch's variance
            u, t = out.chunk(2)
            torch.testing.assert_close(got[:, :3], u[:, :3] + 3.0 * (t[:, :3] - u[:, :3]))
            torch.testing.assert_close(got[:, 3:], t[:, 3:])
    pndm = _sampler(path, scheduler=SchedulerKind.pndm)
    assert not pndm.learned_variance and pndm.generate(ids, texts, seeds).shape == (1, 16, 16, 3)


@pytest.mark.parametrize("timestep_type", ["continuous", "discrete"])
def test_the_eps_scale_of_an_euler_step_is_its_sigmas(tiny_models, tmp_path, timestep_type):
    """A v-prediction checkpoint with EulerDiscreteScheduler(timestep_type=continuous) (EDM-style v models)
    numbers its steps 0.25 ln(sigma): under 2 at the first step. Looked up in alphas_cumprod, that gave abar
    ~0.9998 for the step's ~0.003 (1 / (1 + sigma^2)) here: a triage score 17x too large (0.057 is right).
    The step's own sigma is used, which for discrete timesteps equals the alphas_cumprod of t."""
    import json

    shutil.copytree(tiny_models["pixel_text"], tmp_path / "v")
    sched = tmp_path / "v" / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction",
                                 "timestep_type": timestep_type}))
    sampler = _sampler(tmp_path / "v", scheduler=SchedulerKind.euler)  # from the checkpoint's config
    ids, texts, seeds = _batch(n_per_prompt=1)
    assert np.all(np.isfinite(sampler.triage(ids, texts, seeds)))  # sets the timesteps of one step
    sc = sampler.scheduler
    assert type(sc).__name__ == "EulerDiscreteScheduler"
    t, sigma = sc.timesteps[0], float(sc.sigmas[0])
    assert sampler._eps_scale(t) == pytest.approx((1 / (1 + sigma**2)) ** 0.5, rel=1e-6)
    table = float(sc.alphas_cumprod[int(round(float(t)))])
    if timestep_type == "continuous":
        assert float(t) < 2 and table > 0.99 and sampler._eps_scale(t) < 0.1  # the table read ~1
    else:
        assert sampler._eps_scale(t) == pytest.approx(table**0.5, rel=1e-4)


def test_kdpm2s_second_evaluation_of_a_step_is_scaled_at_its_interpolated_sigma(tiny_models, tmp_path):
    """KDPM2 evaluates each step twice; the second runs the UNet at sigmas_interpol (its timestep between two
    steps'), not at sigmas[i], which the sigma lookup read (an eps scale 1.36x too large on SD's schedule). Each
    evaluation's abar is 1 / (1 + sigma^2) of the sigma its input was scaled with, which lies on the
    alphas_cumprod curve at its timestep."""
    import json

    shutil.copytree(tiny_models["pixel_text"], tmp_path / "v")
    sched = tmp_path / "v" / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"}))
    sampler = _sampler(tmp_path / "v", scheduler=SchedulerKind.kdpm2)
    seen, real = [], sampler._abar_at
    sampler._abar_at = lambda t: seen.append((float(t), real(t))) or seen[-1][1]
    ids, texts, seeds = _batch(n_per_prompt=1)
    assert np.all(np.isfinite(sampler.triage(ids, texts, seeds, steps=2)))
    table = sampler.scheduler.alphas_cumprod.double().numpy()
    assert len(seen) >= 2 and seen[1][0] != seen[0][0]  # the second call: the interpolated timestep
    for t, a in seen:
        lo, hi = table[int(np.floor(t))], table[min(int(np.ceil(t)), len(table) - 1)]
        assert min(lo, hi) * 0.97 <= a <= max(lo, hi) * 1.03, (t, a, lo, hi)


def test_a_unet_without_sample_size_needs_the_image_size(tiny_models, tmp_path):
    """UNet2DConditionModel's sample_size defaults to None: the sampler unpacked it ("cannot unpack
    non-iterable NoneType") even with sampling.height and width set. Now those are used, and without
    them the error names the keys."""
    from memex.config import ConfigError

    path = _rebuilt_unet(tiny_models["latent_text"], tmp_path / "nosize", "UNet2DConditionModel", sample_size=None)
    with pytest.raises(ConfigError, match="no sample_size.*set sampling.height and sampling.width"):
        _sampler(path)
    assert _sampler(path, height=16, width=24).generate(["p1"], [PROMPTS["p1"]], [1]).shape == (1, 16, 24, 3)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_the_triage_score_is_on_eps_for_v_and_x0_predicting_models(tiny_models, tmp_path, prediction_type):
    """Wen et al.'s score is ||eps(x_t, c) - eps(x_t, "")||. A v-prediction UNet (SD 2.x at 768 px) outputs v,
    whose difference is the eps difference / sqrt(abar_t): 13x at SD 2's first step, so scores of a v and an
    eps checkpoint could not be compared (the nightly trend). The same weights read as either: the score of
    the one is the other's times sqrt(abar_t) (x0-prediction: sqrt(abar_t / (1 - abar_t)))."""
    import json

    shutil.copytree(tiny_models["pixel_text"], tmp_path / "v")  # the same weights; the scheduler reads them as v
    sched = tmp_path / "v" / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": prediction_type}))
    eps, other = _sampler(tiny_models["pixel_text"]), _sampler(tmp_path / "v")
    ids, texts, seeds = _batch(n_per_prompt=1)
    raw = eps.triage(ids, texts, seeds)
    a = float(eps.scheduler.alphas_cumprod[int(eps.scheduler.timesteps[0])])  # the first step's (set by triage)
    scale = a**0.5 if prediction_type == "v_prediction" else (a / (1 - a)) ** 0.5
    want = raw * scale
    np.testing.assert_allclose(other.triage(ids, texts, seeds), want, rtol=1e-5)
    np.testing.assert_allclose(other.generate_scored(ids, texts, seeds)[1], want, rtol=1e-5)  # the free score too
    assert scale < 0.5  # the tiny models' first timestep is near T: the raw difference was 2x or more off


@pytest.mark.parametrize("kind", ["pixel_text", "latent_text"])
def test_generations_with_nan_pixels_are_refused_not_saved_black(tiny_models, kind, monkeypatch):
    """A float16 overflow (UNet or VAE) gives NaN pixels; clamp kept them and the uint8 cast made them 0: every
    such generation of a prompt was the same black image, which the filter reads as a memorized prompt's clique.
    They are refused, naming the prompts and sampling.dtype, before anything is written."""
    from memex.sampling import NonFiniteImages

    s = _sampler(tiny_models[kind])
    ids, prompts, seeds = _batch(2)
    target = s.vae if kind == "latent_text" else s.unet  # where the NaN comes from: the decoder, or the UNet
    name = "decode" if target is s.vae else "forward"
    forward = getattr(target, name)

    def poisoned(*a, **k):  # p2's rows only (rows 2-3 of the 6; with guidance the UNet sees each twice)
        out = forward(*a, **k)
        x = out.sample
        rows = torch.zeros(len(x), dtype=torch.bool)
        n = len(x) // (2 if target is s.unet else 1)
        rows[[i for i in range(len(x)) if 2 <= i % max(n, 1) < 4]] = True
        x[rows] = float("nan")
        return out

    with pytest.raises(NonFiniteImages, match=r"2 of 4 generations of a batch hold NaN .*of prompts \['a lighthouse "
                                              r"at dusk'\]\. In float32 this is the checkpoint itself"):
        monkeypatch.setattr(target, name, poisoned)
        s.generate(ids, prompts, seeds)
    monkeypatch.setattr(target, name, forward)
    assert s.generate(ids, prompts, seeds).shape[0] == 6  # the same batch, finite, is generated


@pytest.mark.parametrize("kind", ["pixel_text", "latent_text"])
def test_triage_of_a_model_sampled_without_guidance_follows_the_text_trajectory(tiny_models, kind):
    """guidance_scale <= 1 generates from the text prediction alone; a triage of several steps stepped with
    eps_uncond + guidance_scale * diff, so at 0 it followed the unconditional trajectory and at 0.5 one in between,
    averaging its scores along a path no generation takes. Any scale <= 1 now gives the scale-1 scores."""
    ids, prompts, seeds = _batch(2)
    at = {gs: _sampler(tiny_models[kind], guidance_scale=gs).triage(ids, prompts, seeds, steps=3)
          for gs in (0.0, 0.5, 1.0)}
    np.testing.assert_array_equal(at[0.0], at[1.0])
    np.testing.assert_array_equal(at[0.5], at[1.0])
    guided = _sampler(tiny_models[kind], guidance_scale=3.0).triage(ids, prompts, seeds, steps=3)
    assert not np.allclose(guided, at[1.0])  # a guided model's triage still steps along its guided trajectory


def test_nan_generations_are_named_by_their_prompt_whatever_the_decode_chunk(tiny_models, monkeypatch):
    """With sampling.decode_batch_size the VAE decodes a batch in chunks: the check ran per chunk and zipped the
    chunk's rows with the whole batch's prompts, naming another prompt (and counting padding). It names the
    batch's own rows now."""
    from memex.sampling import NonFiniteImages

    s = _sampler(tiny_models["latent_text"], decode_batch_size=2)
    ids, prompts, seeds = ["p1", "p1", "p2", "p3"], [PROMPTS["p1"]] * 2 + [PROMPTS["p2"], PROMPTS["p3"]], [1, 2, 3, 4]
    decode = s.vae.decode
    calls = []

    def poisoned(*a, **k):  # the second chunk's second row: p3's sample
        out = decode(*a, **k)
        calls.append(len(out.sample))
        if len(calls) == 2:
            out.sample[1] = float("nan")
        return out

    monkeypatch.setattr(s.vae, "decode", poisoned)
    with pytest.raises(NonFiniteImages, match=r"1 of 4 generations of a batch hold NaN .*of prompts \['blue logo'\]"):
        s.generate(ids, prompts, seeds)
    assert calls == [2, 2]


@pytest.mark.parametrize("kind", ["pixel_text", "unconditional"])
def test_decode_batch_size_on_a_model_without_a_vae_is_refused(tiny_models, kind):
    """sampling.decode_batch_size chunks the VAE decode; a pixel model has none, so the key did nothing, yet it is
    part of run.json: set, it named a new run folder for the same pixels (or refused an explicit run.name's
    resume). It is refused before any work, naming the key; a latent model takes it."""
    from memex.config import ConfigError
    from memex.stages import generate

    from conftest import compose

    prompts = [] if kind == "pixel_text" else ["prompts=none"]
    over = ["model=local", f"model.path={tiny_models[kind]}", *prompts, "sampling.decode_batch_size=2"]
    with pytest.raises(ConfigError, match=rf"sampling.decode_batch_size=2 is set, and model.path=.* is a {kind} "
                                          r"model with no VAE to decode with: drop the key"):
        generate.check_model(compose(over))
    generate.check_model(compose(["model=local", f"model.path={tiny_models['latent_text']}",
                                  "sampling.decode_batch_size=2"]))
