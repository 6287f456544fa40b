"""The VAE decode of one sampling batch at SD 1.x's real shape: memex's Sampler with
`sampling.decode_batch_size` (chunks of k rows) against the plain whole-batch decode that diffusers'
pipelines do (`vae.decode(latents / scaling_factor)`), each in a fresh process (peak RSS is per
process), on the same latents.

The VAE is SD 1.x's (AutoencoderKL with its config: 128-512 channels, 83M parameters, random weights
built from the config), decoding 64x64 latents to 512x512 images in float32; the UNet and text
encoder of the folder are the tiny ones (memex/tiny.py), which the decode never touches. Tiny
models, which every other bench uses, hide this cost: their decoders are 8-16 channels wide.

    python bench/bench_decode.py [--batch 8] [--chunks 1,4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(2)
mode, folder, batch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
from memex.config import SamplingConfig
from memex.models import load_model
from memex.sampling import Sampler
model = load_model(folder)
sampler = None if mode == "plain" else Sampler(model, SamplingConfig(decode_batch_size=int(mode)))
z = torch.randn(batch, 4, 64, 64, generator=torch.Generator().manual_seed(0))
rss = lambda key: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 2**20
before = rss("VmRSS:")
t0 = time.perf_counter()
with torch.no_grad():
    if mode == "plain":  # what StableDiffusionPipeline does with output_type="np"
        x = model.pipe.vae.decode(z / model.pipe.vae.config.scaling_factor).sample
        images = ((x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    else:
        images = sampler._decode(z)  # memex's decode, as Sampler.generate runs it on a batch
seconds = time.perf_counter() - t0
np.save(out, images)
# VmHWM: this process's peak; above the RSS before the decode (the loaded model, the latents)
print(json.dumps({"seconds": seconds, "peak_above_gb": rss("VmHWM:") - before}))
"""


def build(folder: Path) -> Path:
    """The tiny latent text model with SD 1.x's VAE (config from SD 1.5's vae/config.json)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from memex import tiny

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny.build("latent_text", folder / "tiny")))
    torch.manual_seed(0)
    pipe.vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                             down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                             block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                             scaling_factor=0.18215).eval()
    pipe.save_pretrained(folder / "sd-vae", safe_serialization=True)
    return folder / "sd-vae"


def run(mode: str, folder: Path, batch: int, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder), str(batch), str(out)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunks", default="1,4")
    args = ap.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp))
        res = {}
        for mode in ["plain", *map(str, chunks)]:
            res[mode] = run(mode, folder, args.batch, Path(tmp) / f"{mode}.npy")
            res[mode]["images"] = np.load(Path(tmp) / f"{mode}.npy")
    print(f"VAE decode of {args.batch} SD 1.x latents (64x64 -> 512x512), float32, 2 CPU threads")
    print(f"{'':28} {'s / image':>10} {'peak GB above':>14} {'GB / image':>11} {'pixels != plain':>16}")
    base = res["plain"]
    for mode, r in res.items():
        name = "plain (whole batch)" if mode == "plain" else f"memex decode_batch_size={mode}"
        diff = np.abs(r["images"].astype(int) - base["images"])
        print(f"{name:28} {r['seconds'] / args.batch:10.2f} {r['peak_above_gb']:14.2f} "
              f"{r['peak_above_gb'] / (args.batch if mode == 'plain' else min(int(mode), args.batch)):11.2f} "
              f"{int((diff > 0).sum()):>9} (max {int(diff.max())})")
    for c in chunks:
        r = res[str(c)]
        print(f"decode_batch_size={c}: peak {r['peak_above_gb'] / base['peak_above_gb']:.2f}x plain, "
              f"time {r['seconds'] / base['seconds']:.2f}x plain")


if __name__ == "__main__":
    main()
