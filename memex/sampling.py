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
    alone at the same batch_size on the same kind of device is byte-identical. Padding costs at
    most one partial batch per shard.
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

from memex.config import ModelKind, SamplingConfig
from memex.models import LoadedModel, ModelError, make_scheduler

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


def takes_generator(scheduler) -> bool:
    """Whether `scheduler.step` has a `generator` parameter (what diffusers' pipelines check, once)."""
    return "generator" in inspect.signature(scheduler.step).parameters


class Sampler:
    """Generates uint8 images for (prompt id, prompt, seed) triples with one model."""

    def __init__(self, model: LoadedModel, settings: SamplingConfig):
        pipe = model.pipe
        self.kind = model.kind
        self.unet = pipe.unet
        self.vae = getattr(pipe, "vae", None) if self.kind == ModelKind.latent_text else None
        self.text_encoder = getattr(pipe, "text_encoder", None)
        self.tokenizer = getattr(pipe, "tokenizer", None)
        self.scheduler = make_scheduler(pipe.scheduler.config, settings.scheduler, model.path or model.model_id)
        self._step_generator = takes_generator(self.scheduler)
        self.settings = settings
        self.device, self.dtype = self.unet.device, self.unet.dtype
        self.scheduler_name = type(self.scheduler).__name__

        native = self.unet.config.sample_size
        native = native if isinstance(native, int) else native[0]
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.height = settings.height or native * self.vae_scale
        self.width = settings.width or native * self.vae_scale
        if self.height % self.vae_scale or self.width % self.vae_scale:
            raise ValueError(f"image size {self.height}x{self.width} must be a multiple of {self.vae_scale} "
                             "for this VAE")
        self.unet_channels = self.unet.config.in_channels  # what the noise and the UNet's sample have
        self.channels = image_channels(model)  # C of the (N, H, W, C) images: 1 or 3
        self.conditional = self.kind != ModelKind.unconditional
        self.cfg = self.conditional and settings.guidance_scale > 1.0
        self._embeds: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.prompts_encoded = 0  # text-encoder rows computed: once per distinct prompt (+1 empty)
        self._uncond = self._encode([""]) if self.cfg else None

    # 1. text embeddings, cached per prompt id ------------------------------------------
    @torch.no_grad()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        mask = tok.attention_mask.to(self.device) if self.text_encoder.config.model_type == "t5" else None
        out = self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]
        self.prompts_encoded += len(texts)
        return out.to(self.dtype)

    def embeddings(self, prompt_ids: list[str], prompts: list[str]) -> torch.Tensor:
        """(B, L, D) conditional embeddings; each distinct prompt is encoded at most once."""
        todo = {pid: p for pid, p in zip(prompt_ids, prompts) if pid not in self._embeds}
        for pid, text in todo.items():  # one at a time: a fixed shape (see module doc), ~1 ms each
            self._embeds[pid] = self._encode([text])[0]
            if len(self._embeds) > EMBED_CACHE:
                self._embeds.popitem(last=False)
        for pid in prompt_ids:
            self._embeds.move_to_end(pid)
        return torch.stack([self._embeds[pid] for pid in prompt_ids])

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
        if not (len(prompt_ids) == len(prompts) == len(seeds)):
            raise ValueError("prompt_ids, prompts and seeds must have the same length")
        bs, out = self.settings.batch_size, []
        for b in range(0, len(seeds), bs):
            n = len(seeds[b : b + bs])
            pad = [0] * (bs - n)  # repeat the first row: padded rows are computed and dropped
            take = lambda xs: xs[b : b + n] + [xs[b] for _ in pad]  # noqa: E731
            out.append(self._generate_batch(take(prompt_ids), take(prompts), take(seeds))[:n])
        return np.concatenate(out) if out else np.zeros((0, self.height, self.width, self.channels), np.uint8)

    @torch.no_grad()
    def _generate_batch(self, prompt_ids: list[str], prompts: list[str], seeds: list[int]) -> np.ndarray:
        # set_timesteps first: init_noise_sigma (Euler, DPM) depends on the timestep schedule
        self.scheduler.set_timesteps(self.settings.num_inference_steps, device=self.device)
        gens = self._generators(seeds)
        x = self._initial_noise(gens)
        cond = self.embeddings(prompt_ids, prompts) if self.conditional else None
        if self.cfg:
            cond = torch.cat([self._uncond.expand(len(seeds), -1, -1), cond])
        step_kwargs = {"generator": gens} if self._step_generator else {}
        for t in self.scheduler.timesteps:  # 2nd-order schedulers list each inner timestep twice
            eps = self._predict_noise(x, t, cond)
            x = self.scheduler.step(eps, t, x, **step_kwargs).prev_sample
        return self._decode(x)

    def _predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if not self.conditional:
            eps = self.unet(self.scheduler.scale_model_input(x, t), t).sample
        else:
            inp = torch.cat([x, x]) if self.cfg else x
            eps = self.unet(self.scheduler.scale_model_input(inp, t), t, encoder_hidden_states=cond).sample
            if self.cfg:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + self.settings.guidance_scale * (eps_text - eps_uncond)
        return eps[:, : self.unet_channels]  # drop a learned-variance half (IF-style UNets)

    def _decode(self, x: torch.Tensor) -> np.ndarray:
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        x = (x.float() / 2 + 0.5).clamp(0, 1)
        return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
