"""Memory of the index's listing of a Parquet manifest written as one row group: read whole (before) or a page
at a time through pyarrow's buffer (now).

pq.write_table and pandas' to_parquet write up to 1Mi rows a row group, so a manifest part of 100k embedded images
is one row group. memex/manifest.py's _parquet_batches streamed it 256 rows at a time, but pyarrow read the row
group's whole image column chunk first (buffer_size=0): peak RSS ~1.2x the file. Now it reads with
buffer_size=PARQUET_BUFFER (8 MiB). `old` below is the former reader (bench/references.py parquet_batches); each
way lists the manifest as the index does (list_training_set(images=False): every image's sha256, not its bytes)
in a fresh process, peak RSS counted from after a warm-up on a 100-row manifest, and the bench checks both
listings are the same.

    python bench/bench_rowgroup_memory.py [--images 10000] [--kb 50] [--group 1048576]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sides import old_and_new  # bench/sides.py: bench/ is the folder of this script

CHILD = r"""
import hashlib, json, sys, time
mode, root, out = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, sys.argv[4])  # bench/, for references.py: the old side
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 2**10
import references
import memex.manifest
from memex.ingest import IMAGE_SHA256, list_training_set
if mode == "old":
    memex.manifest._parquet_batches = references.parquet_batches
list_training_set(root + "/warm.parquet", images=False)  # Arrow's readers and thread pools: not the manifest's
base, t0 = status("VmRSS"), time.perf_counter()
t = list_training_set(root + "/m.parquet", images=False)
s, peak = time.perf_counter() - t0, status("VmHWM") - base
digest = hashlib.sha256(b"".join(c.encode() + d for c, d in zip(t["id"].to_pylist(), t[IMAGE_SHA256].to_pylist())))
json.dump({"s": s, "peak_mib": peak, "rows": t.num_rows, "listing": digest.hexdigest()}, open(out, "w"))
"""


def write_manifest(path: str, images: int, size: int, group: int = 1 << 20) -> None:
    """`images` rows of `size` random bytes each (incompressible, like JPEGs), `group` rows a row group (pyarrow's
    default: one row group up to 1Mi rows), uncompressed."""
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, size * 64, np.uint8).tobytes()
    imgs = [blob[(i % 60) * 1000:(i % 60) * 1000 + size] + i.to_bytes(4, "little") for i in range(images)]
    pq.write_table(pa.table({"id": [f"{i:08d}" for i in range(images)], "image": pa.array(imgs, pa.binary()),
                             "caption": [f"a photo {i}" for i in range(images)]}), path, compression="none",
                   row_group_size=group)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--kb", type=int, default=50)
    ap.add_argument("--group", type=int, default=1 << 20, help="rows a row group (a manifest of many: no change)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        write_manifest(f"{root}/m.parquet", args.images, args.kb * 1000, args.group)
        write_manifest(f"{root}/warm.parquet", 100, args.kb * 1000)
        groups = pq.ParquetFile(f"{root}/m.parquet").metadata.num_row_groups
        print(f"manifest: {args.images:,} images of {args.kb} kB, {os.path.getsize(f'{root}/m.parquet') / 2**20:.0f} "
              f"MiB, {groups} row group(s)")
        got = old_and_new(CHILD, root, root)
        for mode in got:
            print(f"{mode:>4} peak RSS growth {got[mode]['peak_mib']:>6.0f} MiB {got[mode]['s']:>6.1f}s "
                  f"({got[mode]['rows']:,} rows)")
        print(f"ratio old/new: {got['old']['peak_mib'] / max(got['new']['peak_mib'], 1):.1f}x")
        same = got["old"]["listing"] == got["new"]["listing"]
        print(f"same listing (ids and image sha256s, in order): {same}")
        if not same:
            sys.exit("the two ways listed different rows")


if __name__ == "__main__":
    main()
