"""The generate stage's PNG encoding overlapped with the next batch (GenerateShards.encode_threads=1)
against encoding each batch in turn (=0, how the stage ran before), on the same run, in one process.

A tiny model of SD 1.x's layout (memex/tiny.py build_sd15: 512x512 outputs, PNDM) generates
--samples images in shards of --shard samples, batches of --batch, with torch held to --threads
threads. On a GPU actor the CPU idles while the UNet runs, so the encoding is hidden there; on
this CPU, torch on one thread leaves the other core to the encoder, the closest stand-in. The
stage runs with resources.executor=local (no Ray actor start-up in the timing).

    python bench/bench_png_overlap.py [--samples 32] [--batch 4] [--steps 3] [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from memex import cli, tiny
from memex.images import encode_png
from memex.layout import RunLayout
from memex.stages import generate


def run(folder: Path, model: Path, root: Path, a, threads: int) -> tuple[float, bytes]:
    generate.GenerateShards.encode_threads = threads
    prompts = folder / "prompts.txt"
    prompts.write_text("a photo of a lighthouse\nan apple on a table\n")
    cfg = cli.to_generate_config(cli.compose_config("generate", [
        "model=local", f"model.path={model}", "prompts=file", f"prompts.path={prompts}", f"storage.root={root}",
        f"sampling.samples_per_prompt={a.samples // 2}", f"sampling.batch_size={a.batch}",
        f"sampling.shard_size={a.shard}", f"sampling.num_inference_steps={a.steps}", "resources.executor=local"]))
    name = generate.prepare(cfg)
    t0 = time.perf_counter()
    generate.run(cfg, name)
    took = time.perf_counter() - t0
    return took, RunLayout(str(root), name).samples.read()["image"].to_pylist()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--shard", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny.build_sd15(tmp / "sd15", image_size=512)
        run(tmp, model, tmp / "warm-up", a, 1)  # first model load and calls, timed by neither
        took: dict[int, list[float]] = {0: [], 1: []}
        first: dict[int, bytes] = {}
        for r in range(a.repeats):
            for threads in (0, 1):
                t, png = run(tmp, model, tmp / f"runs-{threads}-{r}", a, threads)
                took[threads].append(t)
                first[threads] = png
        assert first[0] == first[1], "the two ways wrote different bytes"
        img = torch.rand(512, 512, 3).mul(255).to(torch.uint8).numpy()
        t0 = time.perf_counter()
        for _ in range(8):
            encode_png(img, 1)
        png_s = (time.perf_counter() - t0) / 8
    inline, overlap = min(took[0]), min(took[1])
    print(f"generate stage: {a.samples} samples of 512x512 (tiny SD 1.x layout), batch {a.batch}, shards of "
          f"{a.shard}, {a.steps} PNDM steps, torch threads {a.threads}, best of {a.repeats}")
    print(f"  PNG encoded in turn (encode_threads=0)      : {inline:7.2f} s  {a.samples / inline:6.2f} samples/s")
    print(f"  PNG encoded beside the next batch (=1)      : {overlap:7.2f} s  {a.samples / overlap:6.2f} samples/s")
    print(f"  overlap / in turn = {inline / overlap:.2f}x; one 512 px noise PNG at level 1: {png_s * 1e3:.0f} ms; "
          f"same bytes: yes")


if __name__ == "__main__":
    main()
