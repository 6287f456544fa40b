"""A match shard's fetch of its neighbours' training rows by gid: pyarrow's ("gid", "in", gids) filter (before)
against row groups picked by their gid statistics (train_rows.read_in, now).

fetch_train_rows (match.py fetch_training_images, keep_for_report, index.py count_duplicates and
write_pictures) and read_pictures (match.py propose, once per samples shard) read Parquet by a set of gids.
pyarrow 26 prunes row groups for an ("in", values) filter only for a few values (<~100): the ~640 neighbours
of a match shard (64 generations x match.k=10) read every row group. `old` is the former read_gids
(bench/references.py); both sides read the same file, the same gids, and must return the same rows.

Two measures of each side: its time on a local file (arrow's own reader), and what it read through an
fsspec store (as from S3: every read counted, with its bytes and the row groups its bytes reach; the file
copied into a memory:// store). pictures.parquet as the index writes it (pyarrow's default row groups of
1Mi rows): a shard's 640 random gids reach nearly every group of it, so there the gain is the column not read
(read_pictures reads gid and picture, not id).

The tar part (finding 2 of the same review): a WebDataset set's neighbours, each read by its tar shard's offsets
(memex/shards.py), through the old per-process cache (64 shards) and the new (TAR_CACHE_BYTES, 256 MB).

The report part (finding 3): keep_for_report's PNG of a training image, whole (before) against at most
match.REPORT_SIDE px.

    python bench/bench_gid_reads.py [--rows 1000000] [--group 256] [--gids 640] [--pictures 4000000] [--tars 400]
    python bench/bench_gid_reads.py --report 4000x6000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))  # references.py: the old side

import references  # noqa: E402
from fs_reads import record_reads  # noqa: E402

from memex import train_rows  # noqa: E402
from memex.layout import PICTURES_SCHEMA, TRAIN_SCHEMA, IndexLayout  # noqa: E402
from memex.membership import IndexInfo, read_pictures  # noqa: E402
from memex.train_rows import read_gids, write  # noqa: E402

CAPTION = "a photo of a red car parked in front of a house at sunset, high quality"


def train_tables(n: int, group: int):
    rng = np.random.default_rng(0)
    for s in range(0, n, 100 * group):
        m = min(100 * group, n - s)
        g = np.arange(s, s + m)
        yield pa.table({"gid": pa.array(g, pa.int64()), "id": [f"laion-{x:012d}" for x in g.tolist()],
                        "image": [rng.bytes(32) for _ in range(m)], "uri": [None] * m,
                        "caption": [f"{CAPTION} {x}" for x in g.tolist()]}, schema=TRAIN_SCHEMA)


class Counted:
    """A memory:// copy of a layout's files whose reads are counted: calls, bytes, and the row groups of the
    Parquet file their bytes reach (the footer's reads, each to the file's end, apart)."""

    def __init__(self, src: IndexLayout, paths: list[str]):
        self.root = f"memory://bench-gid-{uuid.uuid4().hex}"
        self.layout = IndexLayout(self.root, "k")
        fs = self.layout.store.fs
        for p in paths:
            with open(p, "rb") as f:
                fs.pipe_file(self.layout.store.join(Path(p).name), f.read())
        self.reads: list[tuple[str, int, int]] = []
        record_reads(fs, self.reads)
        self.fs = fs

    def take(self, path: str) -> tuple[int, int, int]:
        """(read calls, bytes, row groups reached) of `path` since the last take."""
        path = self.fs._strip_protocol(path)
        size = self.fs.info(path)["size"]
        with self.fs.open(path, "rb") as f:
            md = pq.ParquetFile(f).metadata
        got = [(lo, hi) for p, lo, hi in self.reads if p == path]
        self.reads.clear()
        data = sorted((lo, hi) for lo, hi in got if hi < size)  # the footer's reads end at the file's end
        starts, ends = [], []
        for i in range(md.num_row_groups):
            cols = [md.row_group(i).column(c) for c in range(md.num_columns)]
            first = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in cols]
            starts.append(min(first))
            ends.append(max(s + c.total_compressed_size for s, c in zip(first, cols)))
        reached = sum(any(lo < b and hi > a for lo, hi in data) for a, b in zip(starts, ends))
        return len(got), sum(hi - lo for lo, hi in got), reached


def timed(fn, repeat: int = 3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def lookups(n: int) -> None:
    """Every member of one n-member tar shard looked up by name (what the index build's decode does): the dict
    the offsets were before (references.tar_offsets_64's) against shards.Offsets."""
    from memex.shards import Offsets

    rng = np.random.default_rng(0)
    names = [f"{k:09d}.jpg" for k in rng.permutation(n)]  # a LAION shard's member names, in tar order
    offsets, sizes = np.arange(n) * 4096, np.full(n, 3000)
    old = {m: (int(o), int(z)) for m, o, z in zip(names, offsets, sizes)}
    new = Offsets(names, offsets, sizes)
    s_old, got_old = timed(lambda: [old.get(m) for m in names])
    s_new, got_new = timed(lambda: [new.get(m) for m in names])
    print(f"one tar shard of {n:,} members, each looked up: dict {s_old:.3f}s, Offsets {s_new:.3f}s "
          f"({s_new / n * 1e6:.1f} us a lookup; {s_new / s_old:.0f}x the dict's time); same answers: "
          f"{got_old == got_new}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--group", type=int, default=256)  # the index stage's max(64, index.decode_batch)
    ap.add_argument("--gids", type=int, default=640)
    ap.add_argument("--pictures", type=int, default=4_000_000)
    ap.add_argument("--tars", type=int, default=400)  # a WebDataset set's tar shards (0: no tar cache part)
    ap.add_argument("--per-tar", type=int, default=20)
    ap.add_argument("--report", help="HxW: the report's training image part alone, a photo-like JPEG of that size")
    ap.add_argument("--lookup", type=int, help="members of one tar shard: every one looked up, dict against Offsets")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    if args.report:
        return report_pngs(args.report)
    if args.lookup:
        return lookups(args.lookup)
    with tempfile.TemporaryDirectory() as root:
        if not args.rows:  # the tar part alone
            tar_cache(Path(root) / "tars", args.tars, args.per_tar, args.gids)
            return
        layout = IndexLayout(root, "k")
        write(layout.store, layout, train_tables(args.rows, args.group), row_group_size=args.group)
        groups = pq.ParquetFile(layout.rows_path).metadata.num_row_groups
        print(f"train_rows.parquet: {args.rows:,} rows, {groups:,} row groups of {args.group}, "
              f"{Path(layout.rows_path).stat().st_size / 2**20:.0f} MiB; {args.gids} random gids")
        gids = sorted(rng.choice(args.rows, args.gids, replace=False).tolist())
        counted = Counted(layout, [layout.rows_path, layout.pack_path])
        print(f"{'':>15} {'time':>7} {'reads':>7} {'bytes read':>11} {'row groups':>11}")
        got = {}
        for mode, fn in (("old", references.read_gids), ("new", read_gids)):
            s, got[mode] = timed(lambda: fn(layout, gids))
            fn(counted.layout, gids)
            n, nbytes, reached = counted.take(counted.layout.rows_path)
            got[mode + "_n"] = (s, nbytes, reached)
            print(f"{mode:>15} {s:>6.3f}s {n:>7,} {nbytes / 2**20:>7.1f} MiB {reached:>11,}")
        (so, bo, ro), (sn, bn, rn) = got["old_n"], got["new_n"]
        print(f"old/new: time {so / sn:.1f}x, bytes {bo / bn:.1f}x, row groups {ro / rn:.1f}x; "
              f"same {got['new'].num_rows} rows: {got['old'].equals(got['new'])}")
        if not got["old"].equals(got["new"]):
            sys.exit("the two reads differ")
        # chunks within PACK_GAP (256 KB) of each other come in one request: here the chosen groups lie ~6
        # groups (~20 KB) apart, so the new read fetches nearly all of this small file in a few requests (cheaper
        # on S3 than 640); at LAION scale they lie ~40 MB apart (2B rows), each its own request, as with no gap:
        gap, train_rows.PACK_GAP = train_rows.PACK_GAP, 0
        s, again = timed(lambda: read_gids(layout, gids))
        read_gids(counted.layout, gids)
        n, nbytes, reached = counted.take(counted.layout.rows_path)
        train_rows.PACK_GAP = gap
        print(f"{'new, PACK_GAP=0':>15} {s:>6.3f}s {n:>7,} {nbytes / 2**20:>7.1f} MiB {reached:>11,}")
        print(f"old/(new, PACK_GAP=0): bytes {bo / nbytes:.1f}x, row groups {ro / reached:.1f}x; "
              f"same rows: {again.equals(got['old'])}")

        if args.pictures:
            n = args.pictures
            pg = np.sort(rng.choice(10 * n, n, replace=False)).astype(np.int64)
            layout.store.write_table(layout.pictures_path, pa.table(
                {"gid": pg, "id": [f"laion-{x:012d}" for x in pg.tolist()], "picture": pg - pg % 7},
                schema=PICTURES_SCHEMA))
            groups = pq.ParquetFile(layout.pictures_path).metadata.num_row_groups
            info = IndexInfo(root=root, key="k", shards=[(0, 10 * n)], metric="ip", dim=8, n_train=10 * n,
                             n_indexed=10 * n, n_quarantined=0)
            want = rng.choice(10 * n, args.gids, replace=False)
            print(f"pictures.parquet: {n:,} rows, {groups} row groups, "
                  f"{Path(layout.pictures_path).stat().st_size / 2**20:.0f} MiB; {args.gids} random gids")
            counted = Counted(layout, [layout.pictures_path])
            cinfo = IndexInfo(root=counted.root, key="k", shards=info.shards, metric="ip", dim=8, n_train=10 * n,
                              n_indexed=10 * n, n_quarantined=0)
            res = {}
            for mode in ("old", "new"):
                if mode == "old":  # as read_pictures answered from the whole-column read
                    def fn(i, lay):
                        t = references.read_pictures_table(lay, sorted({int(g) for g in want}))
                        return {int(g): int(g) for g in want} | dict(zip(t["gid"].to_pylist(),
                                                                         t["picture"].to_pylist()))
                else:
                    def fn(i, lay):
                        return read_pictures(i, {}, want)
                s, res[mode] = timed(lambda: fn(info, layout))
                fn(cinfo, counted.layout)
                k, nbytes, reached = counted.take(counted.layout.pictures_path)
                res[mode + "_n"] = (s, nbytes)
                print(f"{mode:>15} {s:>6.3f}s {k:>7,} {nbytes / 2**20:>7.1f} MiB {reached:>11,}")
            (so, bo), (sn, bn) = res["old_n"], res["new_n"]
            print(f"old/new: time {so / sn:.1f}x, bytes {bo / bn:.1f}x; same answer: {res['old'] == res['new']}")
            if res["old"] != res["new"]:
                sys.exit("the two reads differ")
        if args.tars:
            tar_cache(Path(root) / "tars", args.tars, args.per_tar, args.gids)


def tar_cache(root: Path, n_tars: int, per: int, gids: int) -> None:
    """A WebDataset set's neighbours: each read by its tar shard's offsets (memex/shards.py), which cost a HEAD
    of the shard and a GET of its kept listing each time the process no longer holds them. Three samples shards,
    `gids` random neighbours each, through the old cache (64 shards, dicts: references.tar_offsets_64) and the
    new (TAR_CACHE_BYTES of Arrow arrays): the listings each fetched, the offsets' bytes held."""
    import io
    import tarfile

    from memex import shards
    from memex.ingest import fetch_bytes, list_training_set
    from memex.storage import Store

    root.mkdir(parents=True)
    for s in range(n_tars):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for k in range(per):
                for name, data in ((f"{k:09d}.jpg", b"x" * 100), (f"{k:09d}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        (root / f"{s:05d}.tar").write_bytes(buf.getvalue())
    listing = list_training_set(str(root), {}, shard_cache=Store(str(root / "_index" / "_shard_listings")))
    rows = pa.table({"id": listing["id"], "image": pa.nulls(listing.num_rows, pa.binary()), "uri": listing["uri"]})
    rng = np.random.default_rng(3)
    units = [np.sort(rng.choice(rows.num_rows, gids, replace=False)) for _ in range(3)]
    print(f"WebDataset set: {n_tars} tar shards of {per} samples; 3 samples shards of {gids} random neighbours")
    looked, real, real_offsets = [], shards.kept_offsets, shards._offsets
    shards.kept_offsets = lambda *a, **k: looked.append(a[0]) or real(*a, **k)
    counts = {}
    for mode in ("old", "new"):
        shards._offsets = references.tar_offsets_64 if mode == "old" else real_offsets
        shards._index.clear()
        references._TAR_INDEX.clear()
        per_unit = []
        for pick in units:
            looked.clear()
            # (one thread: the old side here lacks the per-shard lock that made two threads' look-ups one)
            got, bad = fetch_bytes(rows.take(pick), {}, workers=1, version=str(root / "_index" / "0123abcd"))
            assert bad.num_rows == 0 and len(got) == gids
            per_unit.append(len(looked))
        if mode == "old":
            index = references._TAR_INDEX["index"]
            held = sum(sys.getsizeof(d) + sum(sys.getsizeof(k) + sys.getsizeof(v) + sum(map(sys.getsizeof, v))
                                              for k, v in d.items()) for d, _ in index.values())
            kept = len(index)
        else:
            held, kept = sum(m.nbytes for m, _ in shards._index.values()), len(shards._index)
        counts[mode] = sum(per_unit)
        print(f"{mode:>4}: listing GETs (+ shard HEADs) per samples shard {per_unit}; {kept} shards' offsets held, "
              f"{held / 2**20:.1f} MiB ({held / max(kept * per, 1):.0f} bytes a member: a 10k-sample LAION shard "
              f"{held / max(kept * per, 1) * 1e4 / 2**20:.2f} MiB)")
    shards._offsets, shards.kept_offsets = real_offsets, real
    print(f"old/new: listing GETs {counts['old'] / max(counts['new'], 1):.1f}x "
          f"({counts['old']} against {counts['new']}: the new one each shard's first read only)")


def report_pngs(size: str) -> None:
    """keep_for_report's PNG of one extracted match's training image: its whole pixels (before:
    references.report_png_whole) against at most match.REPORT_SIDE px (match.report_png), on a photo-like JPEG
    (smooth gradients + sensor noise) of `size`: bytes, seconds, and what a chunk of 64 holds."""
    import io

    from PIL import Image

    from memex.stages import match

    h, w = (int(v) for v in size.split("x"))
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    img = (np.stack([np.sin(x / 37.0) * 60 + 128, np.cos(y / 53.0) * 60 + 128, (x + y) % 256 * 0.5 + 64], -1)
           + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    del img, x, y
    pixels = match.TrainPixels({7: buf.getvalue()}, {7: "photo"})
    print(f"training image {h}x{w} JPEG, {len(buf.getvalue()) / 2**20:.1f} MiB")
    got = {}
    for mode, fn in (("old", references.report_png_whole), ("new", match.report_png)):
        s, png = timed(lambda: fn(pixels, 7), repeat=2)
        got[mode] = (s, len(png))
        shape = Image.open(io.BytesIO(png)).size
        print(f"{mode:>4}: PNG {shape[0]}x{shape[1]} {len(png) / 2**20:>6.1f} MiB in {s:.2f} s; "
              f"a chunk of 64: {64 * len(png) / 2**30:.2f} GiB")
    (so, bo), (sn, bn) = got["old"], got["new"]
    print(f"old/new: bytes {bo / bn:.1f}x, time {so / sn:.1f}x")


if __name__ == "__main__":
    main()
