"""`memex train`'s training set in memory: loading it (memex/training.py load_training_set) and hashing it for the
recipe (recipe), the code before against memex's, on the same manifest.

    python bench/bench_train_memory.py                      # 2,000 JPEGs, 256x256 (375 MiB as uint8)
    python bench/bench_train_memory.py --images 400 --size 256

The manifest: --images photo-like JPEGs (bench_match_memory.picture: a colour grid with grain) of --size px, a
text model's captions, at the model's resolution (no resize). Each side runs in a fresh subprocess: it imports
its training module, then loads the set and computes the recipe as `memex train` does before training; its
memory is the peak RSS (resource.getrusage) above its RSS once the imports are done, and recipe()'s own peak is
sampled (/proc/self/statm every 2 ms) above the RSS it starts at. Both must give the same recipe digest
(asserted: checkpoints and output folders of before still resume).
  plain  memex/training.py as of --old-ref (the code before): the decoded images as a list, np.stack's copy and
         two float32 temporaries, kept as float32; recipe() hashes a C-order float32 copy of the whole set
  memex  the working tree's: one uint8 array filled as images decode; recipe() converts and hashes 32 MiB of
         float32 at a time
Both sides also hold the manifest (memory-mapped Parquet: its pages count once read) and what loading allocates
beside the pixels (the expanded manifest, captions).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
OLD_REF = "f1a5f58"  # the last commit whose memex/training.py held the set as float32


def make_inputs(folder: Path, n: int, size: int, seed: int = 0) -> float:
    """folder/train.parquet; returns its MB of image bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_match_memory import picture
    from PIL import Image

    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(picture(rng, size, size)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    pq.write_table(pa.table({"id": [f"t{k}" for k in range(n)], "image": pa.array(jpegs, pa.binary()),
                             "caption": [f"picture {k}" for k in range(n)]}), folder / "train.parquet")
    return sum(map(len, jpegs)) / 2**20


def _module(kind: str, folder: str):
    if kind == "memex":
        import memex.training as training

        return training
    spec = importlib.util.spec_from_file_location("training_before", f"{folder}/training_before.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def side(kind: str, folder: str, size: int) -> None:
    import pyarrow.parquet as pq
    from bench_match_memory import rss_mib

    from memex.config import ArchConfig, DataConfig, TrainConfig
    from memex.images import decode

    training = _module(kind, folder)
    cfg = TrainConfig(arch=ArchConfig(resolution=size), data=DataConfig(path=f"{folder}/train.parquet"),
                      output=f"{folder}/out-{kind}")
    # what loading imports on first use (the tokenizer's transformers, PIL's JPEG decoder), before the base
    training.check_captions_fit(["a", "b"], 48)
    with pq.ParquetFile(f"{folder}/train.parquet") as f:
        decode(next(f.iter_batches(batch_size=1, columns=["image"]))["image"][0].as_py())
    base = rss_mib()
    t0 = time.perf_counter()
    _, images, captions, example_image, _ = training.load_training_set(cfg)
    load_s = time.perf_counter() - t0
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    held = rss_mib()
    top, done = [held], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            top[0] = max(top[0], rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    digest = training.recipe(cfg, images, captions, example_image)["training_set_sha256"]
    recipe_s = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak - base, "load_peak_mib": load_peak - base, "held_mib": held - base,
                      "recipe_mib": max(top[0], rss_mib()) - held, "load_s": load_s, "recipe_s": recipe_s,
                      "dtype": str(images.dtype), "digest": digest}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="distinct training images")
    ap.add_argument("--size", type=int, default=256, help="their side in px, the model's arch.resolution")
    ap.add_argument("--old-ref", default=OLD_REF, help="the commit whose memex/training.py is the code before")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return side(a.side, a.folder, a.size)
    with tempfile.TemporaryDirectory() as tmp:
        before = subprocess.run(["git", "-C", str(REPO), "show", f"{a.old_ref}:memex/training.py"],
                                capture_output=True, text=True, check=True).stdout
        Path(tmp, "training_before.py").write_text(before)
        mb = make_inputs(Path(tmp), a.images, a.size)
        print(f"{a.images} training images {a.size}x{a.size} JPEG ({mb:.0f} MB encoded, "
              f"{a.images * a.size * a.size * 3 / 2**20:.0f} MiB as uint8, "
              f"{a.images * a.size * a.size * 12 / 2**20:.0f} MiB as float32)")
        out = {}
        for kind in ("plain", "memex"):
            r = subprocess.run([sys.executable, __file__, "--side", kind, "--folder", tmp, "--size", str(a.size)],
                               capture_output=True, text=True, check=True)
            out[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["plain"]["digest"] == out["memex"]["digest"], "the sides' recipes hash differently"
    print(f"{'side':<6} {'peak MiB':>9} {'load peak':>10} {'held':>7} {'recipe +MiB':>12} {'load s':>7} "
          f"{'recipe s':>9}  images")
    for kind, o in out.items():
        print(f"{kind:<6} {o['peak_mib']:>9.0f} {o['load_peak_mib']:>10.0f} {o['held_mib']:>7.0f} "
              f"{o['recipe_mib']:>12.0f} {o['load_s']:>7.1f} {o['recipe_s']:>9.1f}  {o['dtype']}")
    p, m = out["plain"], out["memex"]
    print(f"memex / plain: {m['peak_mib'] / p['peak_mib']:.2f}x the peak memory ({p['peak_mib'] / m['peak_mib']:.1f}x "
          f"less), {p['held_mib'] / m['held_mib']:.1f}x less held while training; equal recipe digest "
          f"{m['digest'][:12]}")


if __name__ == "__main__":
    main()
