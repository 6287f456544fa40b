"""Driver memory for a training manifest with embedded images (img2dataset's parquet output, a
Hugging Face dataset, `memex train`'s manifests): the index stage's driver work (listing, index
key, the index's copy) against the plain floor, pyarrow's whole read of the same files
(`read_table`, or the Arrow streams of a datasets folder), each in a fresh process (peak RSS is
per process). Two ways for memex: `whole` reads the images onto the driver (what the index did
before; `memex mia` still does), `streamed` hashes them as read and copies them into
the index's copy (train_rows.parquet + train.pack) a batch at a time (what the index does now). The
bench's manifests are in id order, so both copies are equal (the bench checks it).

The manifest: N random-noise 256x256 JPEGs (~55 kB each: photos compress better, noise is the
worst case), written as one row group (pyarrow's default for a file this size) or as row groups
of 100 rows (img2dataset's writer flushes every 100 samples).

    python bench/bench_manifest.py [--images 9600]
    python bench/bench_manifest.py --path <a datasets save_to_disk folder, or any manifest>
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
import glob, json, os, sys
mode, path, out = sys.argv[1:4]
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 2**10
import pyarrow as pa, pyarrow.parquet as pq
from memex import cli
import numpy as np
from memex.ingest import iter_train_rows, list_training_set
from memex.layout import TRAIN_SCHEMA, IndexLayout
from memex.stages.index import index_key
from memex.train_rows import write
base = status("VmRSS")  # after the imports (torch, faiss come with memex)
if mode == "plain" and os.path.isdir(path):  # a datasets folder: its Arrow streams, read whole
    t = pa.concat_tables([pa.ipc.open_stream(open(f, "rb").read()).read_all()
                          for f in sorted(glob.glob(os.path.join(path, "*.arrow")))])
    rows = t.num_rows
elif mode == "plain":
    t = pq.read_table(path)
    rows = t.num_rows
else:  # what index.run does on the driver: list, key, write its copy (row groups of 64)
    cfg = cli.to_audit_config(cli.compose_config("audit", [f"trainset.path={path}", "trainset.caption_column=caption"]))
    listing = list_training_set(path, {}, "caption", images=(mode == "whole"))
    index_key(listing, cfg)
    rows = listing.num_rows
    layout = IndexLayout(out + ".d", "k")  # train_rows.parquet + train.pack, as memex/train_rows.py writes them
    if mode == "whole":
        train = pa.table({"gid": pa.array(np.arange(rows), pa.int64()), "id": listing["id"], "image": listing["image"],
                          "uri": listing["uri"], "caption": listing["caption"]}, schema=TRAIN_SCHEMA)
        write(layout.store, layout, [train], row_group_size=64)
        del train
    else:
        write(layout.store, layout, iter_train_rows(path, {}, listing, 256), row_group_size=64)
json.dump({"peak_mb": status("VmHWM") - base, "rss_mb": status("VmRSS") - base, "rows": rows}, open(out, "w"))
"""


def noise_jpegs(n: int) -> list[bytes]:
    """n 256x256 noise JPEGs (~55 kB each): 600 distinct pictures, repeated (the bench's ids differ)."""
    rng = np.random.default_rng(0)
    jpgs = []
    for _ in range(min(n, 600)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        jpgs.append(buf.getvalue())
    return [jpgs[i % len(jpgs)] for i in range(n)]


def manifest(folder: Path, n: int, row_group: int | None) -> Path:
    jpgs = noise_jpegs(n)
    t = pa.table({"id": [f"img-{i:06d}" for i in range(n)], "image": jpgs,
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
    ap.add_argument("--path", default=None, help="measure this training set instead of generated ones")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for row_group in ((None,) if args.path else (None, 100)):
            path = Path(args.path) if args.path else manifest(tmp, args.images, row_group)
            size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*"))) / 2**20
            plain, whole, streamed = (measure(m, path, tmp) for m in ("plain", "whole", "streamed"))
            assert plain["rows"] == whole["rows"] == streamed["rows"] == (plain["rows"] if args.path else args.images)
            w, st = tmp / "whole.json.d" / "k", tmp / "streamed.json.d" / "k"
            same = pq.read_table(w / "train_rows.parquet").equals(pq.read_table(st / "train_rows.parquet")) and \
                (w / "train.pack").read_bytes() == (st / "train.pack").read_bytes()
            what = path.name if args.path else "one row group" if row_group is None else f"row groups of {row_group}"
            print(f"{plain['rows']} images, {size:.0f} MB ({what}); peak above imports:")
            floor = "pyarrow, whole (read_table or IPC)"
            print(f"  {floor:<40} {plain['peak_mb']:6.0f} MB ({plain['peak_mb'] / size:.1f}x the file), "
                  f"held after {plain['rss_mb']:.0f} MB")
            for name, r in (("whole (listing + key + copy)", whole), ("streamed (the same)", streamed)):
                print(f"  memex {name:<34} {r['peak_mb']:6.0f} MB ({r['peak_mb'] / size:.1f}x the file), "
                      f"held after {r['rss_mb']:.0f} MB")
            print(f"  streamed / whole peak: {streamed['peak_mb'] / whole['peak_mb']:.2f}x; "
                  f"train_rows.parquet and train.pack the same: {same}")


if __name__ == "__main__":
    main()
