"""The match stage's fetch of training images by gid: train.pack's ranged reads against train.parquet's
row groups (the layout before train.pack).

    python bench/bench_fetch.py [--rows 10240] [--fetch 16,128,512] [--s3]

For each samples shard, match (memex/stages/match.py fetch_training_images) fetches the pixels of its
generations' distinct nearest training images: 500-2,000 rows scattered over the training set. With the
images inline in train.parquet, pyarrow reads the image column of a whole row group (512 rows, as the
index writes it) for one row. Now train_rows.parquet holds where each image lies in train.pack, and each
image is one ranged read (memex/train_rows.py). Both sides run memex.train_rows.read_gids on the same
rows, written as the index writes them (row groups of max(64, index.decode_batch)), and must return
the same table. Bytes read: /proc/self/io rchar (local files), or the bytes S3 sent (--s3: a moto server
on 127.0.0.1, requests counted; its times are not S3's: moto copies the whole object for a ranged GET,
71 ms for 50 KB of a 100 MB object against 4 ms of a 1 MB one). Random-noise 256x256 JPEGs (~55 KB,
LAION's average is ~40 KB).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def rchar() -> int:
    return int(open("/proc/self/io").read().split("rchar:")[1].split()[0])


def s3_root(tmp: Path) -> tuple[str, dict, object]:
    """A moto server on loopback, a bucket, and the storage options memex would be given."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line a request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, aws_access_key_id="k", aws_secret_access_key="s",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    return "s3://bench", {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": url}}, server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10240)
    ap.add_argument("--fetch", default="16,128,512", help="distinct gids a fetch asks for (a shard's neighbours)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--s3", action="store_true", help="both layouts in a moto S3 bucket on 127.0.0.1")
    args = ap.parse_args()

    from bench_manifest import noise_jpegs

    from memex import cli, train_rows
    from memex.layout import TRAIN_SCHEMA, IndexLayout

    cfg = cli.to_audit_config(cli.compose_config("audit", []))
    group = max(64, cfg.index.decode_batch)  # as memex/stages/index.py writes its tables
    n = args.rows
    t = pa.table({"gid": pa.array(np.arange(n), pa.int64()), "id": [f"img-{i:06d}" for i in range(n)],
                  "image": noise_jpegs(n), "uri": [None] * n, "caption": [f"caption {i}" for i in range(n)]},
                 schema=TRAIN_SCHEMA)
    with tempfile.TemporaryDirectory() as tmp:
        server, counted = None, {"bytes": 0, "requests": 0}
        root, opts = str(tmp), {}
        if args.s3:
            root, opts, server = s3_root(Path(tmp))
        inline, packed = IndexLayout(root, "inline", opts), IndexLayout(root, "packed", opts)
        inline.store.write_table(inline.inline_train_path, t, row_group_size=group)  # the layout before train.pack
        train_rows.write(packed.store, packed, [t], row_group_size=group)
        size = sum(len(b) for b in t["image"].to_pylist()) / 2**20
        if args.s3:  # count what S3 sends: every GET's body, through botocore's event hooks
            packed.store.fs.connect(refresh=False)  # one s3fs instance (cached by options): one client
            client = packed.store.fs.s3

            def after(http_response=None, **_):
                counted["requests"] += 1
                counted["bytes"] += int(http_response.headers.get("content-length", 0) or 0)
            client.meta.events.register("after-call.s3.GetObject", after)

        def measure(layout, gids):
            before, c0, r0 = rchar(), counted["bytes"], counted["requests"]
            t0 = time.perf_counter()
            got = train_rows.read_gids(layout, gids)
            secs = time.perf_counter() - t0
            read = counted["bytes"] - c0 if args.s3 else rchar() - before
            return got, secs, read, counted["requests"] - r0

        print(f"{n} training rows, {size:.0f} MB of JPEGs, row groups of {group} ({-(-n // group)} groups); "
              f"{'moto S3 on 127.0.0.1' if args.s3 else 'local disk (page cache warm)'}; median of {args.repeats}")
        rng = np.random.default_rng(0)
        for k in (int(x) for x in args.fetch.split(",")):
            gids = sorted(rng.choice(n, k, replace=False).tolist())
            secs = {"inline": [], "packed": []}
            for _ in range(args.repeats):  # alternating sides
                a, sa, ra, qa = measure(inline, gids)
                b, sb, rb, qb = measure(packed, gids)
                secs["inline"].append(sa)
                secs["packed"].append(sb)
                if not a.equals(b):
                    sys.exit(f"the two layouts returned different rows for {k} gids")
            ma, mb = statistics.median(secs["inline"]), statistics.median(secs["packed"])
            fetched = sum(len(x) for x in b["image"].to_pylist()) / 2**20
            req = f", requests {qa} / {qb}" if args.s3 else ""
            print(f"  {k:5d} gids ({fetched:6.1f} MB of images): read {ra / 2**20:8.1f} MB inline, "
                  f"{rb / 2**20:7.1f} MB packed ({ra / max(rb, 1):6.1f}x fewer bytes); {ma:6.3f} s against "
                  f"{mb:6.3f} s ({ma / mb:5.1f}x){req}; the same rows")
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
