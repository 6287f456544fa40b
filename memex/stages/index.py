"""Index stage: training set -> S FAISS shards on storage (+ near-duplicate counts), one Ray task per shard.

Driver (`build`):
  1. list the training set (memex/ingest.py) and hash the listing, embedder and index settings
     into the index key: audits of many checkpoints trained on the same data share one index;
  2. write train.parquet (gid = row number, the global id every shard and every match uses);
  3. one Ray task per shard without a marker: decode its gid range (unreadable images go to the
     shard's quarantine table), embed, build the FAISS shard, write shard + vectors + marker;
  4. one Ray task per shard: near-duplicate counts of its images, searched in all shards (the
     same index the match stage uses), which rank "most duplicated captions first" prompts.
Why plain Ray tasks and not Ray Data here: a shard is one index file named by its number with a
completion marker, so reruns skip finished shards; the work per shard is one function call.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memex.config import AuditConfig, plain, EmbedderConfig, IndexConfig, IndexKind
from memex.models import resolve_device
from memex.layout import DUPS_SCHEMA, QUARANTINE_SCHEMA, TRAIN_SCHEMA, IndexLayout, StorageError

log = logging.getLogger("memex.index")


@dataclass
class IndexInfo:
    """What later stages need to use a built index (also stored as index.json)."""

    root: str
    key: str
    shards: list[tuple[int, int]]  # gid range [start, stop) per shard
    metric: str  # "l2" (faiss returns squared distances) or "ip"
    dim: int
    n_train: int
    n_indexed: int
    n_quarantined: int

    def layout(self, storage_options: dict) -> IndexLayout:
        return IndexLayout(self.root, self.key, storage_options)


def _embedder_spec(e: EmbedderConfig, device: str):
    from memex.embed import EmbedderSpec

    return EmbedderSpec(kind=e.kind.value, path=e.path, size=e.size, device=device, batch_size=e.batch_size)


def _index_spec(i: IndexConfig, metric: str):
    from memex.index import IndexSpec

    return IndexSpec.from_config(i, metric)


def index_key(listing: pa.Table, cfg: AuditConfig) -> str:
    """Hash of what decides the index content: the listing (ids, bytes/uris), embedder, index settings."""
    h = hashlib.sha256()
    for col in ("id", "uri", "caption"):
        h.update(json.dumps(listing[col].to_pylist()).encode())
    for b in listing["image"].to_pylist():  # bytes hash: a changed image changes the key
        h.update(hashlib.sha256(b or b"").digest())
    h.update(json.dumps({"embedder": plain(cfg.embedder), "index": plain(cfg.index)}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def plan_index_shards(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous gid ranges of near-equal size (at least one row each)."""
    shards = max(1, min(shards, n))
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


# ---- Ray task bodies (plain functions: testable without a cluster) ------------------------
def _embed_rows(rows: pa.Table, emb: EmbedderConfig, embedder, batch: int, storage_options: dict):
    """Decode and embed rows `batch` at a time -> (vectors (n, d), gids (n,), quarantine tables)."""
    from memex.ingest import decode_rows

    vecs, gids, quarantine = [], [], []
    for b in range(0, rows.num_rows, batch):  # bounded memory: `batch` decoded images at a time
        part = rows.slice(b, batch)
        dec = decode_rows(part, emb.size, storage_options)
        quarantine.append(dec.quarantine)
        if dec.ids:
            gid_of = dict(zip(part["id"].to_pylist(), part["gid"].to_pylist()))
            vecs.append(embedder(dec.images))
            gids.extend(gid_of[i] for i in dec.ids)
    x = np.concatenate(vecs) if vecs else np.zeros((0, embedder.dim), np.float32)
    return x, np.asarray(gids, np.int64), quarantine


def train_task(root: str, key: str, storage_options: dict, n_train: int, emb: EmbedderConfig, idx: IndexConfig,
               device: str) -> str:
    """IVF-PQ only: train one coarse quantizer + PQ codebook on a fixed random sample of the whole
    training set, so every shard shares it (memex/index.py train_index). Writes trained.faiss."""
    from memex.embed import make_embedder
    from memex.index import save_index, train_index

    layout = IndexLayout(root, key, storage_options)
    path = layout.join("trained.faiss")
    if layout.fs.exists(path):
        return path
    embedder = make_embedder(_embedder_spec(emb, resolve_device(device)))
    spec = _index_spec(idx, embedder.metric)
    pick = np.sort(np.random.default_rng(0).choice(n_train, min(n_train, spec.train_size), replace=False))
    rows = layout.read_table(layout.train_path, TRAIN_SCHEMA, filters=[("gid", "in", pick.tolist())])
    x, _, _ = _embed_rows(rows, emb, embedder, idx.decode_batch, storage_options)
    save_index(train_index(x, spec), layout.uri_of(path), storage_options)
    return path


