"""Listing a WebDataset training set (tar shards) as the index stage does before it can find a finished
index: memex with its kept shard listings (`shard_cache`, under the index root) against the plain
listing that reads every shard whole (its captions lie between the images), on the same shards.

The first listing with the cache reads every shard and keeps its listing (`cold`); every later audit
of the same shards reads only the kept listings (`warm`). Bytes read are the shards' sizes against the
listings' (local disk, page cache warm for every method; on S3 each shard byte is a downloaded byte).

    python bench/bench_listing.py [--shards 8] [--per-shard 500] [--side 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memex.ingest import list_training_set  # noqa: E402
from memex.storage import Store  # noqa: E402


def write_shards(root: Path, shards: int, per_shard: int, side: int) -> int:
    """LAION-like shards: a JPEG and its caption per sample. Returns their total bytes."""
    rng = np.random.default_rng(0)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for k in range(per_shard):
                img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                for name, data in ((f"{k:09d}.jpg", buf.getvalue()), (f"{k:09d}.txt", f"caption {s} {k}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return sum(p.stat().st_size for p in root.glob("*.tar"))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-listing-") as tmp:
        shards = Path(tmp) / "shards"
        shards.mkdir()
        size = write_shards(shards, a.shards, a.per_shard, a.side)
        listings = Path(tmp) / "_index" / "_shard_listings"
        cache = Store(str(listings))
        list_training_set(str(shards))  # warm-up: imports, fsspec's instance, the page cache (all methods read warm)
        plain = [timed(lambda: list_training_set(str(shards))) for _ in range(a.repeats)]
        cold = timed(lambda: list_training_set(str(shards), shard_cache=cache))
        warm = [timed(lambda: list_training_set(str(shards), shard_cache=cache)) for _ in range(a.repeats)]
        kept = sum(p.stat().st_size for p in listings.glob("*.parquet"))
        assert list_training_set(str(shards), shard_cache=cache).equals(list_training_set(str(shards)))
    n = a.shards * a.per_shard
    print(f"{a.shards} shards x {a.per_shard} samples ({n} images, {a.side} px JPEGs): "
          f"{size / 2**20:.1f} MiB of shards, {kept / 2**10:.0f} KiB of kept listings")
    print(f"{'method':<28} {'s (median)':>10} {'bytes read':>12} {'vs plain':>8}")
    med = lambda xs: float(np.median(xs))  # noqa: E731
    print(f"{'plain (every shard whole)':<28} {med(plain):10.3f} {size:12,d} {1.0:8.2f}")
    print(f"{'memex cold (first audit)':<28} {cold:10.3f} {size:12,d} {med(plain) / cold:8.2f}")
    print(f"{'memex warm (later audits)':<28} {med(warm):10.3f} {kept:12,d} {med(plain) / med(warm):8.2f}")


if __name__ == "__main__":
    main()
