"""Memory of one index shard task: its training rows read whole (before) or a batch at a time (now).

The index's shard task (memex/stages/index.py build_shard) decodes, embeds and indexes the rows of
its gid range of train.parquet. It read that range in one `read_table(filters=...)`: every encoded
image of the shard at once, ~10 GB a task for a quarter of a 1M-image LAION part, with 4 tasks on
one node. Now `read_range` (memex/train_rows.py) reads the row groups that reach the range one at a
time, and the task holds index.decode_batch rows of images. Both ways run the real build_shard (the
pixels embedder, a flat index) in a fresh process each (peak RSS is per process); `whole` swaps
read_range for the former read. The shards they write must be equal (the bench checks it).

The training set: N random-noise 256x256 JPEGs (~55 kB each, photos compress better), written as the
index writes it (row groups of max(64, index.decode_batch) rows): `batched` reads train.parquet +
train.pack, `whole` a train.parquet with the images inline (the layout before train.pack).

    python bench/bench_shard_read.py [--images 9600]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_manifest import noise_jpegs  # noqa: E402

CHILD = r"""
import json, sys, time
mode, root, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 2**10
from memex import cli
from memex.layout import TRAIN_SCHEMA, IndexLayout
from memex.stages import index
from memex import train_rows
base = status("VmRSS")  # after the imports (torch, faiss come with memex)
if mode == "whole":  # the former read: the shard's whole gid range, then sliced a batch at a time
    def whole(layout, start, stop, batch, gids=None):
        rows = layout.store.read_table(layout.inline_train_path, schema=TRAIN_SCHEMA,
                                       filters=[("gid", ">=", start), ("gid", "<", stop)])
        return (rows.slice(b, batch) for b in range(0, rows.num_rows, batch))
    train_rows.read_range = whole  # (index calls it through the module)
cfg = cli.to_audit_config(cli.compose_config("audit", []))
layout = IndexLayout(root, mode)
t0 = time.perf_counter()
meta = index.build_shard(0, layout, 0, n, cfg.embedder, cfg.index, "cpu", cfg.trainset.preprocess.value)
json.dump({"peak_mb": status("VmHWM") - base, "seconds": time.perf_counter() - t0, "indexed": meta["indexed"]},
          open(out, "w"))
"""


def train_parquet(root: Path, n: int, row_group: int) -> None:
    """root/whole/train.parquet (images inline) and root/batched/train.parquet + train.pack."""
    from memex import train_rows
    from memex.layout import TRAIN_SCHEMA, IndexLayout

    t = pa.table({"gid": pa.array(np.arange(n), pa.int64()), "id": [f"img-{i:06d}" for i in range(n)],
                  "image": noise_jpegs(n), "uri": [None] * n,
                  "caption": [f"caption {i}" for i in range(n)]}, schema=TRAIN_SCHEMA)
    whole, batched = IndexLayout(str(root), "whole"), IndexLayout(str(root), "batched")
    whole.store.write_table(whole.inline_train_path, t, row_group_size=row_group)
    train_rows.write(batched.store, batched, [t], row_group_size=row_group)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=9600)
    args = ap.parse_args()
    from memex import cli

    cfg = cli.to_audit_config(cli.compose_config("audit", []))
    group = max(64, cfg.index.decode_batch)  # as memex/stages/index.py writes train.parquet
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for mode in ("whole", "batched"):
            (root / mode).mkdir()
        train_parquet(root, args.images, group)
        size = (root / "whole" / "train.parquet").stat().st_size / 2**20
        got = {}
        for mode in ("whole", "batched"):
            out = root / f"{mode}.json"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", CHILD, mode, str(root), str(args.images), str(out)], check=True)
            got[mode] = {**json.loads(out.read_text()), "wall": time.perf_counter() - t0}
        vectors = [np.load(root / mode / "shards" / "vectors-shard-000000.npz") for mode in ("whole", "batched")]
        same = all(np.array_equal(vectors[0][k], vectors[1][k]) for k in ("vectors", "gids"))
        print(f"{args.images} images, train.parquet {size:.0f} MB (row groups of {group}), one shard task "
              f"(embedder {cfg.embedder.kind.value} {cfg.embedder.size} px, index.decode_batch "
              f"{cfg.index.decode_batch}); peak RSS above imports:")
        for mode, what in (("whole", "the shard's rows read whole (before)"),
                           ("batched", "read_range, a batch at a time (now)")):
            r = got[mode]
            print(f"  {what:<40} {r['peak_mb']:7.0f} MB ({r['peak_mb'] / size:.2f}x the file)  "
                  f"{r['seconds']:6.1f} s  {r['indexed']} indexed")
        print(f"  batched / whole peak: {got['batched']['peak_mb'] / got['whole']['peak_mb']:.2f}x; "
              f"time {got['batched']['seconds'] / got['whole']['seconds']:.2f}x; vectors the same: {same}")
        if got["whole"]["indexed"] != got["batched"]["indexed"] or not same:
            sys.exit("the two ways indexed different vectors")


if __name__ == "__main__":
    main()