def build_shard_task(root: str, key: str, storage_options: dict, shard: int, start: int, stop: int,
                     emb: EmbedderConfig, idx: IndexConfig, device: str) -> dict:
    from memex.embed import make_embedder
    from memex.index import build_shard, load_index, save_index

    layout = IndexLayout(root, key, storage_options)
    if layout.fs.exists(layout.marker("shard", shard)):
        return layout.read_json(layout.marker("shard", shard))
    t0 = time.perf_counter()
    embedder = make_embedder(_embedder_spec(emb, resolve_device(device)))
    rows = layout.read_table(layout.train_path, TRAIN_SCHEMA, filters=[("gid", ">=", start), ("gid", "<", stop)])
    x, ids, quarantine = _embed_rows(rows, emb, embedder, idx.decode_batch, storage_options)
    dim = embedder.dim
    trained = None
    if idx.kind == IndexKind.ivfpq:
        trained = load_index(layout.uri_of(layout.join("trained.faiss")), storage_options)
    index = build_shard(x, ids, _index_spec(idx, embedder.metric), trained=trained)
    save_index(index, layout.uri_of(layout.faiss_path(shard)), storage_options)
    buf = io.BytesIO()
    np.savez(buf, vectors=x, gids=ids)
    layout.write_bytes(layout.emb_path(shard), buf.getvalue())
    q = pa.concat_tables([t.cast(QUARANTINE_SCHEMA) for t in quarantine]) if quarantine else QUARANTINE_SCHEMA.empty_table()
    layout.write_table(layout.quarantine_path(shard), q)
    meta = {"shard": shard, "start": start, "stop": stop, "indexed": int(len(ids)), "quarantined": q.num_rows,
            "dim": dim, "metric": embedder.metric, "seconds": round(time.perf_counter() - t0, 2)}
    layout.write_json(layout.marker("shard", shard), meta)
    return meta


def load_shards(layout: IndexLayout, shards: list[int], storage_options: dict) -> list:
    from memex.index import load_index

    return [load_index(layout.uri_of(layout.faiss_path(s)), storage_options) for s in shards]


def search_all(indexes: list, queries: np.ndarray, k: int, idx: IndexConfig, metric: str):
    from memex.index import merge_topk, search_shard

    spec = _index_spec(idx, metric)
    return merge_topk([search_shard(ix, queries, k, spec) for ix in indexes], k, metric)


def dups_shard_task(root: str, key: str, storage_options: dict, shard: int, n_shards: int, idx: IndexConfig,
                    metric: str) -> int:
    from memex.index import duplicate_counts

    layout = IndexLayout(root, key, storage_options)
    if layout.fs.exists(layout.marker("dups", shard)):
        return shard
    with np.load(io.BytesIO(layout.read_bytes(layout.emb_path(shard)))) as z:
        x, gids = z["vectors"], z["gids"]
    indexes = load_shards(layout, list(range(n_shards)), storage_options)
    counts = duplicate_counts(lambda q, k: search_all(indexes, q, k, idx, metric), x, gids, idx.dup_threshold, metric=metric,
                              k=idx.dup_k) if len(gids) else np.zeros(0, np.int32)
    train = fetch_train_rows(layout, gids.tolist(), columns=["gid", "id", "caption"])
    meta = {g: (i, c) for g, i, c in zip(*(train[n].to_pylist() for n in ("gid", "id", "caption")))}
    table = pa.table({"gid": gids, "id": [meta[g][0] for g in gids.tolist()],
                      "caption": [meta[g][1] for g in gids.tolist()], "near_duplicates": counts.astype(np.int32)},
                     schema=DUPS_SCHEMA)
    layout.write_table(layout.dups_path(shard), table)
    layout.write_json(layout.marker("dups", shard), {"rows": table.num_rows})
    return shard


