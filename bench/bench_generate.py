"""memex's sampler against a plain loop over the diffusers pipeline: same model, prompts, seeds, steps.

    python bench/bench_generate.py [--prompts 4 --samples 10 --batch 8 --steps 20 --size 32 --repeats 3]

The plain alternative is what one writes by hand: for each prompt, call the pipeline with
`num_images_per_prompt=batch` and one seeded generator per image. memex batches across prompts
(no partial batch per prompt), encodes each prompt once, and skips the pipeline's per-call
checks and progress bars. Both return uint8 images for the same (prompt, seed) pairs; the script
prints the largest pixel difference between the two to show they compute the same samples.
Timings alternate plain/memex `repeats` times and report medians (first call of each warms up).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from memex import tiny
from memex.config import SamplingConfig
from memex.models import load_model
from memex.prompts import prompt_id
from memex.sampling import Sampler, sample_seed

PROMPTS = ["a red apple on a table", "a lighthouse at dusk", "the blue logo of a bank", "portrait of a man",
           "a cat on a sofa", "mountain lake at noon", "a vintage car", "a bowl of soup"]


def plain_loop(pipe, units, batch, steps, guidance, size) -> np.ndarray:
    out = []
    by_prompt: dict[str, list[int]] = {}
    for text, seed in units:
        by_prompt.setdefault(text, []).append(seed)
    for text, seeds in by_prompt.items():
        for b in range(0, len(seeds), batch):
            chunk = seeds[b : b + batch]
            gens = [torch.Generator("cpu").manual_seed(s) for s in chunk]
            img = pipe(prompt=text, num_images_per_prompt=len(chunk), generator=gens, num_inference_steps=steps,
                       guidance_scale=guidance, height=size, width=size, output_type="np").images
            out.append((np.asarray(img) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def memex_sampler(sampler, units) -> np.ndarray:
    texts = [t for t, _ in units]
    return sampler.generate([prompt_id(t) for t in texts], texts, [s for _, s in units])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # latent_text only: IFPipeline.__call__ pads prompts to 77 tokens (T5), which the tiny CLIP
    # encoder of the pixel family cannot take, so there is no plain pipeline loop to compare with.
    ap.add_argument("--kind", default="latent_text", choices=["latent_text"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=10, help="samples per prompt")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    folder = Path(tempfile.mkdtemp()) / a.kind
    tiny.build(a.kind, folder, image_size=a.size)
    model = load_model(str(folder))
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    sampler = Sampler(model, SamplingConfig(num_inference_steps=a.steps, guidance_scale=a.guidance,
                                             height=a.size, width=a.size, batch_size=a.batch))
    prompts = PROMPTS[: a.prompts]
    units = [(t, sample_seed(0, prompt_id(t), i)) for t in prompts for i in range(a.samples)]

    plain_loop(pipe, units[:1], 1, 2, a.guidance, a.size)  # warm-up
    memex_sampler(sampler, units[:1])
    t_plain, t_memex = [], []
    with torch.no_grad():
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            ref = plain_loop(pipe, units, a.batch, a.steps, a.guidance, a.size)
            t_plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = memex_sampler(sampler, units)
            t_memex.append(time.perf_counter() - t0)
    n = len(units)
    p, m = statistics.median(t_plain), statistics.median(t_memex)
    diff = int(np.abs(ref.astype(int) - got.astype(int)).max())
    print(f"model={a.kind} {a.size}x{a.size} prompts={a.prompts} samples/prompt={a.samples} batch={a.batch} "
          f"steps={a.steps} threads={a.threads} repeats={a.repeats}")
    print(f"plain diffusers loop : {n / p:7.2f} samples/s  (median {p:.2f}s)")
    print(f"memex Sampler        : {n / m:7.2f} samples/s  (median {m:.2f}s)")
    print(f"throughput ratio memex/plain = {p / m:.2f}x ; max pixel difference = {diff}/255")


if __name__ == "__main__":
    main()
