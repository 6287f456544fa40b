"""Memory of the audit's prompt ranking: every training row's dups read whole (before) or a page at a time (now).

With prompts.source=near_duplicates (the default), the audit (memex/stages/audit.py) ranked the training
captions by near-duplicate count: read_duplicates read every dups/ shard whole (gid, id, caption, count:
one row per training image) and sorted it, then rank_by_near_duplicates sorted it again by caption, to
keep prompts.limit captions (24; the paper's 350,000). Now NearDuplicates (memex/membership.py) hands
rank_by_near_duplicates the captioned rows in rank order a page at a time (the first of max(2 x limit,
8,192) rows, each next one as large as all before), each page one scan of the files' caption and count
columns that keeps only the page's rows. `old` below is the former code, kept as the reference; each way
runs in a fresh process (peak RSS is per process, counted from after a warm-up on a 1,000-row
folder), and the bench checks that both pick the same prompts.

The dups folder: N rows in 4 shards (--shards) as the index writes them (one pyarrow row group per 1M rows), ~70-
character captions of random words (LAION's mean length), 1% of rows with 1-49 near-duplicates and the
rest 0 (so a limit past the duplicated rows' captions reads into the 0s, which all tie).

    python bench/bench_dups_memory.py [--rows 2000000] [--shards 4] [--limit 24 --limit 100000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
from sides import old_and_new  # bench/sides.py: bench/ is the folder of this script

CHILD = r"""
import json, sys, time
mode, root, n, limit, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sys.path.insert(0, sys.argv[6])  # bench/, for references.py: the old side
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 2**10
import references
from memex.membership import IndexInfo, NearDuplicates, read_duplicates
from memex.prompts import rank_by_near_duplicates

def info(root, n):
    return IndexInfo(root=root, key="k", shards=[(0, n)], metric="l2", dim=8, n_train=n, n_indexed=n, n_quarantined=0)
def way(root, n):
    if mode == "old":
        return references.rank_near_duplicates(read_duplicates(info(root, n), {}), limit)["prompt"].to_pylist()
    return rank_by_near_duplicates(NearDuplicates(info(root, n), {}), limit)["prompt"].to_pylist()
# warm-up on the 1,000-row folder: Arrow's readers, kernels and thread pools (~100 MB of RSS either way) are
# not counted as the training set's
way(root + "/warm", 1000)
base, t0 = status("VmRSS"), time.perf_counter()
picked = way(root, n)
json.dump({"s": time.perf_counter() - t0, "peak_mib": status("VmHWM") - base, "prompts": picked}, open(out, "w"))
"""


def write_dups(root: str, rows: int, shards: int = 4) -> None:
    from memex.layout import DUPS_SCHEMA, IndexLayout

    layout, rng = IndexLayout(root, "k"), np.random.default_rng(0)
    words = np.array(["photo", "of", "a", "red", "cat", "sitting", "on", "the", "wooden", "table", "near", "window"])
    per = rows // shards
    for s in range(shards):
        g = np.arange(s * per, (s + 1) * per, dtype=np.int64)
        caps = [" ".join(w) for w in rng.choice(words, (per, 12))]
        nd = (rng.random(per) < 0.01) * rng.integers(1, 50, per)
        layout.dups.write_shard(s, pa.table({"gid": g, "id": [f"laion-{x:012d}" for x in g], "caption": caps,
                                             "near_duplicates": nd.astype(np.int32)}, schema=DUPS_SCHEMA))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--limit", type=int, action="append")
    args = ap.parse_args()
    limits = args.limit or [24, 100_000]
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        write_dups(root, args.rows, args.shards)
        write_dups(root + "/warm", 1000)
        print(f"dups folder: {args.rows:,} rows in {args.shards} shards ({time.perf_counter() - t0:.0f} s to write)")
        print(f"{'limit':>8} {'way':>4} {'peak RSS growth':>16} {'time':>8}")
        for limit in limits:
            got = old_and_new(CHILD, root, root, str(args.rows), str(limit))
            for mode in got:
                print(f"{limit:>8,} {mode:>4} {got[mode]['peak_mib']:>12.0f} MiB {got[mode]['s']:>7.1f}s")
            same = got["old"]["prompts"] == got["new"]["prompts"]
            print(f"{'':>8} same {len(got['new']['prompts']):,} prompts in the same order: {same}")
            if not same:
                sys.exit("the two ways picked different prompts")


if __name__ == "__main__":
    main()