# ---- driver ------------------------------------------------------------------------------
def build(cfg: AuditConfig) -> IndexInfo:
    """Build (or reuse) the index of cfg.trainset; returns where it is and its counts."""
    import ray

    from memex.ingest import list_training_set

    opts = cfg.storage.options
    # 1. listing and key
    listing = list_training_set(cfg.trainset.path, opts, cfg.trainset.caption_column)
    key = index_key(listing, cfg)
    root = cfg.index.root or cfg.storage.root.rstrip("/") + "/_index"
    layout = IndexLayout(root, key, opts)
    done = layout.read_json(layout.join("_SUCCESS.json"))
    if done is not None:
        log.info("index %s is complete: reusing it", layout.uri)
        return IndexInfo(**{**done, "shards": [tuple(s) for s in done["shards"]]})
    layout.create()

    # 2. the training table with global ids (written once; a rerun finds it in place)
    plans = plan_index_shards(listing.num_rows, cfg.index.shards)
    if not layout.fs.exists(layout.train_path):
        train = pa.table({"gid": pa.array(np.arange(listing.num_rows), pa.int64()), "id": listing["id"],
                          "image": listing["image"], "uri": listing["uri"], "caption": listing["caption"]},
                         schema=TRAIN_SCHEMA)
        layout.write_table(layout.train_path, train, row_group_size=max(64, cfg.index.decode_batch))
        layout.write_json(layout.info_json, {"trainset": cfg.trainset.path, "embedder": plain(cfg.embedder),
                                             "index": plain(cfg.index), "shards": plans, "n_train": listing.num_rows})

    # 3. build the shards, 4. near-duplicate counts
    if not ray.is_initialized():
        ray.init(address=cfg.resources.address, log_to_driver=True)
    r = cfg.resources
    build_remote = ray.remote(num_cpus=r.num_cpus, num_gpus=r.num_gpus)(build_shard_task)
    t0 = time.perf_counter()
    if cfg.index.kind == IndexKind.ivfpq:  # one shared quantizer, trained before the shards
        ray.get(ray.remote(num_cpus=r.num_cpus, num_gpus=r.num_gpus)(train_task).remote(
            root, key, opts, listing.num_rows, cfg.embedder, cfg.index, r.device))
    metas = ray.get([build_remote.remote(root, key, opts, s, a, b, cfg.embedder, cfg.index, r.device)
                     for s, (a, b) in enumerate(plans)])
    metric = metas[0]["metric"]
    log.info("index %s: %d shards built in %.1fs", layout.uri, len(plans), time.perf_counter() - t0)
    dups_remote = ray.remote(num_cpus=r.num_cpus)(dups_shard_task)
    ray.get([dups_remote.remote(root, key, opts, s, len(plans), cfg.index, metric) for s in range(len(plans))])

    info = IndexInfo(root=root, key=key, shards=plans, metric=metric, dim=metas[0]["dim"], n_train=listing.num_rows,
                     n_indexed=sum(m["indexed"] for m in metas), n_quarantined=sum(m["quarantined"] for m in metas))
    if info.n_indexed == 0:
        raise StorageError(f"no training image of {cfg.trainset.path} could be read ({info.n_quarantined} quarantined, "
                           f"reasons in {layout.uri}/quarantine-*.parquet)")
    layout.write_json(layout.join("_SUCCESS.json"), asdict(info))
    return info


def read_quarantine(info: IndexInfo, storage_options: dict) -> pa.Table:
    layout = info.layout(storage_options)
    return pa.concat_tables([layout.read_table(layout.quarantine_path(s), QUARANTINE_SCHEMA)
                             for s in range(len(info.shards))])


def read_duplicates(info: IndexInfo, storage_options: dict) -> pa.Table:
    """Near-duplicate count per indexed training image, most duplicated first (ties: by gid)."""
    layout = info.layout(storage_options)
    t = pa.concat_tables([layout.read_table(layout.dups_path(s), DUPS_SCHEMA) for s in range(len(info.shards))])
    return t.sort_by([("near_duplicates", "descending"), ("gid", "ascending")])


def fetch_train_rows(layout: IndexLayout, gids: list[int], columns: list[str] | None = None) -> pa.Table:
    """Rows of train.parquet for the given global ids (the join of matches with training images)."""
    if not gids:
        return TRAIN_SCHEMA.empty_table().select(columns or TRAIN_SCHEMA.names)
    return pq.read_table(layout.train_path, filesystem=layout.fs, schema=TRAIN_SCHEMA, columns=columns,
                         filters=[("gid", "in", sorted(set(gids)))])

