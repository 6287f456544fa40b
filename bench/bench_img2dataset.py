"""Listing img2dataset's default output (output_format=files: <shard>/<key>.jpg + <key>.txt, a metadata
<shard>.parquet per shard) on object storage: memex, which reads each shard's captions from its
metadata .parquet, against reading each image's <key>.txt (one GET an image: what the image-folder
reader does for any folder, and what memex did for this layout), on the same bucket, in one process.

The bucket is moto's S3 server on 127.0.0.1, so a request costs a few ms of this machine's CPU, not
a real S3 GET's round trip; the ratio of files read is the figure that carries over, and the bench
prints it (a Parquet file is a few ranged GETs, a sidecar one).

    python bench/bench_img2dataset.py [--images 2000] [--per-shard 1000]
"""

from __future__ import annotations

import argparse
import io
import logging
import time

import boto3
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from moto.server import ThreadedMotoServer
from PIL import Image

import memex.ingest
from memex.ingest import list_training_set


def write_layout(fs, root: str, n: int, per_shard: int) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    for shard in range(0, n, per_shard):
        name = f"{shard // per_shard:05d}"
        keys = [f"{name}{k:04d}" for k in range(min(per_shard, n - shard))]
        files = {f"{root}/{name}/{k}.jpg": jpg for k in keys}
        files.update({f"{root}/{name}/{k}.txt": f"a photo {k}".encode() for k in keys})
        fs.pipe(files)
        meta = pa.table({"key": keys, "url": [f"http://x/{k}" for k in keys], "caption": [f"a photo {k}" for k in keys],
                         "status": ["success"] * len(keys)})
        sink = pa.BufferOutputStream()
        pq.write_table(meta, sink)
        fs.pipe_file(f"{root}/{name}.parquet", sink.getvalue().to_pybytes())


def count_reads(fs) -> list[int]:
    """Files read through the filesystem class: cat_file (a sidecar: one GET) and open (a Parquet
    file: a few ranged GETs for its footer and column chunks)."""
    calls = [0]
    for name in ("cat_file", "open"):  # on the instance: fsspec mirrors async methods onto each one
        original = getattr(fs, name)

        def counted(path, *args, _original=original, **kwargs):
            calls[0] += 1
            return _original(path, *args, **kwargs)

        setattr(fs, name, counted)
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=1000)
    a = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    url = "http://%s:%d" % server.get_host_and_port()
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="bench")
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"}}
    fs = fsspec.filesystem("s3", **opts)
    write_layout(fs, "bench/laion", a.images, a.per_shard)
    calls = count_reads(fs)
    assert fsspec.core.url_to_fs("s3://bench/laion", **opts)[0] is fs  # the cached instance memex lists with
    captions = memex.ingest._img2dataset_captions
    out = {}
    for name in ("sidecars", "memex", "sidecars", "memex"):  # alternated, the second of each kept
        memex.ingest._img2dataset_captions = (lambda *args: {}) if name == "sidecars" else captions
        calls[0] = 0
        t0 = time.perf_counter()
        table = list_training_set("s3://bench/laion", opts)
        out[name] = (time.perf_counter() - t0, calls[0], table)
    memex.ingest._img2dataset_captions = captions
    server.stop()
    assert out["memex"][2].equals(out["sidecars"][2]), "the two ways listed different rows or captions"
    print(f"img2dataset files output on moto S3: {a.images} images in shards of {a.per_shard}")
    for name, what in (("sidecars", "a GET per <key>.txt"), ("memex", "captions from <shard>.parquet")):
        took, gets, _ = out[name]
        print(f"  {what:31s}: {took:6.2f} s, {gets:5d} files read")
    print(f"  memex / sidecars: {out['sidecars'][0] / out['memex'][0]:.1f}x faster, "
          f"{out['sidecars'][1] / max(out['memex'][1], 1):.0f}x fewer files read; same rows and captions")


if __name__ == "__main__":
    main()
