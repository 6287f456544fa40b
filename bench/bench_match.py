"""The match stage's search: memex's resident worker against the plain per-unit reload.

    python bench/bench_match.py                          # CLIP ViT-B/32 shape, 400k x 512-d flat index
    python bench/bench_match.py --embedder pixels        # the demo's weight-free embedder
    python bench/bench_match.py --s3                     # index and model behind moto's S3 on loopback

A match unit is one samples shard (sampling.shard_size generations): embed them, search every
FAISS shard of the training index, merge the top k. Both sides below do exactly that for the same
units on the same local Ray, and must return the same ids:
  plain  what memex did before (and what one writes first): per unit, one Ray task builds the
         embedder and embeds, then one Ray task per index shard reads that shard from storage
         and searches it; the driver merges (memex/index.py merge_topk).
  memex  memex/stages/nearest.py Neighbours: one actor of the same shape builds the embedder and
         reads every shard once, at the first unit; each unit is one call.
The index is synthetic (unit vectors; the embedder's dim and metric) written as real index shards
(memex/index.py build_shard, save_index); the generations are smooth 512x512 PNGs. Times are
wall clock for all units, memex's start-up included: medians of --repeats runs that alternate the
order (their min-max printed); memory is the peak RSS of the largest Ray worker and of all of them
together while each side ran (psutil, every 0.2 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


# ---- the plain way: what match.py did per unit before the resident worker ------------------------
def plain_embed(images: list[bytes], emb, device: str, preprocess: str, storage_options: dict) -> np.ndarray:
    from memex.embed import make_embedder
    from memex.images import decode, fit
    from memex.models import resolve_device

    embedder = make_embedder(emb, resolve_device(device), storage_options)
    return embedder(np.stack([fit(decode(b), emb.size, preprocess) for b in images]))


def plain_search(info, storage_options: dict, shard: int, queries: np.ndarray, k: int, idx) -> tuple:
    from memex.index import search_shard
    from memex.membership import load_shards

    (index,) = load_shards(info.layout(storage_options), [shard])
    return search_shard(index, queries, k, info.spec(idx))


def plain_unit(cfg, info, images: list[bytes], k: int) -> tuple:
    from memex import runner
    from memex.index import merge_topk

    r, opts = cfg.resources, cfg.storage.options
    (q,) = runner.call_all(plain_embed, [{"images": images, "emb": cfg.embedder, "device": r.device,
                                          "preprocess": cfg.trainset.preprocess.value, "storage_options": opts}], r)
    parts = runner.call_all(plain_search, [{"info": info, "storage_options": opts, "shard": s, "queries": q, "k": k,
                                            "idx": cfg.index} for s in range(len(info.shards))], r, gpu=False)
    return merge_topk(parts, k, info.metric)


# ---- inputs ----------------------------------------------------------------------------------
def build_clip(path: Path) -> None:
    """A randomly initialised CLIP ViT-B/32 image tower (88M parameters, 512-d projection), saved
    as a transformers folder: the shape of openai/clip-vit-base-patch32, no download."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=512)).save_pretrained(path)


