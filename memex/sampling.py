"""Batched, seed-exact sampling: the only module that runs the networks (and touches the GPU).

Why not call `pipeline(prompt, ...)` per prompt? The attack generates ~500 samples per prompt:
  * one UNet batch mixes samples of several prompts, so small prompt counts never waste a batch;
  * text embeddings are computed once per prompt (and the empty prompt once per sampler),
    then reused for every sample and batch;
  * every sample draws all its noise (initial latents and any ancestral step noise) from its own
    CPU generator seeded with `sample_seed(run seed, prompt id, sample index)`, so one sample
    regenerated alone equals the same sample generated inside any batch. The list of generators
    goes to `scheduler.step` as diffusers' pipelines pass it (`randn_tensor` draws row i from
    generator i), and only to schedulers whose `step` takes a `generator` (PNDM, LMS, Heun, UniPC,
    DEIS and KDPM2 have none and draw no noise: passing it is a TypeError);
  * the networks always run on a fixed batch shape (`batch_size`, the last batch padded with
    copies of its first row) and each prompt is encoded alone. Why: CPU and GPU kernels pick
    their blocking and reduction order by tensor shape, so the same row computed in a batch of 3
    and a batch of 9 can differ in the last float bit, and ~1 pixel in 10^3 then rounds to a
    different uint8 (measured on the tiny pixel model with Euler ancestral). With one shape, a
    row's result does not depend on its neighbours or its position, so a sample regenerated
    alone at the same batch_size on the same kind of device is byte-identical (on a CPU, with the same
    torch thread count too: the threads split the reductions; 1 against 2 threads moved 46 of 1.5M values
    by 1 at 512 px, 0 at a fixed count, whatever the batch position). Padding costs at
    most one partial batch per shard. The UNet's memory format (`sampling.channels_last`) changes
    kernels too, so it is part of the run identity like batch_size.
The loop is the standard diffusers one (scale_model_input -> UNet -> classifier-free guidance ->
scheduler.step for t in scheduler.timesteps) over the loaded pipeline's own components. It also
drives 2nd-order schedulers (Heun, KDPM2): their `timesteps` repeat each inner step, so the UNet
runs twice per step, and `step` keeps the first half's state until the second call;
`set_timesteps` at the start of every batch clears that state (and multistep histories).
Images come back as uint8 (N, H, W, C) with the model's C: 3 (RGB) or 1 (grayscale, MNIST-style
models); any other count is refused when the Sampler is built, since no PNG mode holds it.
"""

from __future__ import annotations

import hashlib
import inspect
from collections import OrderedDict

import numpy as np
import torch

from memex.config import ConfigError, MemexError, ModelKind, SamplingConfig
from memex.models import LoadedModel, ModelError, check_solver, make_scheduler

EMBED_CACHE = 1024  # prompts; SD-1.x embeddings are 77x768 fp32 = 236 KB, so <= ~240 MB
IMAGE_CHANNELS = (1, 3)  # grayscale or RGB: the PNG modes ("L", "RGB") memex stores generations in


