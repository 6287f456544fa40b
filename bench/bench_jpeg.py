"""Decoding JPEG training images for the index: memex's `decode_rows` (a JPEG decoded at a reduced DCT
scale that keeps both sides >= max(2 x the embedder's input, 448 px): images.decode's min_side,
memex/ingest.py's DRAFT_MIN_SIDE) against the same
code with a full decode first (the plain way: PIL decodes every pixel, then `fit` crops and
resizes), on the same bytes, in one process.

The images are photo-like (a gradient plus noise, JPEG quality 90) at four sizes that span what
training sets hold: LAION's originals (~500-1000 px), and licensed photos and art (2-4k px). Each
size class is timed at the two embedder inputs memex ships: pixels (32 px) and SSCD/CLIP (224 px).
Pixel differences are measured after `fit`, where the embedder reads them; for the pixel embedder,
the largest per-image RMS in [0, 1], beside its near-duplicate threshold index.dup_threshold = 0.05.

Then how far apart each way puts one picture stored at two sizes (near-duplicate counts must still
call them one), and the whole index stage (`index.run`: list, decode, embed, FAISS shards, near-duplicate counts;
resources.executor=local, so both runs decode in this process) on a folder of those JPEGs, each
way, into its own storage root.

    python bench/bench_jpeg.py [--images 24] [--workers 8] [--stage-images 12]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

import memex.ingest
from memex.images import decode
from memex.ingest import decode_rows

SIZES = [(512, 384), (1024, 768), (2048, 1536), (4000, 3000)]


def photo(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
    tint = rng.uniform(0.5, 1, 3)[None, None, :]
    img = (ramp * tint + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def full_decode(data: bytes, channels: int = 3, min_side: int | None = None) -> np.ndarray:
    """The plain path: every pixel decoded (min_side ignored)."""
    return decode(data, channels)


def timed_rows(table: pa.Table, size: int, workers: int, plain: bool) -> tuple[float, np.ndarray]:
    memex.ingest.decode = full_decode if plain else decode
    try:
        t0 = time.perf_counter()
        out = decode_rows(table, size, workers=workers)
        return time.perf_counter() - t0, out.images
    finally:
        memex.ingest.decode = decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=24, help="images per size class")
    ap.add_argument("--workers", type=int, default=8, help="decode_rows' threads (its default)")
    ap.add_argument("--stage-images", type=int, default=12, help="JPEGs of each size in the index stage's folder")
    args = ap.parse_args()
    print(f"{args.images} JPEGs a size class, decode_rows with {args.workers} threads; best of 3 runs each")
    print(f"{'image':>10} {'input':>5} | {'full ms/img':>11} {'memex ms/img':>12} {'speed-up':>8} | "
          f"{'mean diff':>9} {'max diff':>8} {'RMS [0,1]':>9}")
    for w, h in SIZES:
        table = pa.table({"id": [f"{w}x{h}-{i}" for i in range(args.images)],
                          "image": [photo(w, h, i) for i in range(args.images)]})
        for size in (32, 224):
            runs = {plain: [timed_rows(table, size, args.workers, plain) for _ in range(3)] for plain in (True, False)}
            full_s, memex_s = (min(t for t, _ in runs[p]) for p in (True, False))
            a, b = runs[True][0][1].astype(float), runs[False][0][1].astype(float)
            diff = np.abs(a - b)
            rms = np.sqrt((((a - b) / 255) ** 2).reshape(len(a), -1).mean(1)).max() if size == 32 else None
            print(f"{w:>5}x{h:<4} {size:>5} | {full_s / args.images * 1e3:>11.1f} {memex_s / args.images * 1e3:>12.1f} "
                  f"{full_s / memex_s:>7.2f}x | {diff.mean():>9.2f} {diff.max():>8.0f} "
                  f"{'' if rms is None else f'{rms:.4f}':>9}")
    resized_copies(args.workers)
    stage(args.stage_images)


def resized_copies(workers: int) -> None:
    """The same picture stored at two sizes and qualities (LAION's duplicates): how far apart the
    index's input puts them, each way. Near-duplicate counts call them one picture within
    index.dup_threshold (0.05 RMS for the pixel embedder)."""
    from memex.synth import logo

    pairs = [(2000, 95, 700, 60), (1600, 90, 400, 75), (3000, 95, 1000, 85), (800, 90, 500, 70)]

    def stored(img: np.ndarray, side: int, quality: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img).resize((side, side * 3 // 4), Image.BICUBIC).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    for size in (32, 224):
        worst = {True: 0.0, False: 0.0}
        for seed in range(8):
            pic = logo(seed, 256)[0]
            for a, qa, b, qb in pairs:
                t = pa.table({"id": ["a", "b"], "image": [stored(pic, a, qa), stored(pic, b, qb)]})
                for plain in (True, False):
                    x, y = (im.astype(float) / 255 for im in timed_rows(t, size, workers, plain)[1])
                    worst[plain] = max(worst[plain], float(np.sqrt(((x - y) ** 2).mean())))
        print(f"resized copies of 8 logos (4 size/quality pairs) at {size} px: worst RMS apart, full decode "
              f"{worst[True]:.4f}, memex {worst[False]:.4f}")


def index_stage(folder: Path, root: Path, plain: bool) -> float:
    from memex import cli
    from memex.stages import index

    overrides = [f"trainset.path={folder}", f"storage.root={root}", "resources.executor=local", "embedder=pixels",
                 "index=flat", "index.shards=2"]
    cfg = cli.to_audit_config(cli.compose_config("audit", overrides))
    memex.ingest.decode = full_decode if plain else decode
    try:
        t0 = time.perf_counter()
        info = index.run(cfg)
        took = time.perf_counter() - t0
    finally:
        memex.ingest.decode = decode
    assert info.n_indexed == len(list(folder.iterdir())), info
    return took


def stage(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "train"
        folder.mkdir()
        for w, h in SIZES:
            for i in range(n):
                (folder / f"{w}x{h}-{i}.jpg").write_bytes(photo(w, h, 1000 + i))
        index_stage(folder, Path(tmp) / "warm-up", False)  # imports and first calls, timed by neither
        took: dict[bool, list[float]] = {True: [], False: []}
        for k in range(2):  # alternated, each into a fresh storage root
            for plain in (True, False):
                took[plain].append(index_stage(folder, Path(tmp) / f"{'plain' if plain else 'memex'}-{k}", plain))
        full_s, memex_s = min(took[True]), min(took[False])
        print(f"index stage on {4 * n} JPEGs ({n} of each size), embedder=pixels, best of 2: full decode "
              f"{full_s:.1f} s, memex {memex_s:.1f} s: {full_s / memex_s:.2f}x")


if __name__ == "__main__":
    main()
