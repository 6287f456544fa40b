"""Listing an image folder captioned by <stem>.txt sidecars on S3 (moto's server on 127.0.0.1), as the
index stage does on every audit before it can find a finished index: memex with its kept captions (one
file per folder under the index root, `shard_cache`) against the plain listing that reads every sidecar.

    python bench/bench_sidecars.py [--folders 10] [--per-folder 200] [--repeats 3]

Both sides call memex.ingest.list_training_set on the same bucket and must return equal tables
(asserted). `plain` passes no cache: one GET per sidecar (the code before). `memex cold` is the first
listing with the cache (every sidecar read, then a file per folder written); `memex warm` every later
one (a HEAD and a GET per folder). Requests are counted at the S3 client (botocore's before-call event),
seconds are the median of --repeats. moto on loopback answers in ~1-3 ms; S3 from a cluster in the
same region takes ~10-30 ms a request with 8 in flight, so the request counts carry over and the
seconds do not.
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
    ap.add_argument("--folders", type=int, default=10)
    ap.add_argument("--per-folder", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import socket

    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from memex.images import encode_png
    from memex.ingest import list_training_set
    from memex.storage import Store
    from memex.synth import logo

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging

    class Count(logging.Handler):  # the server's access log: one record per HTTP request it answered
        def emit(self, record):
            calls["n"] += 1

    calls = {"n": 0}
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(Count())
    werkzeug.propagate = False
    werkzeug.setLevel(logging.INFO)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"}}
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket="set")
    png = encode_png(logo(0, 16)[0])
    for f in range(a.folders):
        for i in range(a.per_folder):
            client.put_object(Bucket="set", Key=f"imgs/{f:03d}/{i:05d}.png", Body=png)
            client.put_object(Bucket="set", Key=f"imgs/{f:03d}/{i:05d}.txt", Body=f"caption {f} {i}".encode())
    n = a.folders * a.per_folder

    def timed(cache_root: str | None) -> tuple[float, int, object]:
        s3fs.S3FileSystem.clear_instance_cache()
        calls["n"] = 0
        t0 = time.perf_counter()
        t = list_training_set("s3://set/imgs", opts, shard_cache=Store(cache_root, opts) if cache_root else None)
        return time.perf_counter() - t0, calls["n"], t

    client.create_bucket(Bucket="cache")
    plain = [timed(None) for _ in range(a.repeats)]
    cold = timed("s3://cache/_index/_shard_listings")
    warm = [timed("s3://cache/_index/_shard_listings") for _ in range(a.repeats)]
    server.stop()
    assert all(r[2].equals(plain[0][2]) for r in (*plain, cold, *warm)), "the sides listed different tables"
    med = lambda rs: statistics.median(r[0] for r in rs)  # noqa: E731
    print(f"{n} images with sidecar captions in {a.folders} folders on S3 (moto, loopback); median of {a.repeats}")
    print(f"{'side':<12} {'requests':>9} {'seconds':>8}")
    print(f"{'plain':<12} {plain[0][1]:>9} {med(plain):>8.2f}")
    print(f"{'memex cold':<12} {cold[1]:>9} {cold[0]:>8.2f}")
    print(f"{'memex warm':<12} {warm[0][1]:>9} {med(warm):>8.2f}")
    print(f"memex warm / plain: {plain[0][1] / warm[0][1]:.0f}x fewer requests, {med(plain) / med(warm):.1f}x the "
          f"speed; equal tables")


if __name__ == "__main__":
    main()
