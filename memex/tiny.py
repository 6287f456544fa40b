"""Tiny, randomly initialised diffusers checkpoints of the three families memex audits.

They are built from configs in code (no hub download), saved with ``save_pretrained`` and loaded
back through the same ``from_pretrained`` code the cluster uses. Sizes are ~0.1-2 MB each, so tests
and the README demo run in seconds on 2 CPU cores.

  unconditional  UNet2DModel + DDPM scheduler                  (the paper's CIFAR-10 setting;
                 channels=1: MNIST-style grayscale)
  latent_text    StableDiffusionPipeline layout: UNet2DConditionModel, AutoencoderKL,
                 CLIPTextModel + CLIPTokenizer                  (Stable Diffusion 1.x/2.x)
  pixel_text     IFPipeline layout (pixel-space, no VAE): UNet2DConditionModel, text encoder,
                 tokenizer, DDPM scheduler                      (Imagen / DeepFloyd IF)

``build_sd15`` adds Stable Diffusion 1.x at its real image size: an 8x VAE (512 px -> 64x64x4
latents), PNDMScheduler with SD 1.5's scheduler config, cross-attention only at the lowest UNet
level, so "real scale" paths (shapes, memory, PNG sizes, the default scheduler) run on CPU.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

KINDS = ("unconditional", "latent_text", "pixel_text")


def build_tokenizer(folder: str | Path, max_length: int = 16):
    """A character-level CLIP BPE tokenizer (no merges) that saves and loads with no network.

    Vocabulary: printable ASCII, each with and without the end-of-word suffix, plus CLIP's
    start/end tokens: ~200 ids. Unknown characters map to <|endoftext|>.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(string.printable) - set(string.whitespace))
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok


def build_text_encoder(vocab_size: int, max_length: int, hidden: int = 32, seed: int = 0, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(cfg).eval()


def _cond_unet(in_channels: int, cross_dim: int, sample_size: int, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def build(kind: str, folder: str | Path, image_size: int = 16, seed: int = 0, channels: int = 3) -> Path:
    """Build a tiny random pipeline of ``kind`` and ``save_pretrained`` it (safetensors) to ``folder``.

    channels: image channels of the unconditional model (1: grayscale; others, e.g. 4, to test refusals);
    the text families are RGB only.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMPipeline,
        DDPMScheduler,
        IFPipeline,
        StableDiffusionPipeline,
        UNet2DModel,
    )

    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {KINDS}")
    if channels != 3 and kind != "unconditional":
        raise ValueError(f"channels={channels}: only the unconditional tiny model has a channel count other than 3")
    folder = Path(folder)
    if kind == "unconditional":
        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=image_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        ).eval()
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
        pipe.save_pretrained(folder, safe_serialization=True)
        return folder

    tokenizer = build_tokenizer(folder / "_tok_tmp")
    text_encoder = build_text_encoder(len(tokenizer), tokenizer.model_max_length, seed=seed)
    if kind == "latent_text":
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=image_size,
        ).eval()
        # 2 VAE blocks -> latents are image_size / 2.
        unet = _cond_unet(4, text_encoder.config.hidden_size, image_size // 2, seed)
        scheduler = DDIMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    else:
        unet = _cond_unet(3, text_encoder.config.hidden_size, image_size, seed)
        pipe = IFPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
            scheduler=DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_small"),
            safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    import shutil

    shutil.rmtree(folder / "_tok_tmp", ignore_errors=True)
    return folder


# SD 1.5's scheduler/scheduler_config.json (the PNDM it ships: PLMS steps only, no Runge-Kutta warm-up).
# clip_sample is not a PNDM argument: from_config keeps it in the saved config, where a DDIM built
# from it (sampling.scheduler=ddim) reads it; without it DDIM would clip x0 to [-1, 1] latents.
SD15_SCHEDULER = dict(_class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True,
                      steps_offset=1)


def build_sd15(folder: str | Path, image_size: int = 512, seed: int = 0) -> Path:
    """A tiny random Stable Diffusion 1.x pipeline at full image size, saved with ``save_pretrained``.

    SD's shapes, tiny widths: VAE with 4 blocks (8x: 512 px <-> 64x64x4 latents, as SD), UNet with
    3 levels (64, 32, 16 for 512 px) and cross-attention only at the lowest one (16x16 = 256 tokens).
    Why: one guided UNet call (batch 2) takes ~25 ms on 2 idle CPU threads; with cross-attention
    at 64x64 as well (4096 tokens) ~430 ms, ~22 s instead of ~1.3 s a 50-step sample. The VAE
    decode of one 512 px image: ~0.14 s. A 50-step guided sample: ~1.2-1.5 s at batch_size 1,
    ~1.05 s at batch_size 4. PNDMScheduler as SD 1.5 ships it.
    image_size: a multiple of 32 (8x VAE, then 2 UNet downsamplings).
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    if image_size % 32:
        raise ValueError(f"image_size={image_size} must be a multiple of 32 (8x VAE x 4x UNet)")
    folder = Path(folder)
    tokenizer = build_tokenizer(folder / "_tok_tmp")
    text_encoder = build_text_encoder(len(tokenizer), tokenizer.model_max_length, seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),  # 8 at full resolution: the decoder's 512x512 convs dominate
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=image_size // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size,
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    import shutil

    shutil.rmtree(folder / "_tok_tmp", ignore_errors=True)
    return folder
