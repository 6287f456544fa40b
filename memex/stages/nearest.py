"""Nearest training images of generations by embedding: the search of the match stage and of
triage=preview.

    with Neighbours(cfg, info) as nearest:   # nothing is loaded until the first call
        D, I = nearest(pngs, k)              # (n, k) distances and global ids, best first

One resident worker (memex/runner.py `Resident`: a Ray actor of the pool's shape, or an object in
this process with resources.executor=local) holds the embedder and every FAISS shard of the
index, loaded once per stage. Before, each unit (one samples shard) built the embedder in one Ray
task and reloaded every shard from storage in one task each, so the match stage paid the index's
size in reads for every samples shard: see bench/bench_match.py and bench/RESULTS.md for that
cost against this one. Only PNG bytes go in and (n, k) arrays come back.

Memory: the worker holds the whole index, the only one that does (the index stage's near-duplicate
count loads one shard at a time): dim x 4 bytes + an 8-byte id a training image (512-d
CLIP/SSCD: 2 KB, so 1M images = 2 GB), flat or IVF-PQ alike (IVF-PQ keeps the float vectors to
re-rank exactly: memex/index.py factory_string), where the per-unit tasks held one shard each.
"""

from __future__ import annotations

import numpy as np

from memex import runner
from memex.config import AuditConfig, EmbedderConfig, IndexConfig
from memex.images import decode, fit
from memex.membership import IndexInfo, load_shards
from memex.models import resolve_device
from memex.storage import Store


class NeighbourWorker:
    """The embedder and the index's shards, built once (Ray's batch-inference shape: load in
    `__init__`, work in `__call__`). No Ray here."""

    def __init__(self, info: IndexInfo, emb: EmbedderConfig, idx: IndexConfig, device: str, preprocess: str,
                 storage_options: dict):
        from memex.embed import make_embedder

        self.emb, self.preprocess, self.metric = emb, preprocess, info.metric
        self.embedder = make_embedder(emb, resolve_device(device), storage_options)
        self.shards = load_shards(info.layout(storage_options), list(range(len(info.shards))))
        self.spec = info.spec(idx)

    def __call__(self, images: list[bytes], k: int) -> tuple[np.ndarray, np.ndarray]:
        from memex.index import merge_topk, search_shard

        # generations are fitted to the embedder's square input like the training images were
        q = self.embedder(np.stack([fit(decode(b), self.emb.size, self.preprocess) for b in images]))
        # shard by shard, merged: the same ids and order as one flat index over all vectors
        return merge_topk([search_shard(s, q, k, self.spec) for s in self.shards], k, self.metric)


class Neighbours(runner.Resident):
    """`NeighbourWorker` for an audit's config and index, on the resources the audit asks for
    (the embedder is the one model here: on a GPU when resources.num_gpus > 0)."""

    def __init__(self, cfg: AuditConfig, info: IndexInfo, label: str = "match", store: Store | None = None):
        r = cfg.resources
        super().__init__(NeighbourWorker, {"info": info, "emb": cfg.embedder, "idx": cfg.index, "device": r.device,
                                           "preprocess": cfg.trainset.preprocess.value,
                                           "storage_options": cfg.storage.options}, r, gpu=True, label=label,
                         store=store)  # a failure's traceback: <run folder>/logs/
