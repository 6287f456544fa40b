"""Training images far above LAION's size in the index's decode: a batch of large PNGs fitted to the
embedder's input by the code before (every row's bytes copied out at once, 8 threads each decoding a
whole image at once) against memex's decode_rows (a budget of decoded pixels shared by the threads,
only the centre cut converted, a strip at a time, the heap trimmed after each large image).

    python bench/bench_huge_images.py                       # 8 PNGs 6000x4000 (24 MP) -> 224 px
    python bench/bench_huge_images.py --images 16 --train-size 4000x3000

Both sides decode the same rows (a Parquet table of PNG bytes, as the index's train.pack rows reach
decode_rows) to the same size x size inputs on 8 threads, and must give equal arrays (asserted). Each
side runs in a fresh subprocess; memory is its peak RSS (resource.getrusage) above its RSS once the
table is read, so what decoding adds on top of the encoded images both hold.
  plain  table.to_pylist(), then on 8 threads fit(decode(image)): PIL's image, convert's copy,
         tobytes' chunks and join, np.array's copy of the whole image, then fit (the code before)
  memex  ingest.decode_rows: ingest.DECODE_PIXEL_BUDGET (64 Mi pixels: two of these images at a time)

    python bench/bench_huge_images.py --preprocess pad --images 8 --train-size 1000x8000   # panoramas

trainset.preprocess=pad pads the whole decoded image to a white square of its long side before the
resize (a 1000x8000 panorama: a 64 Mpx canvas for its 8 Mpx), so the budget is charged those canvases
too (images.fit_pixels). With --preprocess pad both sides run ingest.decode_rows(preprocess=pad):
  header  the budget charged each image's header pixels only, as before (fit_pixels patched to them)
  memex   the budget charged the image and its padded canvases
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def picture(rng, h: int, w: int) -> np.ndarray:
    """Photo-like uint8 (h, w, 3): a colour grid upsampled, with grain (a level-1 PNG of it ~60% of its raw size;
    the grain is a 500-row band repeated, far beyond zlib's 32 KiB window, to make it 5x faster)."""
    from PIL import Image

    small = rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.int16)
    grain = np.tile(rng.integers(-4, 5, (min(h, 500), w, 3), dtype=np.int16), (-(-h // 500), 1, 1))[:h]
    return np.clip(base + grain, 0, 255).astype(np.uint8)


def make_inputs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memex.images import encode_png

    rngs = np.random.default_rng(seed).spawn(n)
    with ThreadPoolExecutor(2) as pool:  # zlib runs without the GIL
        pngs = list(pool.map(lambda rng: encode_png(picture(rng, *size)), rngs))
    pq.write_table(pa.table({"id": [f"t{i}" for i in range(n)], "image": pa.array(pngs, pa.binary())}),
                   folder / "train.parquet")
    return sum(map(len, pngs)) / 2**20


def plain_decode_rows(table, size: int) -> np.ndarray:
    """decode_rows(table, size) as it was: every row copied out, each image decoded whole on 8 threads."""
    from PIL import Image, ImageOps

    from memex.images import _rgb, fit
    from memex.ingest import DRAFT_MIN_SIDE

    def one(row: dict) -> np.ndarray:
        with Image.open(io.BytesIO(row["image"])) as img:
            if img.format == "JPEG":
                side = max(2 * size, DRAFT_MIN_SIDE)
                img.draft(img.mode, (side, side))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            rgb = _rgb(img)  # np.array(img.convert("RGB")) for these: the whole image at once
        return fit(rgb, size)

    records = table.to_pylist()
    with ThreadPoolExecutor(8) as pool:
        return np.stack(list(pool.map(one, records)))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def side(kind: str, folder: str, size: int, preprocess: str = "center_crop") -> None:
    import pyarrow.parquet as pq

    from memex import ingest
    from memex.images import decoded_pixels

    if kind == "header":  # the budget as it was charged: the header's pixels, whatever fit pads them onto
        ingest.fit_pixels = lambda data, min_side, *_: decoded_pixels(data, min_side)
    table = pq.read_table(f"{folder}/train.parquet")
    base = rss_mib()
    t0 = time.perf_counter()
    out = plain_decode_rows(table, size) if kind == "plain" else \
        ingest.decode_rows(table, size, preprocess=preprocess).images
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(f"{folder}/{kind}.npy", out)
    print(json.dumps({"seconds": seconds, "peak_mib": peak - base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="training images in the batch")
    ap.add_argument("--train-size", default="4000x6000", help="training images HxW")
    ap.add_argument("--input", type=int, default=224, help="the embedder's input (embedder.size)")
    ap.add_argument("--preprocess", default="center_crop", choices=["center_crop", "pad"],
                    help="trainset.preprocess; pad compares the budget's accounting before (header) and now")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return side(a.side, a.folder, a.input, a.preprocess)

    h, w = (int(x) for x in a.train_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        mb = make_inputs(Path(tmp), a.images, (h, w))
        print(f"{a.images} training images {h}x{w} PNG ({h * w / 1e6:.0f} MP, {h * w * 3 / 2**20:.0f} MiB as RGB; "
              f"{mb:.0f} MB encoded) -> {a.input} px, 8 threads, preprocess={a.preprocess}")
        if a.preprocess == "pad":
            print(f"  each padded to a {max(h, w)}x{max(h, w)} canvas ({max(h, w) ** 2 / 1e6:.0f} MP)")
        kinds = ("header", "memex") if a.preprocess == "pad" else ("plain", "memex")
        out = {}
        for kind in kinds:
            r = subprocess.run([sys.executable, __file__, "--side", kind, "--folder", tmp, "--input", str(a.input),
                                "--preprocess", a.preprocess], capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"the {kind} side failed:\n{r.stderr}")
            out[kind] = json.loads(r.stdout.strip().splitlines()[-1])
        same = np.array_equal(np.load(f"{tmp}/{kinds[0]}.npy"), np.load(f"{tmp}/memex.npy"))
    assert same, "the sides decoded different pixels"
    print(f"{'side':<6} {'peak MiB above inputs':>22} {'seconds':>8}")
    for kind, o in out.items():
        print(f"{kind:<6} {o['peak_mib']:>22.0f} {o['seconds']:>8.1f}")
    p, m = out[kinds[0]], out["memex"]
    print(f"memex / {kinds[0]}: {m['peak_mib'] / p['peak_mib']:.2f}x the memory ({p['peak_mib'] / m['peak_mib']:.1f}x "
          f"less), {p['seconds'] / m['seconds']:.2f}x the speed; equal pixels")


if __name__ == "__main__":
    main()
