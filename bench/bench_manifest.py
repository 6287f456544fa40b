"""Driver memory for a training manifest with embedded images (img2dataset's parquet output, a
Hugging Face dataset, `memex train`'s manifests): memex's listing and index key (what the audit's
driver holds before any index unit runs) against the plain floor, `pyarrow.parquet.read_table` of
the same file, each in a fresh process (peak RSS is per process).

The manifest: N random-noise 256x256 JPEGs (~55 kB each: photos compress better, noise is the
worst case), written as one row group (pyarrow's default for a file this size) or as row groups
of 100 rows (img2dataset's writer flushes every 100 samples).

    python bench/bench_manifest.py [--images 9600]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CHILD = r"""
import json, sys
mode, path, out = sys.argv[1:4]
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 2**10
import pyarrow as pa, pyarrow.parquet as pq
from memex import cli
from memex.ingest import list_training_set
from memex.stages.index import index_key
base = status("VmRSS")  # after the imports (torch, faiss come with memex)
if mode == "plain":
    t = pq.read_table(path)
    rows = t.num_rows
else:
    cfg = cli.to_audit_config(cli.compose_config("audit", [f"trainset.path={path}", "trainset.caption_column=caption"]))
    listing = list_training_set(path, {}, "caption")
    index_key(listing, cfg)
    rows = listing.num_rows
json.dump({"peak_mb": status("VmHWM") - base, "rss_mb": status("VmRSS") - base, "rows": rows}, open(out, "w"))
"""


def manifest(folder: Path, n: int, row_group: int | None) -> Path:
    rng = np.random.default_rng(0)
    jpgs = []
    for _ in range(min(n, 600)):  # 600 distinct pictures, repeated under distinct ids
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        jpgs.append(buf.getvalue())
    t = pa.table({"id": [f"img-{i:06d}" for i in range(n)], "image": [jpgs[i % len(jpgs)] for i in range(n)],
                  "caption": [f"caption {i}" for i in range(n)]})
    path = folder / f"manifest-{row_group or 'one'}.parquet"
    pq.write_table(t, path, row_group_size=row_group)
    return path


def measure(mode: str, path: Path, tmp: Path) -> dict:
    out = tmp / f"{mode}.json"
    subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(out)], check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=9600)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for row_group in (None, 100):
            path = manifest(tmp, args.images, row_group)
            size = path.stat().st_size / 2**20
            plain, memex = measure("plain", path, tmp), measure("memex", path, tmp)
            assert plain["rows"] == memex["rows"] == args.images
            what = "one row group" if row_group is None else f"row groups of {row_group}"
            print(f"{args.images} images, {size:.0f} MB ({what}): peak above imports: read_table "
                  f"{plain['peak_mb']:.0f} MB "
                  f"({plain['peak_mb'] / size:.1f}x the file), memex listing + key {memex['peak_mb']:.0f} MB "
                  f"({memex['peak_mb'] / size:.1f}x): {memex['peak_mb'] / plain['peak_mb']:.2f}x read_table's; "
                  f"held after: {plain['rss_mb']:.0f} vs {memex['rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
