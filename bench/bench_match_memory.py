"""The match stage's driver memory for one samples shard at LAION shapes: its neighbours' training
images held decoded (memex before) against held encoded and decoded on a cut miss (match.TrainPixels).

    python bench/bench_match_memory.py                       # 64 generations x k = 10, 640 distinct 1024x1536 JPEGs
    python bench/bench_match_memory.py --train-size 768x1024 --generations 32
    python bench/bench_match_memory.py --grayscale           # a 1-channel model: "L" generations, luma compared
    python bench/bench_match_memory.py --driver              # summary's read, report's histogram, a huge neighbour

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

--driver: what the match stage's and the report's driver hold at scale, memex against the code before, each
side on the same synthetic input:
  (a) the summary's read of matches/ (--rows rows in units of 500, sampling=paper's shard, 0.1% extracted, the
      reviewer's synthetic rows): match.extracted_matches (the extracted rows, read UNITS_PER_READ units at a
      time, and the row count) against matches/ read whole and filtered (match.run before). Each side in a fresh
      process: its peak RSS above its RSS after imports, and pyarrow's peak allocation; equal rows asserted.
  (b) report.histogram_svg of --values float32 distances: counted in chunks against the float64 copy of them all
      (the function before, kept here). tracemalloc's peak, in this process; equal SVGs asserted.
  (c) one huge neighbour (--huge HxW: a smooth photo-like image with grain, as JPEG q90 and as PNG) cut for a
      512x512 generation: match.Compared.get over TrainPixels (a JPEG decoded at a DCT scale, a large cut averaged
      in blocks) against decoding it whole and cutting it in float32 (as_compared before, kept here). Each side in
      a fresh process, one torch thread: peak RSS above its RSS once the bytes are read; the tiled l2 between the
      two sides' cut images printed.
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
from typing import Callable

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


def peak_from_here() -> Callable[[], float]:
    """A function giving this process's peak RSS (MiB) since this call, above its RSS now: VmHWM reset to the RSS
    now (/proc/self/clear_refs 5). Not ru_maxrss, which execve keeps from the parent: a side started by a driver
    that had held 0.5 GB read 0.5 GB whatever it did."""
    base = rss_mib()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # (an old kernel, a sandbox): the peak since the process started
        pass

    def peak() -> float:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return hwm / 1024 - base

    return peak


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


# ---- --driver: the summary's read, the histogram, a huge neighbour ------------------------------------------------
UNIT_ROWS = 500  # matches/ rows a unit: a samples shard of sampling=paper


def make_matches(root: str, rows: int, seed: int = 0) -> None:
    """matches/ of run "r" under root: rows // UNIT_ROWS units of the reviewer's synthetic rows (captions of 51-100
    characters, 0.1% extracted)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memex.layout import MATCHES_SCHEMA, RunLayout

    layout = RunLayout(root, "r")
    Path(layout.matches.marker(0)).parent.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    cap = [("a photo of " + "x" * int(n)) for n in rng.integers(40, 90, 1000)]
    for s in range(rows // UNIT_ROWS):
        n = UNIT_ROWS
        # written as write_shard writes a unit, less its fsyncs (2,000 units: ~50 s of the bench's 2 minutes)
        pq.write_table(pa.table({
            "sample_id": [f"{s:016x}/{i}" for i in range(n)], "prompt_id": [f"{s:016x}"] * n,
            "prompt": [cap[s % 1000]] * n, "train_gid": rng.integers(0, 5_000_000, n),
            "train_id": [f"{g:012d}" for g in rng.integers(0, 5_000_000, n)],
            "train_caption": [cap[i] for i in rng.integers(0, 1000, n)],
            "distance": rng.random(n).astype(np.float32), "embed_distance": rng.random(n).astype(np.float32),
            "neighbor_rank": np.zeros(n, np.int32), "extracted": rng.random(n) < 0.001,
            "train_detail": rng.random(n).astype(np.float32), "margin": pa.nulls(n, pa.float32())},
            schema=MATCHES_SCHEMA), layout.matches.file(s))
        Path(layout.matches.marker(s)).write_text(json.dumps({"rows": n, "file": Path(layout.matches.file(s)).name}))


def summary_side(kind: str, root: str) -> None:
    """(a) one side in this process: prints a JSON line."""
    import hashlib

    import pyarrow as pa

    from memex.layout import RunLayout
    from memex.stages import match

    layout = RunLayout(root, "r")
    pool = pa.default_memory_pool()
    peak_of = peak_from_here()
    t0 = time.perf_counter()
    if kind == "memex":
        ext, rows = match.extracted_matches(layout)
    else:  # match.run before: matches/ whole, every column, then its extracted rows for summarize
        whole = layout.matches.read()
        ext, rows = whole.filter(whole["extracted"]), whole.num_rows
    seconds = time.perf_counter() - t0
    peak = peak_of()
    digest = hashlib.sha256(str(ext.to_pylist()).encode()).hexdigest()[:12]
    print(json.dumps({"rows": rows, "extracted": ext.num_rows, "digest": digest, "seconds": seconds,
                      "peak_mib": peak, "arrow_mib": pool.max_memory() / 2**20}))


def histogram_before(values, threshold, label, bins=30, width=520, height=180, x_max=None):
    """report.histogram_svg before: a float64 copy of every value, then its mask and bin indices."""
    from memex.report import _finite, esc, histogram_drawn

    vals = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return f'<p class="muted">no {esc(label)} to plot</p>'
    hi = x_max if _finite(x_max) and x_max > 0 else max(float(vals.max()), threshold or 0.0) * 1.05 or 1.0
    counts = np.bincount(np.minimum((vals / hi * bins).astype(np.int64), bins - 1), minlength=bins).tolist()
    return histogram_drawn(counts, hi, vals.size, threshold, label, width, height)


def histogram_bench(n: int) -> None:
    """(b) in this process: tracemalloc's peak of each side, over the same float32 values."""
    import tracemalloc

    from memex.report import histogram_svg

    v = np.random.default_rng(1).random(n).astype(np.float32) * 0.4
    v[::1000] = np.nan
    out = {}
    for kind, fn in (("memex", histogram_svg), ("before", histogram_before)):
        tracemalloc.start()
        t0 = time.perf_counter()
        svg = fn(v, 0.15, "distance")
        out[kind] = (tracemalloc.get_traced_memory()[1] / 2**20, time.perf_counter() - t0, svg)
        tracemalloc.stop()
    assert out["memex"][2] == out["before"][2], "the SVGs differ"
    print(f"(b) report.histogram_svg of {n:,} float32 distances ({v.nbytes / 2**20:.0f} MiB, 0.1% NaN):")
    print(f"    {'side':<28} {'peak MiB (tracemalloc)':>22} {'bytes a value':>13} {'seconds':>8}")
    for kind, label in (("before", "float64 copy (before)"), ("memex", "memex, chunks of 2 Mi values")):
        mib, sec, _ = out[kind]
        print(f"    {label:<28} {mib:>22.0f} {mib * 2**20 / n:>13.1f} {sec:>8.2f}")
    print(f"    before / memex: {out['before'][0] / out['memex'][0]:.1f}x the memory; the same SVG")


def make_huge(folder: Path, h: int, w: int) -> dict:
    """(c)'s neighbour: an 8x8 colour grid upsampled to h x w with a tiled grain, as JPEG q90 and PNG (level 1)."""
    from PIL import Image

    rng = np.random.default_rng(7)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    img = np.asarray(small.resize((w, h), Image.BILINEAR)).copy()
    grain = rng.integers(-6, 7, (256, 256, 3), dtype=np.int16)
    for y in range(0, h, 256):  # a band at a time: no int16 copy of the whole image
        band = img[y:y + 256].astype(np.int16)
        band += np.tile(grain, (1, -(-w // 256), 1))[: band.shape[0], :w]
        img[y:y + 256] = np.clip(band, 0, 255)
    pil = Image.fromarray(img)
    del img
    pil.save(folder / "huge.jpg", "JPEG", quality=90)
    pil.save(folder / "huge.png", compress_level=1)
    return {k: (folder / f"huge.{k}").stat().st_size / 2**20 for k in ("jpg", "png")}


def huge_side(kind: str, path: str, shape: tuple[int, int]) -> None:
    """(c) one side in this process: prints a JSON line; the cut image saved beside the input for the comparison."""
    import warnings

    import torch

    from memex.stages.match import Compared, TrainPixels, pixels_for

    warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning: 96 MP is over its 89 MP warning
    torch.set_num_threads(1)
    data = Path(path).read_bytes()
    peak_of = peak_from_here()
    t0 = time.perf_counter()
    px = TrainPixels({0: data}, {0: "huge"})
    if kind == "memex":
        cut = Compared("center_crop").get(0, False, lambda: pixels_for(px, 0, shape), shape)
    else:  # match before: TrainPixels decoded it whole, and as_compared cut it in float32, then resized it
        from memex.distances import at_size, common_size, to_unit
        from memex.images import to_aspect

        fitted = to_unit(torch.tensor(to_aspect(px[0], shape[0], shape[1], "center_crop")[None]))
        cut = at_size(fitted, common_size(shape, fitted.shape[-2:]))
    seconds = time.perf_counter() - t0
    peak = peak_of()
    torch.save(cut.contiguous(), f"{path}.{kind}.pt")
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "shape": list(cut.shape)}))


def driver(a) -> None:
    import torch

    from memex.distances import tiled_l2

    def run(*args) -> dict:
        r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_matches(tmp, a.rows)
        made = time.perf_counter() - t0
        out = {k: run("--summary-side", k, "--folder", tmp) for k in ("before", "memex")}
    b, m = out["before"], out["memex"]
    assert (b["rows"], b["extracted"], b["digest"]) == (m["rows"], m["extracted"], m["digest"]), "the sides differ"
    print(f"(a) the summary's read of matches/: {a.rows:,} rows in {a.rows // UNIT_ROWS:,} units of {UNIT_ROWS} "
          f"(written in {made:.0f} s), {m['extracted']} extracted:")
    print(f"    {'side':<28} {'peak RSS MiB':>12} {'arrow peak MiB':>14} {'seconds':>8}")
    for kind, label in (("before", "matches/ whole (before)"), ("memex", "memex extracted_matches")):
        o = out[kind]
        print(f"    {label:<28} {o['peak_mib']:>12.0f} {o['arrow_mib']:>14.0f} {o['seconds']:>8.2f}")
    print(f"    before / memex: {b['peak_mib'] / m['peak_mib']:.1f}x the RSS, {b['arrow_mib'] / m['arrow_mib']:.1f}x "
          f"arrow's; the same {m['rows']:,} rows and extracted rows")
    histogram_bench(a.values)
    h, w = (int(x) for x in a.huge.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sizes = make_huge(Path(tmp), h, w)
        made = time.perf_counter() - t0
        print(f"(c) one {h}x{w} neighbour ({h * w / 1e6:.0f} MP; JPEG {sizes['jpg']:.0f} MB, PNG "
              f"{sizes['png']:.0f} MB, written in {made:.0f} s) cut for a 512x512 generation, one torch thread:")
        print(f"    {'side':<28} {'peak RSS MiB':>12} {'seconds':>8} {'tiled l2 to before':>18}")
        for fmt in ("jpg", "png"):
            path = str(Path(tmp) / f"huge.{fmt}")
            res = {k: run("--huge-side", k, "--folder", path) for k in ("before", "memex")}
            cuts = {k: torch.load(f"{path}.{k}.pt") for k in res}
            d = float(tiled_l2(cuts["memex"], cuts["before"])[0])
            for kind, label in (("before", f"{fmt.upper()} whole (before)"), ("memex", f"{fmt.upper()} memex")):
                o = res[kind]
                print(f"    {label:<28} {o['peak_mib']:>12.0f} {o['seconds']:>8.2f} "
                      f"{'' if kind == 'before' else f'{d:.4f}':>18}")
            print(f"    {fmt.upper()} before / memex: {res['before']['peak_mib'] / res['memex']['peak_mib']:.1f}x the "
                  f"memory, {res['before']['seconds'] / res['memex']['seconds']:.1f}x the time; cuts "
                  f"{res['memex']['shape']} and {res['before']['shape']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generations", type=int, default=64, help="one samples shard (sampling.shard_size)")
    ap.add_argument("--k", type=int, default=10, help="match.k")
    ap.add_argument("--train-size", default="1024x1536", help="training images HxW")
    ap.add_argument("--cache-mb", type=int, nargs="+", default=[1024, 256],
                    help="resources.pixel_cache_mb values run on the memex side (the plain side: the first)")
    ap.add_argument("--grayscale", action="store_true", help="1-channel generations (a grayscale model's)")
    ap.add_argument("--driver", action="store_true", help="(a)-(c) above instead of a shard's verification")
    ap.add_argument("--rows", type=int, default=1_000_000, help="--driver (a): matches/ rows")
    ap.add_argument("--values", type=int, default=20_000_000, help="--driver (b): distances in the histogram")
    ap.add_argument("--huge", default="8000x12000", help="--driver (c): the huge neighbour, HxW")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--summary-side", help=argparse.SUPPRESS)
    ap.add_argument("--huge-side", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return side(a.side, a.folder, a.k, a.cache_mb[0])
    if a.summary_side:
        return summary_side(a.summary_side, a.folder)
    if a.huge_side:
        return huge_side(a.huge_side, a.folder, (512, 512))
    if a.driver:
        return driver(a)
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
