"""Fetching scattered training images from WebDataset tar shards on S3 (moto's server on 127.0.0.1 in a process of
its own, each request delayed by --latency-ms and each answer sent at --mb-per-s), as match's fetch_training_images
does for a LAION-style set: train.pack holds no tar member, so each neighbour is read from its row's uri,
`tar://<member>::<shard>`.

    python bench/bench_tar_fetch.py [--shards 8] [--per-shard 500] [--size 20000] [--neighbours 16]
                                    [--latency-ms 20] [--mb-per-s 100] [--repeats 3]

Three sides fetch the same members, each in a fresh per-process offsets cache (as a new match worker):
  * memex: ingest.fetch_bytes with the index's URI as `version`, so each shard's offsets come from its kept
    listing under <root>/_shard_listings (written by the listing, untimed here, as the index stage writes it);
  * memex, header scan: the same fetch with no listing to go by (what memex did before: shards.tar_members
    scans the shard's headers through s3fs's readahead file);
  * plain tarfile: each shard opened once through fsspec, on a thread of its own, and its members extracted
    (tarfile.getmember reads every header first).
Requests are counted at the server, bytes as get_object's Content-Length at the client; seconds are the median of
--repeats. The images read are asserted equal on every side. S3 answers a request in ~10-30 ms from the same
region and sends ~50-100 MB/s on one connection: loopback alone would make a whole shard's bytes free.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--size", type=int, default=20_000, help="bytes of each image member (random)")
    ap.add_argument("--neighbours", type=int, default=16, help="members fetched, spread over the shards at random")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--mb-per-s", type=float, default=100.0, help="each answer's speed (0: loopback's)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import boto3
    import fsspec
    import numpy as np
    import pyarrow as pa
    import s3fs
    from slow_s3 import SlowS3

    from memex import shards
    from memex.ingest import fetch_bytes, list_training_set
    from memex.storage import Store

    server = SlowS3()
    served, delay, rate, url, opts = server.served, server.delay, server.rate, server.url, server.opts
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="bench")
    fs = fsspec.filesystem("s3", **opts)

    rng = np.random.default_rng(0)
    words = ["a", "photo", "of", "the", "red", "dog", "on", "beach", "at", "sunset", "vintage", "poster"]
    for s in range(a.shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for k in range(a.per_shard):
                caption = " ".join(rng.choice(words, 10)).encode()  # ~50 bytes, as LAION's
                for name, data in ((f"{k:09d}.jpg", rng.integers(0, 256, a.size, dtype=np.uint8).tobytes()),
                                   (f"{k:09d}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        fs.pipe_file(f"bench/laion/{s:05d}.tar", buf.getvalue())
    shard_bytes = fs.size("bench/laion/00000.tar")
    # the listing, as the index stage makes it (untimed: once per shard version, for every later audit)
    listing = list_training_set("s3://bench/laion", opts, shard_cache=Store("s3://bench/_index/_shard_listings", opts))
    kept = fs.ls("bench/_index/_shard_listings", detail=True)
    pick = np.sort(rng.choice(listing.num_rows, a.neighbours, replace=False))
    rows = listing.take(pick)
    rows = pa.table({"id": rows["id"], "image": pa.nulls(rows.num_rows, pa.binary()), "uri": rows["uri"]})
    index_uri = "s3://bench/_index/0123456789abcdef"  # an index folder under the root holding _shard_listings

    got_bytes = [0]
    real = s3fs.S3FileSystem._call_s3

    async def call(self, method, *args, **kw):
        out = await real(self, method, *args, **kw)
        if method == "get_object":
            got_bytes[0] += int(out.get("ContentLength") or 0)
        return out

    s3fs.S3FileSystem._call_s3 = call

    def memex(version):
        def read():
            got, bad = fetch_bytes(rows, opts, version=version)
            assert bad.num_rows == 0, bad.to_pylist()[:2]
            return got
        return read

    def plain():
        by_shard: dict[str, list[tuple[str, str]]] = {}
        for i, u in zip(rows["id"].to_pylist(), rows["uri"].to_pylist()):
            member, tar = shards.split_member_uri(u)
            by_shard.setdefault(tar, []).append((i, member))

        def one(item):
            tar, members = item
            with fsspec.open(tar, "rb", **opts) as f, tarfile.open(fileobj=f, mode="r:") as tf:
                return {i: tf.extractfile(tf.getmember(m)).read() for i, m in members}

        out = {}
        with ThreadPoolExecutor(len(by_shard)) as pool:
            for part in pool.map(one, by_shard.items()):
                out.update(part)
        return out

    def timed(read):
        shards._index.clear()  # a fresh process's offsets
        fs.invalidate_cache()
        served.value, got_bytes[0] = 0, 0
        t0 = time.perf_counter()
        got = read()
        return time.perf_counter() - t0, served.value, got_bytes[0], got

    delay.value, rate.value = a.latency_ms / 1000, a.mb_per_s * 1e6
    sides = [("memex (kept listing's offsets)", memex(index_uri)), ("memex, header scan (before)", memex(None)),
             ("plain tarfile, a shard a thread", plain)]
    results = {name: [timed(read) for _ in range(a.repeats)] for name, read in sides}
    server.stop()
    truth = results[sides[0][0]][0][3]
    assert all(r[3] == truth for rs in results.values() for r in rs), "the sides read different bytes"
    member_bytes = sum(len(v) for v in truth.values())
    touched = len({i.split("/")[0] for i in truth})
    print(f"{a.neighbours} neighbours ({member_bytes / 1e6:.2f} MB of images) from {touched} of {a.shards} shards "
          f"of {a.per_shard} samples ({shard_bytes / 1e6:.1f} MB each; kept listings "
          f"{statistics.mean(k['size'] for k in kept) / 1e3:.1f} KB each) on S3 (moto, loopback, "
          f"+{a.latency_ms:g} ms a request, {a.mb_per_s:g} MB/s an answer); median of {a.repeats}")
    print(f"{'side':<34} {'MB read':>9} {'x images':>9} {'requests':>9} {'seconds':>8}")
    med = {name: statistics.median(r[0] for r in rs) for name, rs in results.items()}
    for name, rs in results.items():
        print(f"{name:<34} {rs[0][2] / 1e6:>9.2f} {rs[0][2] / member_bytes:>9.1f} {rs[0][1]:>9} {med[name]:>8.2f}")
    ours = results[sides[0][0]][0]
    for name, _ in sides[1:]:
        r = results[name][0]
        print(f"{name} / memex: {r[2] / ours[2]:.1f}x the bytes, {r[1] / ours[1]:.2f}x the requests, "
              f"{med[name] / med[sides[0][0]]:.1f}x the seconds; equal bytes")


if __name__ == "__main__":
    main()
