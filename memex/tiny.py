"""Tiny, randomly initialised diffusers checkpoints of the three families memex audits.

They are built from configs in code (no hub download), saved with ``save_pretrained`` and loaded
back through the same ``from_pretrained`` code the cluster uses. Sizes are ~0.1-2 MB each, so tests
and the README demo run in seconds on 2 CPU cores.

  unconditional  UNet2DModel + DDPM scheduler                  (the paper's CIFAR-10 setting)
  latent_text    StableDiffusionPipeline layout: UNet2DConditionModel, AutoencoderKL,
                 CLIPTextModel + CLIPTokenizer                  (Stable Diffusion 1.x/2.x)
  pixel_text     IFPipeline layout (pixel-space, no VAE): UNet2DConditionModel, text encoder,
                 tokenizer, DDPM scheduler                      (Imagen / DeepFloyd IF)
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


def build(kind: str, folder: str | Path, image_size: int = 16, seed: int = 0) -> Path:
    """Build a tiny random pipeline of ``kind`` and ``save_pretrained`` it (safetensors) to ``folder``."""
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
    folder = Path(folder)
    if kind == "unconditional":
        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=image_size,
            in_channels=3,
            out_channels=3,
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
