"""Loading an SD 1.x-layout folder: memex `load_model` (the safety checker and feature extractor
passed as None: memex/models.py UNUSED_COMPONENTS) against a plain `DiffusionPipeline.from_pretrained`
of the same folder, each in a fresh process (peak RSS is per process), alternated.

The folder is the tiny latent text model (memex/tiny.py) with a safety checker of SD 1.5's real
shape (CLIP ViT-L/14 vision tower, 304M parameters, 1.2 GB in float32, random weights built from
its config): the component memex never runs, at its real size; the UNet, VAE and text encoder are
the tiny ones, so the difference is the safety checker's alone.

    python bench/bench_load.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
t0 = time.perf_counter()
if sys.argv[1] == "memex":
    from memex.models import load_model
    pipe = load_model(sys.argv[2], dtype=sys.argv[3]).pipe
else:
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(sys.argv[2], torch_dtype=getattr(torch, sys.argv[3]))
seconds = time.perf_counter() - t0
# VmHWM, not getrusage's ru_maxrss: that one keeps the forking parent's peak (this bench's builder)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_gb": hwm / 2**20,
                  "safety_checker": type(pipe.safety_checker).__name__}))
"""


def build(folder: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from memex import tiny

    base = StableDiffusionPipeline.from_pretrained(str(tiny.build("latent_text", folder / "tiny")))
    # SD 1.5's safety_checker/config.json: CLIP ViT-L/14 at 224 px, projection 768
    cfg = CLIPConfig(vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                        num_hidden_layers=24, patch_size=14, image_size=224), projection_dim=768)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(cfg).eval()
    parts = {k: getattr(base, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    StableDiffusionPipeline(**parts, safety_checker=checker, feature_extractor=CLIPImageProcessor(),
                            requires_safety_checker=True).save_pretrained(folder / "sd", safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    # float32: the weights stay memory-mapped from the safetensors file until touched, so RSS hardly
    # sees them; bfloat16 casts (reads) every weight, as `.to("cuda")` copies every one to the GPU
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder)
        size = sum(f.stat().st_size for f in (folder / "sd" / "safety_checker").iterdir()) / 1e9
        print(f"folder: tiny SD 1.x layout + a {size:.2f} GB safety checker (SD 1.5's shape)")
        for dtype in args.dtypes:
            report(dtype, measure(folder / "sd", dtype, args.repeats), args.repeats)


def measure(folder: Path, dtype: str, repeats: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {"plain": [], "memex": []}
    for _ in range(repeats):
        for who in runs:
            out = subprocess.run([sys.executable, "-c", CHILD, who, str(folder), dtype], capture_output=True,
                                 text=True, check=True)
            runs[who].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def report(dtype: str, runs: dict[str, list[dict]], repeats: int) -> None:
    med = {who: {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in ("seconds", "peak_rss_gb")}
           for who, rs in runs.items()}
    for who, rs in runs.items():
        print(f"{dtype:8s} {who:6s}: load {med[who]['seconds']:6.2f} s  peak RSS {med[who]['peak_rss_gb']:5.2f} GB  "
              f"safety checker loaded: {rs[0]['safety_checker']}  (medians of {repeats}, fresh processes)")
    print(f"{dtype:8s} memex/plain: load time {med['memex']['seconds'] / med['plain']['seconds']:.2f}x, "
          f"peak RSS {med['memex']['peak_rss_gb'] / med['plain']['peak_rss_gb']:.2f}x "
          f"({med['plain']['peak_rss_gb'] - med['memex']['peak_rss_gb']:.2f} GB less per sampler actor)")


if __name__ == "__main__":
    main()