def smooth_pngs(n: int, side: int, rng) -> list[bytes]:
    from PIL import Image

    from memex.images import encode_png

    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (side // 64, side // 64, 3)).astype(np.uint8)
        out.append(encode_png(np.array(Image.fromarray(coarse).resize((side, side), Image.BILINEAR))))
    return out


def vectors(n: int, centers: np.ndarray, rng) -> np.ndarray:
    """Unit vectors around 256 centres: clustered, as image embeddings are, so IVF has lists to use."""
    x = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.standard_normal((n, centers.shape[1]), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_index(root: str, opts: dict, n: int, dim: int, metric: str, n_shards: int, idx, rng):
    """The index stage's files for n synthetic vectors: one shared IVF-PQ quantizer (as the stage
    trains it), n_shards shards of global ids."""
    from memex.index import IndexSpec, build_shard, save_index, train_index
    from memex.layout import IndexLayout
    from memex.membership import IndexInfo

    layout = IndexLayout(root, "bench", opts)
    spec = IndexSpec.from_config(idx, metric)
    centers = rng.standard_normal((256, dim), dtype=np.float32)
    trained = train_index(vectors(spec.train_size, centers, rng), spec) if spec.kind == "ivfpq" else None
    bounds = [(s * n // n_shards, (s + 1) * n // n_shards) for s in range(n_shards)]
    for s, (a, b) in enumerate(bounds):
        shard = build_shard(vectors(b - a, centers, rng), np.arange(a, b), spec, trained=trained)
        save_index(shard, layout.store.uri_of(layout.faiss_path(s)), opts)
    return IndexInfo(root, "bench", bounds, metric, dim, n, n, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedder", choices=["clip", "pixels"], default="clip")
    ap.add_argument("--n", type=int, default=400_000, help="indexed training images")
    ap.add_argument("--shards", type=int, default=4, help="index shards (index.shards)")
    ap.add_argument("--index", choices=["flat", "ivfpq"], default="flat", help="index.kind (its other defaults)")
    ap.add_argument("--units", type=int, default=6, help="samples shards to match")
    ap.add_argument("--shard-size", type=int, default=64, help="generations per samples shard (sampling.shard_size)")
    ap.add_argument("--k", type=int, default=10, help="neighbours per generation (match.k)")
    ap.add_argument("--s3", action="store_true", help="the index on moto S3 at 127.0.0.1 (not local disk)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats (plain, memex, then memex, plain...)")
    a = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from bench_scale import Peaks

    from memex import runner
    from memex.config import AuditConfig, EmbedderConfig, IndexConfig, IndexKind, ResourcesConfig, StorageConfig
    from memex.embed import make_embedder
    from memex.stages.nearest import Neighbours

    rng = np.random.default_rng(0)
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        root, opts = str(Path(tmp) / "_index"), {}
        if a.s3:
            import logging

            import boto3
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            url = "http://%s:%d" % server.get_host_and_port()
            boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                         aws_secret_access_key="testing").create_bucket(Bucket="bench")
            opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": url,
                                                                             "region_name": "us-east-1"}}
            root = "s3://bench/_index"
        if a.embedder == "clip":
            build_clip(Path(tmp) / "clip")
            emb = EmbedderConfig("clip", path=str(Path(tmp) / "clip"), size=224)
        else:
            emb = EmbedderConfig("pixels", size=16)
        probe = make_embedder(emb)
        idx = IndexConfig(kind=IndexKind(a.index), shards=a.shards)
        t0 = time.perf_counter()
        info = write_index(root, opts, a.n, probe.dim, probe.metric, a.shards, idx, rng)
        files = info.layout(opts)
        size = sum(files.store.fs.size(files.faiss_path(s)) for s in range(a.shards))
        print(f"index: {a.n:,} x {probe.dim}-d {a.index} ({probe.metric}), {a.shards} shards, "
              f"{size / 2**20:,.0f} MiB of files, written in {time.perf_counter() - t0:.1f} s "
              f"to {'moto S3' if a.s3 else 'local disk'}", flush=True)
        units = [smooth_pngs(a.shard_size, 512, rng) for _ in range(a.units)]
        cfg = AuditConfig(embedder=emb, index=idx, storage=StorageConfig(root=str(Path(tmp) / "runs"), options=opts),
                          resources=ResourcesConfig(num_cpus=2))
        runner.init(cfg.resources)
        runner.call_all(plain_embed, [{"images": units[0][:1], "emb": emb, "device": "cpu",
                                       "preprocess": "center_crop", "storage_options": opts}],
                        cfg.resources)  # warm-up: a worker with torch and transformers imported, for both sides

        peaks = Peaks()
        peaks.start()
        results: dict = {}
        seconds: dict[str, list[float]] = {"plain": [], "memex": []}
        firsts: dict[str, list[float]] = {"plain": [], "memex": []}
        laters: dict[str, list[float]] = {"plain": [], "memex": []}
        for r in range(a.repeats):  # alternating: neither side always runs on the warmer machine
            for side in (("plain", "memex") if r % 2 == 0 else ("memex", "plain")):
                peaks.stage = side
                results[side], per_unit = [], []
                t0 = time.perf_counter()
                nearest = Neighbours(cfg, info)  # a fresh one each repeat: its start-up counts every time
                for u in units:
                    t1 = time.perf_counter()
                    results[side].append(plain_unit(cfg, info, u, a.k) if side == "plain" else nearest(u, a.k))
                    per_unit.append(time.perf_counter() - t1)
                nearest.close()
                seconds[side].append(time.perf_counter() - t0)
                firsts[side].append(per_unit[0])
                laters[side].append(statistics.median(per_unit[1:] or per_unit))
                print(f"repeat {r + 1}, {side}: {a.units} units in {seconds[side][-1]:.1f} s", flush=True)
                peaks.stage = "idle"
                time.sleep(1.0)  # the sampler sees each side's workers before the next starts
        peaks.stop.set()
        peaks.join()
        if server is not None:
            server.stop()

    for (Dp, Ip), (Dm, Im) in zip(results["plain"], results["memex"]):
        assert np.array_equal(Ip, Im) and np.allclose(Dp, Dm, atol=1e-5), "the two sides disagree"
    p, m = peaks.peaks["plain"], peaks.peaks["memex"]
    print(f"\nmatch search: {a.units} units x {a.shard_size} generations (512x512 PNG), k={a.k}, "
          f"{a.embedder} embedder, {a.n:,}-image {a.index} index in {a.shards} shards on "
          f"{'moto S3' if a.s3 else 'local disk'}, local Ray, num_cpus=2; the same ids on both sides")
    print(f"(medians of {a.repeats} alternating repeats, min-max in brackets; first unit: memex's includes starting "
          "its actor and loading the embedder and index; later: the median of the other units)")
    print(f"{'':8}{'total s':>20}{'first unit s':>14}{'later s / unit':>16}{'largest worker MiB':>20}"
          f"{'all workers MiB':>17}")
    med = {side: {name: statistics.median(v[side]) for name, v in (("total", seconds), ("first", firsts),
                                                                   ("later", laters))} for side in seconds}
    for side, pk in (("plain", p), ("memex", m)):
        spread = f"{med[side]['total']:.1f} [{min(seconds[side]):.1f}-{max(seconds[side]):.1f}]"
        print(f"{side:8}{spread:>20}{med[side]['first']:>14.2f}{med[side]['later']:>16.2f}{pk['worker_max']:>20.0f}"
              f"{pk['workers_total']:>17.0f}")
    print(f"memex / plain: {med['plain']['total'] / med['memex']['total']:.2f}x faster in all, "
          f"{med['plain']['later'] / med['memex']['later']:.2f}x a unit after the first; largest worker "
          f"{m['worker_max'] / p['worker_max']:.2f}x, all workers {m['workers_total'] / p['workers_total']:.2f}x "
          "the memory")


if __name__ == "__main__":
    main()
