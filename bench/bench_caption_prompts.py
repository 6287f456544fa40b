"""Memory of prompts=captions on a training manifest: the caption column read whole (before) or a batch at a time (now).

prompts=captions (README: `memex generate prompts=captions prompts.path=s3://b/train.parquet`) ranks a training
manifest's captions by how often each exact caption repeats. load_prompts read the whole caption column, made a
Python str of every row's caption, stripped, and a second list of them, then group_by'd that (~330 bytes a row
at peak, whatever prompts.limit). Now the column is read 65,536 rows a batch, stripped in Arrow (utf8_trim with
str.strip()'s whitespace), counted a batch at a time and the partial counts folded together, so what is held
follows the distinct captions; the top prompts are made Python strs 8,192 at a time. `old` below is the former
code, kept as the reference; each way runs in a fresh process (peak RSS is per process, counted from after a
warm-up on a 1,000-row manifest), and the bench checks that both pick the same prompts, with the same ids.

The manifest: N rows (id, caption) in one Parquet file, a row group per 1M rows, ~60-character captions of random
words; --dup 0.1: 10% of the rows repeat another row's caption (0: every caption distinct).

    python bench/bench_caption_prompts.py [--rows 3000000] [--dup 0.1 --dup 0] [--limit 24 --limit 350000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sides import old_and_new  # bench/sides.py: bench/ is the folder of this script

CHILD = r"""
import json, sys, time
mode, path, warm, limit, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
sys.path.insert(0, sys.argv[6])  # bench/, for references.py: the old side
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 2**10
import references
from memex.config import PromptsConfig, PromptSource
from memex.prompts import load_prompts

def way(path):
    cfg = PromptsConfig(source=PromptSource.captions, path=path, limit=limit)
    way = references.caption_prompts if mode == "old" else load_prompts
    return [tuple(r.values()) for r in way(cfg).to_pylist()]
# warm-up on a 1,000-row manifest: Arrow's readers, kernels and thread pools are not counted as the manifest's
way(warm)
base, t0 = status("VmRSS"), time.perf_counter()
rows = way(path)
json.dump({"s": time.perf_counter() - t0, "peak_mib": status("VmHWM") - base, "rows": rows}, open(out, "w"))
"""


def write_manifest(path: str, rows: int, dup: float) -> None:
    rng = np.random.default_rng(0)
    words = np.array(["a", "photo", "of", "red", "cat", "dog", "house", "on", "the", "beach", "at", "night", "blue",
                      "logo", "vintage", "poster", "portrait", "woman", "man", "street"])
    distinct = max(1, round(rows * (1 - dup)))
    text = rng.integers(0, len(words), (distinct, 10), dtype=np.uint8)  # caption k: 10 random words and k
    which = rng.permutation(rows) % distinct  # row i's caption: the repeats spread over the file
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("caption", pa.string())])) as w:
        for start in range(0, rows, 1 << 20):
            ks = which[start:start + (1 << 20)]
            caps = [" ".join(ws) + f" {k}" for ws, k in zip(words[text[ks]], ks)]
            w.write_table(pa.table({"id": [f"img-{x:012d}" for x in range(start, start + len(ks))], "caption": caps}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3_000_000)
    ap.add_argument("--dup", type=float, action="append", help="share of rows repeating another row's caption")
    ap.add_argument("--limit", type=int, action="append")
    args = ap.parse_args()
    dups, limits = args.dup or [0.1, 0.0], args.limit or [24]
    with tempfile.TemporaryDirectory() as root:
        warm = f"{root}/warm.parquet"
        write_manifest(warm, 1000, 0.1)
        print(f"{'manifest':>32} {'limit':>8} {'way':>4} {'peak RSS growth':>16} {'time':>8}")
        for dup in dups:
            path = f"{root}/train_{dup}.parquet"
            t0 = time.perf_counter()
            write_manifest(path, args.rows, dup)
            name = f"{args.rows:,} rows, {dup:.0%} duplicated"
            print(f"{name:>32} (written in {time.perf_counter() - t0:.0f} s)")
            for limit in limits:
                got = old_and_new(CHILD, root, path, warm, str(limit))
                for mode in got:
                    print(f"{'':>32} {limit:>8,} {mode:>4} {got[mode]['peak_mib']:>12.0f} MiB {got[mode]['s']:>7.1f}s")
                same = got["old"]["rows"] == got["new"]["rows"]
                print(f"{'':>32} same {len(got['new']['rows']):,} prompts and ids in the same order: {same}")
                if not same:
                    sys.exit("the two ways picked different prompts")


if __name__ == "__main__":
    main()
