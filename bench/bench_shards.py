"""Reading a training set stored as WebDataset .tar shards: memex (`list_training_set` on the shard
folder, then `decode_rows` in index.decode_batch slices, as the index stage does: each member one
ranged read of its shard, on 8 threads) against the plain alternative, one sequential pass of
`tarfile` in stream mode decoding each image member in turn (how a WebDataset loader reads), the
same stream with its decodes on 8 threads (memex's thread count: the fair baseline), and memex on the
same images as loose files. Each method runs in a fresh process (peak RSS is
per process: all three import the same modules first), alternated, on local disk; the seconds
count from after the imports.

The images are LAION-like: non-square JPEGs of 300-800 px a side (quality 90), decoded and
centre-cropped to `--size` px, as the pixel embedder's index build does.

    python bench/bench_shards.py [--images 2000] [--per-shard 500] [--size 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CHILD = r"""
import glob, json, sys, tarfile, time
from memex.images import decode, fit
from memex.ingest import decode_rows, iter_batches, list_training_set
method, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
n = 0
listing = 0.0
t0 = time.perf_counter()  # after the imports: both read with the same decoder
if method == "plain":
    for shard in sorted(glob.glob(path + "/*.tar")):
        with tarfile.open(shard, mode="r|") as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".jpg"):
                    fit(decode(tf.extractfile(m).read()), size, "center_crop")
                    n += 1
elif method == "plain8":  # the same stream, each member's decode handed to 8 threads (memex's count)
    from concurrent.futures import ThreadPoolExecutor
    work = lambda b: fit(decode(b), size, "center_crop")  # noqa: E731
    with ThreadPoolExecutor(8) as pool:
        jobs = []
        for shard in sorted(glob.glob(path + "/*.tar")):
            with tarfile.open(shard, mode="r|") as tf:
                for m in tf:
                    if m.isfile() and m.name.endswith(".jpg"):
                        jobs.append(pool.submit(work, tf.extractfile(m).read()))
        n = sum(1 for j in jobs if j.result() is not None)
else:
    t = list_training_set(path)
    listing = time.perf_counter() - t0
    for batch in iter_batches(t, 512):  # index.decode_batch
        n += len(decode_rows(batch, size).ids)
seconds = time.perf_counter() - t0
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "listing": listing, "images": n, "peak_rss_gb": hwm / 2**20}))
"""


def build(root: Path, images: int, per_shard: int) -> None:
    import numpy as np
    from PIL import Image

    from memex.synth import logo

    rng = np.random.default_rng(0)
    (root / "shards").mkdir()
    (root / "files").mkdir()
    tf = None
    for i in range(images):
        if i % per_shard == 0:
            if tf is not None:
                tf.close()
            tf = tarfile.open(root / "shards" / f"{i // per_shard:05d}.tar", "w")
        w, h = (int(v) for v in rng.integers(300, 801, 2))
        img = Image.fromarray(logo(i % 256, 128)[0]).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        data, caption = buf.getvalue(), f"logo {i}".encode()
        for name, payload in ((f"{i:09d}.jpg", data), (f"{i:09d}.txt", caption)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        (root / "files" / f"{i:09d}.jpg").write_bytes(data)
        (root / "files" / f"{i:09d}.txt").write_bytes(caption)
    tf.close()


def run(method: str, path: Path, size: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(path), str(size)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, a.images, a.per_shard)
        mb = sum(f.stat().st_size for f in (root / "shards").iterdir()) / 2**20
        print(f"{a.images} non-square JPEGs in {len(list((root / 'shards').iterdir()))} shards ({mb:.0f} MB), "
              f"decoded and centre-cropped to {a.size} px; medians of {a.repeats}, each in a fresh process")
        methods = {"plain tarfile stream, one pass": ("plain", root / "shards"),
                   "plain stream, decoded on 8 threads": ("plain8", root / "shards"),
                   "memex, shards (list + decode_rows)": ("memex", root / "shards"),
                   "memex, the same images as files": ("memex", root / "files")}
        results: dict[str, list[dict]] = {k: [] for k in methods}
        for _ in range(a.repeats):
            for name, (method, path) in methods.items():
                results[name].append(run(method, path, a.size))
        med = {}
        for name, rs in results.items():
            rs.sort(key=lambda r: r["seconds"])
            med[name] = rs[len(rs) // 2]
            r = med[name]
            print(f"{name:36s}: {r['images'] / r['seconds']:7.0f} images/s  ({r['seconds']:.2f} s, listing "
                  f"{r['listing']:.2f} s)  peak RSS {r['peak_rss_gb']:.2f} GB  images {r['images']}")
        plain, plain8, shards, files = (med[k] for k in methods)
        print(f"memex shards / plain stream on 8 threads = {plain8['seconds'] / shards['seconds']:.2f}x ; "
              f"memex shards / plain stream = {plain['seconds'] / shards['seconds']:.2f}x ; "
              f"memex shards / memex files = {files['seconds'] / shards['seconds']:.2f}x ; "
              f"peak RSS memex shards / plain = {shards['peak_rss_gb'] / plain['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
