"""The match stage's driver memory for one samples shard at LAION shapes: its neighbours' training
images held decoded (memex before) against held encoded and decoded on a cut miss (match.TrainPixels).

    python bench/bench_match_memory.py                       # 64 generations x k = 10, 640 distinct 1024x1536 JPEGs
    python bench/bench_match_memory.py --train-size 768x1024 --generations 32
    python bench/bench_match_memory.py --grayscale           # a 1-channel model: "L" generations, luma compared

A samples shard is 64 generations (sampling.shard_size); match verifies each against its k = 10
nearest training images by embedding, so a shard needs up to 640 training images. Here every
generation has its own 10 (no two share one: the most a shard can hold, as with diverse prompts).
Both sides start from the same table of encoded images (what train_rows.read_gids returns) and run
match.verify_all on the same inputs with the stage's cache of cut images (`Compared`,
resources.pixel_cache_mb), and must return the same rows (asserted):
  plain  every neighbour decoded first (ingest.decode_rows, as match's fetch did), then verified
  memex  the neighbours kept encoded (match.TrainPixels), each decoded when its cut one is not kept
Each side runs in a fresh subprocess, one torch thread; memory is the process's peak RSS
(resource.getrusage) above its RSS once its inputs are read, so what each side adds on top of the
encoded table both share. Images are synthetic at the real shapes: smooth colour fields with
grain, JPEG quality 90 (sizes printed), generations 512x512 PNGs. --grayscale: the generations are
"L" PNGs, as a 1-channel model's, so both sides compare them with the training images' luma
(match.Luma over either side's pixels).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def picture(rng, h: int, w: int) -> np.ndarray:
    """A photo-like uint8 (h, w, 3): an 8x8 colour grid upsampled, with grain (JPEG sizes like photos')."""
    from PIL import Image

    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.int16)
    return np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def make_inputs(folder: Path, n_gen: int, k: int, size: tuple[int, int], gray: bool = False, seed: int = 0) -> dict:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from memex.images import encode_png, luma_rgb

    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(n_gen * k):
        buf = io.BytesIO()
        Image.fromarray(picture(rng, *size)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    pq.write_table(pa.table({"id": [f"t{g}" for g in range(len(jpegs))], "gid": np.arange(len(jpegs)),
                             "image": pa.array(jpegs, pa.binary())}), folder / "train.parquet")
    gens = [encode_png(luma_rgb(p)[..., :1] if gray else p) for p in (picture(rng, 512, 512) for _ in range(n_gen))]
    pq.write_table(pa.table({"sample_id": [f"p{j // 8}/{j % 8}" for j in range(n_gen)],
                             "prompt_id": [f"p{j // 8}" for j in range(n_gen)],
                             "prompt": [f"prompt {j // 8}" for j in range(n_gen)],
                             "image": pa.array(gens, pa.binary())}), folder / "samples.parquet")
    return {"train_mb": sum(map(len, jpegs)) / 2**20, "train_kb_each": sum(map(len, jpegs)) / len(jpegs) / 1024}


def side(kind: str, folder: str, k: int, cache_mb: int) -> None:
    """One side in this process: prints a JSON line (seconds, peak MiB above the inputs, rows)."""
    import pyarrow.parquet as pq
    import torch

    from memex.config import MatchConfig
    from memex.ingest import decode_rows
    from memex.stages.match import Compared, TrainPixels, verify_all

    torch.set_num_threads(1)
    train = pq.read_table(f"{folder}/train.parquet")
    samples = pq.read_table(f"{folder}/samples.parquet")
    n = samples.num_rows
    I = np.arange(n * k).reshape(n, k)  # generation j's own k neighbours
    D = np.zeros(I.shape, np.float32)
    meta = {g: (i, "") for g, i in zip(train["gid"].to_pylist(), train["id"].to_pylist())}
    base = rss_mib()
    t0 = time.perf_counter()
    if kind == "plain":  # the fetch decoded every neighbour of the shard up front
        dec = decode_rows(train.select(["id", "image"]), None)
        gid_of = dict(zip(train["id"].to_pylist(), train["gid"].to_pylist()))
        pixels = {gid_of[i]: img for i, img in zip(dec.ids, dec.images)}
    else:
        pixels = TrainPixels(dict(zip(train["gid"].to_pylist(), train["image"].to_pylist())),
                             {g: str(g) for g in train["gid"].to_pylist()})
    compared = Compared("center_crop", cache_mb << 20)
    rows = verify_all(samples, D, I, pixels, meta, MatchConfig(), "l2", "center_crop", {}, compared)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak - base, "rows": rows, "cut": compared.made}))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generations", type=int, default=64, help="one samples shard (sampling.shard_size)")
    ap.add_argument("--k", type=int, default=10, help="match.k")
    ap.add_argument("--train-size", default="1024x1536", help="training images HxW")
    ap.add_argument("--cache-mb", type=int, nargs="+", default=[1024, 256],
                    help="resources.pixel_cache_mb values run on the memex side (the plain side: the first)")
    ap.add_argument("--grayscale", action="store_true", help="1-channel generations (a grayscale model's)")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return side(a.side, a.folder, a.k, a.cache_mb[0])
    h, w = (int(x) for x in a.train_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        sizes = make_inputs(Path(tmp), a.generations, a.k, (h, w), a.grayscale)
        kind = "grayscale " if a.grayscale else ""
        print(f"one samples shard: {a.generations} {kind}generations 512x512 x k = {a.k}: "
              f"{a.generations * a.k} distinct training images {h}x{w}, JPEG {sizes['train_kb_each']:.0f} KB each "
              f"({sizes['train_mb']:.0f} MB encoded, {a.generations * a.k * h * w * 3 / 2**20:.0f} MiB decoded); "
              "one torch thread")
        runs = [("plain", a.cache_mb[0])] + [("memex", c) for c in a.cache_mb]
        out = {}
        for kind, cache in runs:
            r = subprocess.run([sys.executable, __file__, "--side", kind, "--folder", tmp, "--k", str(a.k),
                                "--cache-mb", str(cache)], capture_output=True, text=True, check=True)
            out[kind, cache] = json.loads(r.stdout.strip().splitlines()[-1])
    want = out[runs[0]]["rows"]
    assert all(o["rows"] == want for o in out.values()), "the sides' rows differ"
    print(f"{'side':<6} {'pixel_cache_mb':>14} {'peak MiB above inputs':>22} {'seconds':>8} {'cuts':>5}")
    for (kind, cache), o in out.items():
        print(f"{kind:<6} {cache:>14} {o['peak_mib']:>22.0f} {o['seconds']:>8.1f} {o['cut']:>5}")
    p, m = out[runs[0]], out[runs[1]]
    print(f"memex / plain at pixel_cache_mb={runs[1][1]}: {m['peak_mib'] / p['peak_mib']:.2f}x the memory "
          f"({p['peak_mib'] / m['peak_mib']:.1f}x less), {p['seconds'] / m['seconds']:.2f}x the speed; the same "
          f"{len(want)} rows")


if __name__ == "__main__":
    main()