def sample_seed(run_seed: int, prompt_id: str, sample_index: int) -> int:
    """63-bit seed from (run seed, prompt id, sample index): independent of batching and sharding."""
    h = hashlib.blake2b(f"{run_seed}\x1f{prompt_id}\x1f{sample_index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def image_channels(model: LoadedModel) -> int:
    """Channels of the images a model generates: the VAE decoder's (latent models) or the UNet's
    input (pixel models; its output may be twice that with a learned variance). 1 or 3, else ModelError."""
    vae = getattr(model.pipe, "vae", None) if model.kind == ModelKind.latent_text else None
    where, n = ("vae", vae.config.out_channels) if vae is not None else ("unet", model.pipe.unet.config.in_channels)
    if n not in IMAGE_CHANNELS:
        raise ModelError(f"model.path={model.path or model.model_id}: its {where} makes {n}-channel images; memex "
                         "samples only 1-channel (grayscale) or 3-channel (RGB) models, the images a PNG holds and "
                         "the training-set comparisons take")
    return n


def noise_norm(diff: torch.Tensor) -> np.ndarray:
    """(B,) float32 RMS of eps(x_t, prompt) - eps(x_t, "") per row: Wen et al.'s memorization
    magnitude, divided by sqrt(C*H*W) so it reads alike at 32 px and at 64x64 latents. Memorized
    prompts pull the prediction far from the unconditional one (bench/RESULTS.md has the demo's)."""
    return diff.float().flatten(1).pow(2).mean(dim=1).sqrt().cpu().numpy()


def takes_generator(scheduler) -> bool:
    """Whether `scheduler.step` has a `generator` parameter (what diffusers' pipelines check, once)."""
    return "generator" in inspect.signature(scheduler.step).parameters


@torch.no_grad()
def encode_text(tokenizer, text_encoder, texts: list[str]) -> torch.Tensor:
    """(len(texts), L, D) embeddings as the pipelines compute them: padded to model_max_length, an
    attention mask only for T5 (CLIP's pipelines pass none). Used by Sampler and memex/mia.py."""
    tok = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    dev = text_encoder.device
    mask = tok.attention_mask.to(dev) if text_encoder.config.model_type == "t5" else None
    return text_encoder(tok.input_ids.to(dev), attention_mask=mask)[0]


class NonFiniteImages(MemexError, RuntimeError):
    """Generations holding NaN or infinite pixels: as uint8 they were all-black images, every pair of them
    identical, which the filter read as a memorized prompt's clique (a false alarm) and nothing refused."""


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(N,) bool: whether each row of a batch of images holds no NaN or inf."""
    return torch.isfinite(x.float()).flatten(1).all(1)


def _check_finite(ok: torch.Tensor) -> None:
    """Raise NonFiniteImages(message, per-row ok) when a row of the batch (`ok`: _finite_rows) holds NaN or inf:
    clamp keeps NaN, and NaN cast to uint8 is 0, a black image, silently."""
    if not bool(ok.all()):
        raise NonFiniteImages(f"{int((~ok).sum())} of {len(ok)} generations of a batch hold NaN or infinite pixels",
                              ok.tolist())


class NamedOutOfMemory(torch.OutOfMemoryError):
    """torch's out-of-memory error, reworded to name the memex setting to lower."""


def made_on(device: torch.device) -> str:
    """What a sample's bytes depend on besides its seed and settings (the module docstring): the device
    model on a GPU, the torch thread count on a CPU, e.g. "cpu, 2 torch threads" or "cuda, NVIDIA H100 80GB
    HBM3". Kept in each samples/ shard's marker, so regenerating one sample byte-identically can be set up."""
    if device.type == "cuda":
        return f"cuda, {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        n = torch.get_num_threads()
        return f"cpu, {n} torch thread{'s' if n != 1 else ''}"
    return device.type


class Sampler:
    """Generates uint8 images for (prompt id, prompt, seed) triples with one model."""

    def __init__(self, model: LoadedModel, settings: SamplingConfig):
        pipe = model.pipe
        self.kind = model.kind
        self.unet = pipe.unet
        # set either way: a model loaded once and given to two samplers gets each one's format
        self.unet.to(memory_format=torch.channels_last if settings.channels_last else torch.contiguous_format)
        self.vae = getattr(pipe, "vae", None) if self.kind == ModelKind.latent_text else None
        self.text_encoder = getattr(pipe, "text_encoder", None)
        self.tokenizer = getattr(pipe, "tokenizer", None)
        check_solver(pipe.scheduler.config, settings.scheduler, settings.num_inference_steps,
                     model.path or model.model_id)  # a hub id's, not checked before (models.check_scheduler)
        self.scheduler = make_scheduler(pipe.scheduler.config, settings.scheduler, model.path or model.model_id)
        self._step_generator = takes_generator(self.scheduler)
        self.settings = settings
        self.device, self.dtype = self.unet.device, self.unet.dtype
        self.scheduler_name = type(self.scheduler).__name__

        # an int, (height, width) for a non-square model, or None (UNet2DConditionModel's default: a UNet
        # built in code and saved without one), which needs sampling.height and sampling.width
        native = self.unet.config.sample_size
        native_h, native_w = (native, native) if isinstance(native, int) or native is None else native
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        if native is None and not (settings.height and settings.width):
            raise ConfigError("the UNet's config has no sample_size, so memex cannot tell its image size: set "
                              "sampling.height and sampling.width (SD 1.x: 512)")
        self.height = settings.height or native_h * self.vae_scale
        self.width = settings.width or native_w * self.vae_scale
        if self.height % self.vae_scale or self.width % self.vae_scale:
            raise ValueError(f"image size {self.height}x{self.width} must be a multiple of {self.vae_scale} "
                             "for this VAE")
        # an unconditional UNet2DModel halves the image at each level but the last and concatenates the skips
        # on the way up: each side must divide by 2^(levels - 1) (ddpm-celebahq-256, 6 levels: 32), or the
        # first UNet call fails in every worker with "Sizes of tensors must match". (UNet2DConditionModel
        # pads odd sizes itself.)
        if self.kind == ModelKind.unconditional:
            unit = 2 ** (len(self.unet.config.block_out_channels) - 1)
            if self.height % unit or self.width % unit:
                raise ConfigError(f"image size {self.height}x{self.width}: this UNet has "
                                  f"{len(self.unet.config.block_out_channels)} levels, so sampling.height and "
                                  f"sampling.width must be multiples of {unit}")
        # IF-style UNets predict a variance beside the noise (out_channels = 2 x in_channels); a scheduler
        # that reads it (DDPM with variance_type learned / learned_range, IF's own) gets it, others do not
        # (a scheduler made from such a config keeps the key even where it does not take it: PNDM)
        takes = "variance_type" in inspect.signature(type(self.scheduler).__init__).parameters
        self.learned_variance = takes and self.scheduler.config.get("variance_type") in ("learned", "learned_range")
        self.unet_channels = self.unet.config.in_channels  # what the noise and the UNet's sample have
        # the triage score is on eps (Wen et al.); a v- or x0-predicting UNet's text-minus-empty difference
        # is turned into eps's with the step's abar (_eps_scale: x13 too large at SD 2's first step, abar 0.0058)
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        abar = getattr(self.scheduler, "alphas_cumprod", None)
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ModelError(f"scheduler prediction_type={self.prediction_type!r}: memex samples epsilon, "
                             "v_prediction and sample models")
        if self.prediction_type != "epsilon" and abar is None:
            raise ModelError(f"scheduler {self.scheduler_name} has no alphas_cumprod, so the triage score of a "
                             f"prediction_type={self.prediction_type} model cannot be put on eps: choose another "
                             "sampling.scheduler (ddim, ddpm, euler)")
        self._abar = None if abar is None else abar.detach().cpu().double().numpy()
        self.channels = image_channels(model)  # C of the (N, H, W, C) images: 1 or 3
        self.conditional = self.kind != ModelKind.unconditional
        self.cfg = self.conditional and settings.guidance_scale > 1.0
        self._embeds: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.prompts_encoded = 0  # text-encoder rows computed: once per distinct prompt (+1 empty)
        self._uncond_row: torch.Tensor | None = None  # the "" embedding, encoded on first use
        # UNet work done, in sample-evaluations: one batch row through the UNet once (the cost
        # unit of memex's summaries; guidance makes every step 2). Padding rows included: they are
        # computed. `unet_evaluations` = both, `padded_evaluations` = the part spent on padding
        # (docs/method.md#4-cost-accounting).
        self.unet_evaluations = 0
        self.padded_evaluations = 0

    # 1. text embeddings, cached per prompt id ------------------------------------------
    def _encode(self, texts: list[str]) -> torch.Tensor:
        self.prompts_encoded += len(texts)
        return encode_text(self.tokenizer, self.text_encoder, texts).to(self.dtype)

    @property
    def _uncond(self) -> torch.Tensor:
        """(1, L, D) embedding of the empty prompt: guidance and the triage score need it."""
        if self._uncond_row is None:
            self._uncond_row = self._encode([""])
        return self._uncond_row

    def embeddings(self, prompt_ids: list[str], prompts: list[str]) -> torch.Tensor:
        """(B, L, D) conditional embeddings; each distinct prompt is encoded at most once."""
        batch = {}  # this batch's, taken before the cache drops any: a new prompt evicting the least recently
        for pid, text in zip(prompt_ids, prompts):  # used one could drop a prompt of this very batch
            if pid not in batch:  # one at a time: a fixed shape (see module doc), ~1 ms each
                batch[pid] = self._embeds[pid] if pid in self._embeds else self._encode([text])[0]
        for pid, e in batch.items():
            self._embeds[pid] = e
            self._embeds.move_to_end(pid)
        while len(self._embeds) > EMBED_CACHE:
            self._embeds.popitem(last=False)
        return torch.stack([batch[pid] for pid in prompt_ids])

    # 2. per-sample noise -----------------------------------------------------------------
    def _generators(self, seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def _initial_noise(self, gens: list[torch.Generator]) -> torch.Tensor:
        shape = (1, self.unet_channels, self.height // self.vae_scale, self.width // self.vae_scale)
        x = torch.cat([torch.randn(shape, generator=g) for g in gens])  # drawn on CPU: device-independent
        return x.to(self.device, self.dtype) * self.scheduler.init_noise_sigma

    # 3. denoising loop -------------------------------------------------------------------
    def generate(self, prompt_ids: list[str], prompts: list[str], seeds: list[int]) -> np.ndarray:
        """Images as uint8 (N, H, W, C) for N samples (any mix of prompts), batch_size at a time; C = self.channels."""
        return self.generate_scored(prompt_ids, prompts, seeds)[0]

    def generate_scored(self, prompt_ids: list[str], prompts: list[str], seeds: list[int]
                        ) -> tuple[np.ndarray, np.ndarray | None]:
        """(images (N, H, W, C) uint8, (N,) float32 triage score of each sample's first step, or
        None when the sampler does not run guidance). The score is `noise_norm` at the first
        timestep, from the two predictions guidance computes anyway: it costs nothing."""
        out = self._batched(self._generate_batch, prompt_ids, prompts, seeds)
        if not out:
            return np.zeros((0, self.height, self.width, self.channels), np.uint8), None
        images = np.concatenate([o[0] for o in out])
        return images, (np.concatenate([o[1] for o in out]) if self.cfg else None)

    def triage(self, prompt_ids: list[str], prompts: list[str], seeds: list[int], steps: int = 1) -> np.ndarray:
        """(N,) float32 triage score of each (prompt, seed): `noise_norm` averaged over the first
        `steps` timesteps of the guided trajectory from that seed's noise (Wen et al., ICLR 2024;
        memex/stages/triage.py). Costs 2 x steps UNet evaluations per row, whatever the guidance."""
        if not self.conditional:
            raise ModelError("triage scores need a text-conditional model: this one is unconditional (set triage=none)")
        if not 1 <= steps <= self.settings.num_inference_steps:
            raise ValueError(f"triage steps must be in 1..{self.settings.num_inference_steps}, got {steps}")
        out = self._batched(lambda *a: self._triage_batch(*a, steps), prompt_ids, prompts, seeds)
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def _batched(self, fn, prompt_ids: list[str], prompts: list[str], seeds: list[int]) -> list:
        """fn on fixed-shape batches of batch_size rows (the last padded with copies of its first row,
        computed and dropped); returns fn's outputs, each cut to its real rows."""
        if not (len(prompt_ids) == len(prompts) == len(seeds)):
            raise ValueError("prompt_ids, prompts and seeds must have the same length")
        bs, out = self.settings.batch_size, []
        for b in range(0, len(seeds), bs):
            n = len(seeds[b : b + bs])
            pad = [0] * (bs - n)
            take = lambda xs: xs[b : b + n] + [xs[b] for _ in pad]  # noqa: E731
            before = self.unet_evaluations
            try:
                res = fn(take(prompt_ids), take(prompts), take(seeds))
            except torch.OutOfMemoryError as e:
                if isinstance(e, NamedOutOfMemory):  # the decode's own, naming its setting
                    raise
                raise NamedOutOfMemory(
                    f"a batch of {bs} samples ({bs * (2 if self.cfg else 1)} UNet rows with guidance) of "
                    f"{self.height}x{self.width} ran out of {self.device} memory: lower sampling.batch_size "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
            self.padded_evaluations += (self.unet_evaluations - before) * len(pad) // bs
            out.append(tuple(None if r is None else r[:n] for r in res) if isinstance(res, tuple) else res[:n])
        return out

    def _start(self, prompt_ids: list[str], prompts: list[str], seeds: list[int], both: bool) -> tuple:
        """Initial latents, conditioning ([uncond; text] when both), step kwargs of one batch."""
        # set_timesteps first: init_noise_sigma (Euler, DPM) depends on the timestep schedule
        self.scheduler.set_timesteps(self.settings.num_inference_steps, device=self.device)
        gens = self._generators(seeds)
        x = self._initial_noise(gens)
        cond = self.embeddings(prompt_ids, prompts) if self.conditional else None
        if both:
            cond = torch.cat([self._uncond.expand(len(seeds), -1, -1), cond])
        return x, cond, ({"generator": gens} if self._step_generator else {})

    @torch.no_grad()
    def _generate_batch(self, prompt_ids: list[str], prompts: list[str], seeds: list[int]) -> tuple:
        x, cond, step_kwargs = self._start(prompt_ids, prompts, seeds, self.cfg)
        score = None
        for i, t in enumerate(self.scheduler.timesteps):  # 2nd-order schedulers list each inner timestep twice
            eps, diff = self._predict_noise(x, t, cond)
            if i == 0 and diff is not None:
                score = noise_norm(diff)
            x = self.scheduler.step(eps, t, x, **step_kwargs).prev_sample
        try:
            return self._decode(x), score
        except NonFiniteImages as e:
            bad = sorted({p for p, ok in zip(prompts, e.args[1]) if not ok})
            dtype = str(self.dtype).removeprefix("torch.")
            fix = (f"sampling.dtype={dtype} overflows in this model's UNet or VAE: set sampling.dtype=float32 (or "
                   "bfloat16)" if self.dtype != torch.float32 else "In float32 this is the checkpoint itself (NaN "
                   "weights, or a diverged fine-tune): check it with memex generate on one prompt")
            raise NonFiniteImages(f"{e.args[0]}, of prompts {bad[:3]}{' ...' if len(bad) > 3 else ''}. {fix}"
                                  + ". Nothing of this shard was written.") from None

    @torch.no_grad()
    def _triage_batch(self, prompt_ids: list[str], prompts: list[str], seeds: list[int], steps: int) -> np.ndarray:
        x, cond, step_kwargs = self._start(prompt_ids, prompts, seeds, True)
        total = np.zeros(len(seeds), np.float32)
        for t in self.scheduler.timesteps[:steps]:  # the guided trajectory's first steps
            eps, diff = self._predict_noise(x, t, cond, both=True)
            total += noise_norm(diff)
            x = self.scheduler.step(eps, t, x, **step_kwargs).prev_sample
        return total / steps

    def _predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                       both: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(guided eps, eps_text - eps_uncond or None) for one step; both: run the two predictions
        (default: when guidance is on)."""
        both = self.cfg if both is None else both
        diff = None
        if not self.conditional:
            eps = self.unet(self.scheduler.scale_model_input(x, t), t).sample
        else:
            inp = torch.cat([x, x]) if both else x
            eps = self.unet(self.scheduler.scale_model_input(inp, t), t, encoder_hidden_states=cond).sample
            if both:
                eps_uncond, eps_text = eps.chunk(2)
                c = self.unet_channels
                # guidance off (guidance_scale <= 1: the text prediction alone, as generation runs it), the triage
                # of a no-guidance model steps along the text trajectory: gs 0 stepped along the unconditional one
                gs = self.settings.guidance_scale if self.cfg else 1.0
                if eps.shape[1] == c:  # noise only (SD): no copy
                    diff = eps_text - eps_uncond
                    eps = eps_uncond + gs * diff
                else:  # guidance on the noise; the learned variance is the text branch's, as diffusers' IF does
                    diff = eps_text[:, :c] - eps_uncond[:, :c]
                    eps = torch.cat([eps_uncond[:, :c] + gs * diff, eps_text[:, c:]], dim=1)
        if diff is not None and self.prediction_type != "epsilon":
            diff = diff * self._eps_scale(t)
        self.unet_evaluations += eps.shape[0] * (2 if both else 1)
        # a learned-variance half (IF-style UNets) to the scheduler that reads it, else dropped
        return (eps if self.learned_variance else eps[:, : self.unet_channels]), diff

    def _eps_scale(self, t: torch.Tensor) -> float:
        """|d eps| / |d prediction| at timestep t, x_t fixed: v = sqrt(a) eps - sqrt(1-a) x0 and
        x_t = sqrt(a) x0 + sqrt(1-a) eps give d eps = sqrt(a) d v; x0-prediction: d eps = -sqrt(a/(1-a)) d x0."""
        a = self._abar_at(t)
        return a**0.5 if self.prediction_type == "v_prediction" else (a / (1 - a)) ** 0.5

    def _abar_at(self, t: torch.Tensor) -> float:
        """abar of the step whose timestep is t. A scheduler with sigmas (Euler, Heun, LMS, DPM-Solver) gives
        the step's own: abar = 1 / (1 + sigma^2). Euler's timesteps are floats, and with
        timestep_type=continuous (v-prediction EDM checkpoints) they are 0.25 ln(sigma), ~0.7 at the first
        step: looked up in alphas_cumprod, that read abar ~0.999 for SD's ~0.005 (a score ~14x too large).
        Others (DDIM, PNDM, DDPM): alphas_cumprod at t."""
        sc = self.scheduler
        sigmas, steps = getattr(sc, "sigmas", None), getattr(sc, "timesteps", None)
        if isinstance(sigmas, torch.Tensor) and isinstance(steps, torch.Tensor):
            hit = (steps.detach().cpu().double() == float(t)).nonzero()
            if len(hit):
                s = float(sigmas[int(hit[0])])
                # KDPM2's second evaluation of a step runs at the interpolated sigma, not sigmas[i]
                if getattr(sc, "sigmas_interpol", None) is not None and getattr(sc, "state_in_first_order", True) \
                        is False and getattr(sc, "step_index", None) is not None:
                    s = float(sc.sigmas_interpol[sc.step_index])
                return 1.0 / (1.0 + s * s)
        return float(self._abar[min(int(round(float(t))), len(self._abar) - 1)])

    def _decode(self, x: torch.Tensor) -> np.ndarray:
        """(N, H, W, C) uint8 of final latents (pixels for a pixel model); a VAE decodes
        `decode_batch_size` rows at a time (None: all N), each chunk turned to uint8 at once."""
        if self.vae is None:
            _check_finite(_finite_rows(x))
            return self._to_uint8(x)
        chunk = min(self.settings.decode_batch_size or len(x), len(x))  # batches are never empty (_batched pads)
        out, ok = [], []
        for c in x.split(chunk):
            # every chunk decoded at one shape: a last, shorter chunk (decode_batch_size not dividing
            # batch_size) gave its rows other conv arithmetic than the same rows at other positions, and a
            # sample regenerated alone differed by 1/255 (the byte-identity promise); padded with copies
            n = len(c)
            if n < chunk:
                c = torch.cat([c, c[-1:].expand(chunk - n, *c.shape[1:])])
            img = self._vae_decode(c)[:n]
            ok.append(_finite_rows(img))
            out.append(self._to_uint8(img))
        _check_finite(torch.cat(ok))  # the batch's rows, whichever chunk held them
        return np.concatenate(out)

    def _vae_decode(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.vae.decode(x / self.vae.config.scaling_factor).sample
        except torch.OutOfMemoryError as e:  # a batch the UNet fits can still overflow here: name the knob
            raise NamedOutOfMemory(
                f"the VAE decode of {len(x)} images of {self.height}x{self.width} ran out of {self.device} memory "
                f"(SD 1.x's decoder holds ~0.8 GB an image at 512 px in float32: bench/RESULTS.md): set "
                f"sampling.decode_batch_size to decode fewer at a time (4, say), or lower sampling.batch_size "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e

    @staticmethod
    def _to_uint8(x: torch.Tensor) -> np.ndarray:
        x = (x.float() / 2 + 0.5).clamp(0, 1)
        return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
