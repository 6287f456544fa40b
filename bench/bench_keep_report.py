"""The report's training images (match.keep_for_report) at LAION shapes: every extracted picture's image
fetched and re-encoded at once (memex before) against `chunk` = 64 at a time, written as row groups.

    python bench/bench_keep_report.py                      # 384 extracted pictures, 1024x1536 JPEGs
    python bench/bench_keep_report.py --pictures 1024 --train-size 768x1024

With match.candidates=all, every generation within the threshold of any training picture is an extracted
row, uncounted look-alikes included: tens of thousands on a large audit. keep_for_report copies each
one's training image into <run>/matched_train_images.parquet as a PNG of its decoded pixels (~3 MB at
1.5 MP). Both sides run the real function on the same inputs: the run's extracted matches (train_gid,
train_id) and the training images' encoded bytes (what fetch_training_images returns from train.pack,
patched in here to serve them from memory, as the same TrainPixels), and must write equal tables
(asserted). Each side runs in a fresh subprocess; memory is its peak RSS (resource.getrusage) above its
RSS once the inputs are read, so what the function adds on top of the encoded images both hold.
  plain  chunk = every picture: one fetch, every re-encoded PNG held whole-size, one table (the code before)
  memex  today's keep_for_report: 64 at a time (or 64 MB of PNGs), each at most match.REPORT_SIDE px on its
         long side (since 2026-12-08), written as row groups (Store.write_batches)
The sides write the same rows; where a training image's long side is past REPORT_SIDE, memex's PNG is the
plain one's pixels made smaller (checked: its size, and the same picture at 64 px), else equal bytes.
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
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def make_inputs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_match_memory import picture
    from PIL import Image

    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(picture(rng, *size)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    pq.write_table(pa.table({"gid": np.arange(n), "id": [f"t{g}" for g in range(n)],
                             "image": pa.array(jpegs, pa.binary())}), folder / "train.parquet")
    return sum(map(len, jpegs)) / 2**20


def side(kind: str, folder: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_match_memory import rss_mib

    from memex.stages import match
    from memex.storage import Store

    train = pq.read_table(f"{folder}/train.parquet")
    encoded = dict(zip(train["gid"].to_pylist(), train["image"].to_pylist()))
    extracted = pa.table({"train_gid": train["gid"], "train_id": train["id"]})
    del train
    match.fetch_training_images = lambda info, gids, opts: (match.TrainPixels(
        {int(g): encoded[int(g)] for g in gids}, {int(g): str(g) for g in gids}), {})
    out = Path(folder) / kind
    layout = SimpleNamespace(matches=SimpleNamespace(read=lambda **k: extracted), store=Store(str(out)),
                             matched_train_path=str(out / "matched_train_images.parquet"))
    if kind == "plain":  # the code before: every PNG at its full size, no cut by bytes
        match.report_png = lambda pixels, g: match.encode_png(pixels[g])
        match.REPORT_CHUNK_BYTES = float("inf")
    base = rss_mib()
    t0 = time.perf_counter()
    match.keep_for_report(layout, None, {}, chunk=len(encoded) if kind == "plain" else 64)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak - base,
                      "mb": Path(layout.matched_train_path).stat().st_size / 2**20}))


def same_pictures(plain, memex) -> bool:
    """The same rows, each memex image the plain one's (equal bytes at most REPORT_SIDE px, else its thumbnail's
    size and the same picture: 64 px versions within 2 grey levels on average)."""
    from PIL import Image

    from memex.stages.match import REPORT_SIDE

    if plain.drop_columns(["image"]).to_pylist() != memex.drop_columns(["image"]).to_pylist():
        return False
    for a, b in zip(plain["image"].to_pylist(), memex["image"].to_pylist()):
        big, small = Image.open(io.BytesIO(a)), Image.open(io.BytesIO(b))
        if max(big.size) <= REPORT_SIDE:
            if a != b:
                return False
            continue
        want = big.copy()
        want.thumbnail((REPORT_SIDE, REPORT_SIDE))
        tiny = [np.asarray(x.convert("RGB").resize((64, 64)), np.float32) for x in (big, small)]
        if small.size != want.size or np.abs(tiny[0] - tiny[1]).mean() > 2:
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pictures", type=int, default=384, help="extracted training pictures")
    ap.add_argument("--train-size", default="1024x1536", help="training images HxW")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return side(a.side, a.folder)
    import pyarrow.parquet as pq

    h, w = (int(x) for x in a.train_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        mb = make_inputs(Path(tmp), a.pictures, (h, w))
        print(f"{a.pictures} extracted pictures, training images {h}x{w} JPEG ({mb:.0f} MB encoded)")
        out = {}
        for kind in ("plain", "memex"):
            r = subprocess.run([sys.executable, __file__, "--side", kind, "--folder", tmp], capture_output=True,
                               text=True, check=True)
            out[kind] = json.loads(r.stdout.strip().splitlines()[-1])
        plain, memex = (pq.read_table(f"{tmp}/{k}/matched_train_images.parquet") for k in ("plain", "memex"))
        same = same_pictures(plain, memex)
    assert same, "the sides wrote different pictures"
    print(f"{'side':<6} {'peak MiB above inputs':>22} {'seconds':>8} {'file MB':>8}")
    for kind, o in out.items():
        print(f"{kind:<6} {o['peak_mib']:>22.0f} {o['seconds']:>8.1f} {o['mb']:>8.0f}")
    p, m = out["plain"], out["memex"]
    print(f"memex / plain: {m['peak_mib'] / p['peak_mib']:.2f}x the memory ({p['peak_mib'] / m['peak_mib']:.1f}x "
          f"less), {p['seconds'] / m['seconds']:.2f}x the speed, {p['mb'] / m['mb']:.1f}x fewer bytes; same pictures")


if __name__ == "__main__":
    main()
