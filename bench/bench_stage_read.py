"""Reading a stage folder of small Parquet units on S3 (moto's server on 127.0.0.1, each request delayed by
--latency-ms at the server), as filter, match and report read candidates/, matches/, triage/: the read before
(pq.ParquetDataset over the complete units' paths, which opens them one after another) against
StageFolder.read (memex/storage.py: the units read by READ_THREADS threads, concatenated in unit order).

    python bench/bench_stage_read.py [--shards 100] [--rows 50] [--latency-ms 20] [--repeats 3]

Both sides list the markers (complete()) and must return equal tables (asserted). Requests are counted at the
server (every HTTP request it answered), seconds are the median of --repeats. S3 from a cluster in the same
region takes ~10-30 ms a request, ~100 ms from another region; at 100,000 shards (175M samples) the read before
took ~3 serial requests a shard. Two bounds on the threaded side here that S3 does not have: moto spends ~10 ms
of Python a request (in a process of its own, one GIL), and aiobotocore keeps 10 connections by default
(storage.options config_kwargs.max_pool_connections raises it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--rows", type=int, default=50)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import boto3
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from slow_s3 import SlowS3

    from memex.storage import READ_THREADS, StageFolder, Store

    server = SlowS3()
    served, delay, url, opts = server.served, server.delay, server.url, server.opts
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="runs")

    schema = pa.schema([("sample_id", pa.int64()), ("prompt_id", pa.int64()), ("distance", pa.float32()),
                        ("train_id", pa.string())])
    store = Store("s3://runs/r1", opts)
    folder = StageFolder(store, "matches", schema=schema)
    rng = np.random.default_rng(0)
    for i in range(a.shards):
        ids = np.arange(i * a.rows, (i + 1) * a.rows)
        folder.write_shard(i, pa.table({"sample_id": ids, "prompt_id": ids // 4,
                                        "distance": rng.random(a.rows, dtype=np.float32),
                                        "train_id": [f"img-{j}" for j in ids]}, schema=schema))

    def before() -> pa.Table:
        paths = [folder.file(i) for i in folder.complete()]
        return pq.ParquetDataset(paths, filesystem=store.fs, schema=schema).read()

    def timed(read) -> tuple[float, int, pa.Table]:
        store.fs.invalidate_cache()
        served.value = 0
        t0 = time.perf_counter()
        t = read()
        return time.perf_counter() - t0, served.value, t

    delay.value = a.latency_ms / 1000
    old = [timed(before) for _ in range(a.repeats)]
    new = [timed(folder.read) for _ in range(a.repeats)]
    server.stop()
    assert all(r[2].equals(old[0][2]) for r in (*old, *new)), "the sides read different tables"
    assert old[0][2].num_rows == a.shards * a.rows
    med = lambda rs: statistics.median(r[0] for r in rs)  # noqa: E731
    print(f"{a.shards} units of {a.rows} rows on S3 (moto, loopback, +{a.latency_ms:g} ms a request); "
          f"median of {a.repeats}")
    print(f"{'side':<28} {'requests':>9} {'seconds':>8}")
    print(f"{'ParquetDataset (before)':<28} {old[0][1]:>9} {med(old):>8.2f}")
    print(f"{f'StageFolder.read ({READ_THREADS} threads)':<28} {new[0][1]:>9} {med(new):>8.2f}")
    print(f"StageFolder.read / before: {med(old) / med(new):.1f}x the speed, {new[0][1] / old[0][1]:.2f}x the "
          f"requests; equal tables")


if __name__ == "__main__":
    main()
