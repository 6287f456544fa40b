"""Sharded FAISS membership index over training-set embeddings, stored on any fsspec filesystem.

Every training vector has a global int64 id (`gid`, its row in the index's train_rows.parquet). A shard
holds any subset of the training set under those ids (faiss IndexIDMap2 around the inner index), so
shard results carry global ids directly and merging shards needs no id bookkeeping. Shards must
partition the ids: an id added to two shards is returned twice.

Two kinds (IndexSpec.kind):
    flat   exact search (IndexFlatL2 / IndexFlatIP). Memory 4*d bytes per vector (512-d SSCD: 2 KiB,
           so 1M vectors per shard is 2 GiB); search costs n*d flops per query.
    ivfpq  IVF-PQ candidate search (nprobe of nlist inverted lists, pq_m-byte codes at 8 bits), then
           exact re-ranking of the best k*refine_k candidates against the stored float vectors
           (IndexRefineFlat), so every returned distance is exact; only recall is approximate.
           Memory is the flat memory plus pq_m*pq_nbits/8 bytes per vector: the index trades search
           time, not memory, because an audit needs exact distances to compare with thresholds.

Distances are what faiss returns: *squared* L2 for metric "l2" (smaller is closer), inner product
for "ip" (larger is closer; cosine similarity when the embedder L2-normalises, as sscd/clip do).

The stage layer runs one Ray task per shard: `train_index` once on a sample of the whole training
set (saved with `save_index`), then `build_shard(..., trained=...)` per shard, `save_index` per
shard, and `search_shard` per shard followed by `merge_topk`. `ShardedIndex` does the same in one
process (tests, benchmarks, small sets).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import faiss
import fsspec
import numpy as np

from memex.config import ConfigError, IndexConfig
from memex.storage import StorageError, Store, is_damage, unreadable

KINDS = ("flat", "ivfpq")
METRICS = ("l2", "ip")
_FAISS_METRIC = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}
TRAIN_SEED = 0  # fixed: every shard task that samples training vectors picks the same rows

SearchResult = tuple[np.ndarray, np.ndarray]  # D (q, k) float32, I (q, k) int64


class IndexSpecError(ConfigError):
    """An index setting does not fit the data (dimension, number of vectors) or is out of range."""


@dataclass
class IndexSpec(IndexConfig):
    """The `index.*` settings (memex.config.IndexConfig: kind, nlist, pq_m, pq_nbits, nprobe,
    refine_k, ...) plus what FAISS needs beyond them: the metric, which comes from the embedder
    (pixels: l2, sscd/clip: ip), and how many vectors train IVF-PQ.
    nlist: faiss advises 39..256 training vectors per list; pq_m must divide the dimension;
    training needs >= 2**pq_nbits vectors; IVF-PQ returns k*refine_k candidates, re-ranked exactly."""

    metric: str = field(kw_only=True)  # "l2" (squared L2 distances) | "ip" (inner product; cosine on unit vectors)

    def __post_init__(self) -> None:
        if self.train_size is None:  # at most this many vectors train IVF-PQ: faiss's 39 a list, and 65,536 at least
            self.train_size = max(65536, 39 * self.nlist) if isinstance(self.nlist, int) else 65536
        self.validate()

    @classmethod
    def from_config(cls, cfg: IndexConfig, metric: str) -> "IndexSpec":
        """The spec of `index.*` settings; the metric comes from the embedder (pixels: l2, sscd/clip: ip)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(IndexConfig)}, metric=metric)

    def validate(self, dim: int | None = None, n_train: int | None = None) -> None:
        """Range checks; with `dim` / `n_train`, also the checks that depend on the data."""
        if self.kind not in KINDS:
            raise IndexSpecError(f"index.kind={self.kind!r} is not one of {KINDS}: use flat for up to a few "
                                 "million vectors per shard, ivfpq beyond.")
        if self.metric not in METRICS:
            raise IndexSpecError(f"index metric {self.metric!r} is not one of {METRICS}: l2 for pixel "
                                 "embeddings, ip for L2-normalised sscd/clip embeddings.")
        for name, lo, hi in (("nlist", 1, None), ("pq_m", 1, None), ("pq_nbits", 1, 16), ("nprobe", 1, None),
                             ("refine_k", 1, None), ("train_size", 1, None)):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo or (
                    hi is not None and value > hi):
                bound = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
                raise IndexSpecError(f"index.{name}={value!r} must be {bound}.")
        if self.kind != "ivfpq":
            return
        if dim is not None and dim % self.pq_m:
            divisors = [m for m in range(1, dim + 1) if dim % m == 0]
            raise IndexSpecError(f"index.pq_m={self.pq_m} must divide the embedding dimension {dim}: "
                                 f"choose one of {divisors}.")
        if n_train is not None:
            need = max(self.nlist, 2 ** self.pq_nbits)
            if n_train < need:
                raise IndexSpecError(
                    f"IVF-PQ needs at least max(index.nlist={self.nlist}, 2**index.pq_nbits={2 ** self.pq_nbits})"
                    f" = {need} training vectors, got {n_train}: lower index.nlist / index.pq_nbits, "
                    f"use index=flat for a set this small, or train on more vectors.")
            if self.train_size < need:
                raise IndexSpecError(f"train_size={self.train_size} is below the {need} training vectors "
                                     "IVF-PQ needs (index.nlist, 2**index.pq_nbits): raise train_size.")

    def factory_string(self) -> str:
        if self.kind == "flat":
            return "IDMap2,Flat"
        # np: no polysemous training (index_factory's default for PQ), which we never use for search
        # and which is 10-20x the cost of the k-means itself. RFlat: IndexRefineFlat keeps the float
        # vectors and re-ranks the IVF-PQ candidates exactly.
        return f"IDMap2,IVF{self.nlist},PQ{self.pq_m}x{self.pq_nbits}np,RFlat"


# ---- build -----------------------------------------------------------------------------------
def _as_matrix(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise IndexSpecError(f"{name} must be a 2-D (n, d) array, got shape {x.shape}.")
    if dim is not None and x.shape[1] != dim:
        raise IndexSpecError(f"{name} have dimension {x.shape[1]} but the index has {dim}: "
                             "embed them with the embedder the index was built with.")
    return np.ascontiguousarray(x, dtype=np.float32)  # faiss takes C-contiguous float32 only


def _sample_rows(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) <= size:
        return x
    rows = np.sort(np.random.default_rng(TRAIN_SEED).choice(len(x), size, replace=False))
    return x[rows]


def train_index(train_vectors: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """An empty index with trained IVF centroids and PQ codebooks (flat: nothing to train).

    Train once on a sample of the whole training set and pass the result to every `build_shard`
    (`trained=`): all shards then share one coarse quantizer and one codebook, so their PQ
    approximations are comparable, and the k-means runs once instead of once per shard.
    At most spec.train_size rows (a fixed random sample) are used; IVF k-means over 65,536 x 512-d
    vectors into 1,024 lists is seconds to a minute on a few cores.
    """
    x = _as_matrix(train_vectors, "training vectors")
    spec.validate(dim=x.shape[1], n_train=len(x) if spec.kind == "ivfpq" else None)
    index = faiss.index_factory(x.shape[1], spec.factory_string(), _FAISS_METRIC[spec.metric])
    if spec.kind == "ivfpq":
        index.train(_sample_rows(x, spec.train_size))
    return index


def _check_matches(index: faiss.Index, spec: IndexSpec, what: str) -> None:
    if not isinstance(index, faiss.IndexIDMap2):
        raise IndexSpecError(f"{what} is a {type(index).__name__}, not an index from build_shard/train_index "
                             "(IndexIDMap2 with global ids): build it with memex.index.")
    kind = "ivfpq" if isinstance(faiss.downcast_index(index.index), faiss.IndexRefine) else "flat"
    metric = "l2" if index.metric_type == faiss.METRIC_L2 else "ip"
    if (kind, metric) != (spec.kind, spec.metric):
        raise IndexSpecError(f"{what} is a {kind}/{metric} index but the spec says {spec.kind}/{spec.metric}: "
                             "use the index settings it was built with, or rebuild it.")


def build_shard(vectors: np.ndarray, ids: np.ndarray, spec: IndexSpec, train_vectors: np.ndarray | None = None,
                trained: faiss.Index | None = None) -> faiss.Index:
    """One shard: `vectors` (n, d) float32 stored under global `ids` (n,) int64 (unique, >= 0).

    IVF-PQ training, in order of preference:
      trained         an empty trained index from `train_index` (the stage layer trains once and
                      ships it to every shard task); it is copied, not modified;
      train_vectors   train here on (a sample of) these, e.g. a sample of the whole training set:
                      every shard given the same rows trains the same quantizer (seeded k-means);
      neither         train on the shard's own vectors: fine for one shard, but each shard then
                      has its own codebook (distances stay exact after re-ranking either way).
    """
    x = _as_matrix(vectors, "training vectors")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.shape != (len(x),):
        raise IndexSpecError(f"ids must have shape ({len(x)},) like the vectors, got {ids.shape}.")
    if len(ids) and (ids.min() < 0 or len(np.unique(ids)) != len(ids)):
        raise IndexSpecError("ids must be unique non-negative global ids (-1 marks a missing result).")
    spec.validate(dim=x.shape[1])
    if trained is not None:
        _check_matches(trained, spec, "the trained index")
        if trained.d != x.shape[1] or not trained.is_trained or trained.ntotal:
            raise IndexSpecError(f"trained= must be an empty trained {x.shape[1]}-d index from train_index "
                                 f"(got d={trained.d}, trained={trained.is_trained}, ntotal={trained.ntotal}).")
        index = faiss.deserialize_index(faiss.serialize_index(trained))  # a copy: KBs to MBs when empty
    else:
        index = train_index(x if train_vectors is None else train_vectors, spec)
        if index.d != x.shape[1]:
            raise IndexSpecError(f"train_vectors have dimension {index.d} but the shard's vectors {x.shape[1]}.")
    index.add_with_ids(x, ids)
    return index


# ---- storage ---------------------------------------------------------------------------------
def save_index(index: faiss.Index, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write `index` to `uri` atomically: stream it into `_tmp-<uuid>-<name>` beside the target, then move.

    faiss.write_index streams through a PyCallbackIOWriter in 1 MiB pieces instead of
    serialize_index's one in-memory copy (a 1M x 512-d flat shard is 2 GiB). A reader never sees a
    partial file under the final name; a failed write removes its temp file (memex/storage.py).
    """
    parent = uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."
    store = Store(parent, storage_options)
    path = store.join(posixpath.basename(uri.rstrip("/")))
    try:
        with store.atomic(path) as tmp, store.fs.open(tmp, "wb") as f:
            faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
    except Exception as e:  # noqa: BLE001 - re-raised with the URI and the fix (the temp file is gone)
        raise StorageError(f"cannot write index to {uri}: {type(e).__name__}: {e}. Check the index root "
                           "(folder permissions, bucket name) and storage options (endpoint, credentials).") from e


def load_index(uri: str, storage_options: dict[str, Any] | None = None) -> faiss.Index:
    """Read an index written by `save_index` (streamed: no second copy of the file in memory)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(path):
        raise StorageError(f"no index at {uri}: build it first (index stage), or check the index root "
                           "and storage options.")
    try:
        with fs.open(path, "rb") as f:
            return faiss.read_index(faiss.PyCallbackIOReader(f.read))
    except MemoryError as e:  # a good shard too large for this process: removing it would only rebuild it
        size, n, held = fs.size(path), *_folder_size(fs, path)
        # Neither rebuild helps, so neither is advised: the match worker (memex/stages/nearest.py) loads every
        # shard into one process, so more index.shards hold the same total; and ivfpq's RFlat keeps the float
        # vectors for exact re-ranking, so an ivfpq shard is ~1.04x a flat one (20,000 x 512-d: 40.6 vs 39.2 MiB).
        raise MemoryError(
            f"reading index {uri} ({_size(size)}) ran out of memory: give the match stage a machine with "
            f"more memory. Its worker holds every shard at once, {n} .faiss file(s) of {_size(held)} in all "
            "(at least that in memory: ~2 KiB a 512-d image), in one process: with resources.executor=local the memex "
            "command itself, under Ray one actor on a node of the cluster at resources.address. memex sets no memory "
            "of its own (resources.* gives the worker CPUs and GPUs only): it has what its machine has free, so run "
            "it where more than that is free. More index.shards hold the same total, and index=ivfpq keeps the float "
            "vectors to re-rank exactly (~1.04x a flat index): neither lowers it") from e
    except Exception as e:  # noqa: BLE001 - re-raised with the URI and the fix
        if not is_damage(e):  # a storage failure (a reset, a refused read): the file is fine, retry
            raise StorageError(unreadable(f"index {uri}", e)) from e
        raise StorageError(f"cannot read index {uri}: {type(e).__name__}: {e}. The file is damaged or not "
                           "a faiss index: delete it and its marker so the index stage rebuilds it.") from e


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 // 10 else f"{n / 2**20:.1f} MiB"  # 0.0 GiB told nothing


def _folder_size(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, int]:
    """(how many .faiss files, their bytes in all) in `path`'s folder: a shard's siblings, which the match
    worker loads with it. Only for an error message: a failed listing gives the file alone."""
    try:
        found = fs.glob(posixpath.join(posixpath.dirname(path), "*.faiss"), detail=True)
        sizes = [int(info["size"]) for p, info in found.items() if not posixpath.basename(p).startswith("_tmp-")]
    except Exception:  # noqa: BLE001 - the message names the file's own size then
        sizes = []
    return (len(sizes), sum(sizes)) if sizes else (1, int(fs.size(path)))


# ---- search ----------------------------------------------------------------------------------
def _worst(metric: str) -> float:
    return np.inf if metric == "l2" else -np.inf


def search_shard(index: faiss.Index, queries: np.ndarray, k: int, spec: IndexSpec) -> SearchResult:
    """Top-k of one shard: D (q, k) float32 (squared L2 or inner product), I (q, k) int64 global ids.

    Fewer than k results (small shard, or IVF lists that hold fewer vectors) are I=-1 with
    D=+inf (l2) / -inf (ip); faiss itself reports them as +-3.4e38.
    nprobe and refine_k go in per-call search parameters, so a shared index is never mutated.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise IndexSpecError(f"k={k!r} must be a positive integer.")
    _check_matches(index, spec, "this shard")
    q = _as_matrix(queries, "queries", index.d)
    if spec.kind == "ivfpq":
        ivf = faiss.SearchParametersIVF()
        ivf.nprobe = min(spec.nprobe, faiss.extract_index_ivf(index).nlist)
        params = faiss.IndexRefineSearchParameters()
        params.k_factor = float(spec.refine_k)
        params.base_index_params = ivf  # `ivf` stays referenced until the search returns
        D, I = index.search(q, k, params=params)
    else:
        D, I = index.search(q, k)
    D[I < 0] = _worst(spec.metric)
    return D, I


def merge_topk(results: Sequence[SearchResult], k: int, metric: str) -> SearchResult:
    """Global top-k from per-shard top-k lists: the order of one flat index over all shards.

    l2: ascending distance; ip: descending similarity; ties broken by ascending global id (faiss's
    own order among exactly tied distances is unspecified, so only tie-free data compares equal).
    I=-1 entries are ignored; rows with fewer than k results are padded with I=-1, D=worst.
    One lexsort over the (q, sum of shard k) stacked arrays: no loop over queries.
    """
    if metric not in METRICS:
        raise IndexSpecError(f"metric {metric!r} is not one of {METRICS}.")
    if not results:
        raise IndexSpecError("merge_topk needs at least one shard result.")
    D = np.concatenate([np.asarray(d, dtype=np.float32) for d, _ in results], axis=1)  # (q, sum k_s)
    I = np.concatenate([np.asarray(i, dtype=np.int64) for _, i in results], axis=1)
    missing = I < 0
    primary = np.where(missing, np.inf, D if metric == "l2" else -D)  # ascending = better first
    secondary = np.where(missing, np.iinfo(np.int64).max, I)
    order = np.lexsort((secondary, primary), axis=1)[:, :k]  # last key is the primary one
    D_out = np.full((len(D), k), _worst(metric), dtype=np.float32)
    I_out = np.full((len(D), k), -1, dtype=np.int64)
    width = order.shape[1]
    D_out[:, :width] = np.take_along_axis(D, order, axis=1)
    I_out[:, :width] = np.take_along_axis(I, order, axis=1)
    D_out[I_out < 0] = _worst(metric)
    return D_out, I_out


class ShardedIndex:
    """Shards searched one after another and merged; the in-process form of the Ray index stage."""

    def __init__(self, shards: Sequence[faiss.Index], spec: IndexSpec):
        if not shards:
            raise IndexSpecError("a ShardedIndex needs at least one shard.")
        dims = {s.d for s in shards}
        if len(dims) != 1:
            raise IndexSpecError(f"shards have different dimensions {sorted(dims)}: they were built from "
                                 "different embedders; rebuild the index.")
        for i, s in enumerate(shards):
            _check_matches(s, spec, f"shard {i}")
        self.shards = list(shards)
        self.spec = spec

    @classmethod
    def build(cls, vectors: np.ndarray, n_shards: int, spec: IndexSpec,
              ids: np.ndarray | None = None) -> "ShardedIndex":
        """Split `vectors` (n, d) into n_shards contiguous shards; ids default to row numbers.

        IVF-PQ trains once, on at most spec.train_size rows of the whole set, and every shard
        copies that trained index (see `train_index`).
        """
        x = _as_matrix(vectors, "training vectors")
        ids = np.arange(len(x), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if not isinstance(n_shards, (int, np.integer)) or not 1 <= n_shards <= max(len(x), 1):
            raise IndexSpecError(f"index.shards={n_shards!r} must be between 1 and the number of vectors {len(x)}.")
        trained = train_index(x, spec) if spec.kind == "ivfpq" else None
        parts = np.array_split(np.arange(len(x)), n_shards)
        return cls([build_shard(x[p], ids[p], spec, trained=trained) for p in parts], spec)

    @property
    def d(self) -> int:
        return self.shards[0].d

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        return merge_topk([search_shard(s, queries, k, self.spec) for s in self.shards], k, self.spec.metric)

    def range_count(self, queries: np.ndarray, threshold: float, exclude: np.ndarray | None = None, *,
                    start_k: int = 128, max_results: int = 1 << 20) -> np.ndarray:
        """(q,) int64: `range_neighbors`' counts."""
        return self.range_neighbors(queries, threshold, exclude, start_k=start_k, max_results=max_results)[0]

    def range_neighbors(self, queries: np.ndarray, threshold: float, exclude: np.ndarray | None = None, *,
                        start_k: int = 128, max_results: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
        """(q,) int64 counts: how many indexed vectors lie within `threshold` of each query (l2: sqrt(D) <=
        threshold, ip: D >= threshold, as in `duplicate_counts`), not counting the global id exclude[i] (-1:
        none); and (m, 2) int64 links: the (node, root) pairs of `Components` over the edges (exclude[i], id
        found) of the queries with an id (exclude[i] >= 0), which is how `near_duplicates` joins pictures.

        flat   faiss range_search on each shard, counts summed (the shards partition the ids). Exact, and
               no dearer than a search: one scan of every shard (n*d flops per query). Results are counted
               and dropped chunk by chunk; a chunk holds as many queries as keep one shard's results near
               `max_results` entries of 12 bytes (1M: 12 MiB): the first as if each query found the whole
               largest shard, the next re-sized from the last chunk's result sizes (at most x4).
        ivfpq  top-k searches with k doubling from `start_k` until the k-th result lies beyond the threshold,
               at most ~max_results results per search. Not range_search: IndexRefine has one only since
               faiss 1.10, and its meaning changed in 1.15 (base radius * k_factor, which for inner product
               raises the bar instead of widening the candidate set), while this package takes faiss >= 1.8.
               Counts what `search` finds (recall set by nprobe, exact re-ranked distances); a query with c
               near-duplicates costs about log2(c / start_k) + 1 searches.
        """
        q = _as_matrix(queries, "queries", self.d)
        exclude = np.full(len(q), -1, np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
        if exclude.shape != (len(q),):
            raise IndexSpecError(f"exclude must have shape ({len(q)},) like the queries, got {exclude.shape}.")
        if not isinstance(start_k, (int, np.integer)) or start_k < 1 or max_results < 1:
            raise IndexSpecError(f"start_k={start_k!r} and max_results={max_results!r} must be positive integers.")
        if self.spec.kind != "flat":
            return _count_by_doubling(self.search, q, exclude, threshold, self.spec.metric, start_k, max_results)
        counts, links = np.zeros(len(q), np.int64), Components()
        # The first chunk assumes the worst, every vector of the largest shard a result of each query: near_duplicates
        # sends exactly the most duplicated images, and sized for start_k results a query, one chunk of 781 copies of
        # an image stored 6,000 times returned 4.7M results (54 MiB) for max_results=100,000. Later chunks are sized
        # from the results seen, growing at most x4 a chunk (1, 4, 16, ... queries where a shard holds max_results or
        # more): a few more scans of the shard (10 queries, 1M x 128-d: 3 calls, 1.0 s against 0.44 s for one), small
        # beside the top-k search of the 4,096-query batch that sent them.
        start, chunk = 0, max(1, max_results // max(start_k, max(s.ntotal for s in self.shards)))
        while start < len(q):
            stop = min(start + chunk, len(q))
            most = 0
            for shard in self.shards:
                found, edges, n_results = _range_count_shard(shard, q[start:stop], exclude[start:stop],
                                                             threshold, self.spec.metric)
                counts[start:stop] += found
                links.add(*edges)
                most = max(most, n_results)
            per_query = max(most / (stop - start), 1.0)
            start, chunk = stop, int(max(1, min(4 * chunk, max_results // per_query)))
        return counts, links.pairs()


# ---- near-duplicates -------------------------------------------------------------------------
# `index.dup_threshold` per metric (the embedder decides the metric: pixels -> l2, sscd/clip -> ip).
#   l2  RMS pixel difference of [0, 1] images (the pixels embedder scales by 1/sqrt(dim), so sqrt(faiss D)
#       is the RMS difference). Valid (0, 0.5]; default 0.05, about 13 of 255 grey levels: re-encoded or
#       slightly resized copies of one image.
#   ip  cosine similarity of the L2-normalised sscd / clip embeddings. Valid [0.5, 1); default 0.95:
#       near-identical copies (the same image re-encoded, resized, lightly cropped), because the count ranks
#       how often the *same* image was trained on. The published cut-offs below it find edited copies or
#       replicated content, not duplicates: SSCD's README gives 0.75 for sscd_disc_mixup (DISC2021 pairs above
#       it are copies at 90% precision), and Somepalli et al. 2023 ("Diffusion Art or Digital Forgery?") call
#       an SSCD similarity above 0.5 replication: the floor of the valid range. Below it, or a distance-like
#       value such as 0.05, nearly every pair counts and every image gets the same, maximal count.
DUP_THRESHOLDS: dict[str, tuple[float, float, float]] = {  # metric: (default, low, high)
    "l2": (0.05, 0.0, 0.5), "ip": (0.95, 0.5, 1.0)}
EMBEDDER_METRIC = {"pixels": "l2", "sscd": "ip", "clip": "ip"}  # memex/embed.py: each Embedder's `metric`


def resolve_dup_threshold(threshold: float | None, metric: str, embedder: str | None = None) -> float:
    """The near-duplicate threshold for `metric`: None -> its default (DUP_THRESHOLDS); an explicit value must
    lie in the metric's range. Raises IndexSpecError (a ConfigError) naming index.dup_threshold, the embedder
    and the range."""
    if metric not in METRICS:
        raise IndexSpecError(f"metric {metric!r} is not one of {METRICS}.")
    default, lo, hi = DUP_THRESHOLDS[metric]
    if threshold is None:
        return default
    number = isinstance(threshold, (int, float, np.integer, np.floating)) and not isinstance(threshold, bool)
    if metric == "l2":
        if number and lo < threshold <= hi:
            return float(threshold)
        who = f"embedder {embedder}" if embedder else "the pixels embedder"
        raise IndexSpecError(f"index.dup_threshold={threshold!r} does not fit {who} (metric l2): it is the RMS "
                             f"pixel difference of [0, 1] images and must be in ({lo}, {hi}]; null gives the default "
                             f"{default}.")
    if number and lo <= threshold < hi:
        return float(threshold)
    who = f"embedder {embedder}" if embedder else "the sscd/clip embedders"
    raise IndexSpecError(f"index.dup_threshold={threshold!r} does not fit {who} (metric ip): it is a cosine similarity "
                         f"(higher = closer) and must be in [{lo}, {hi}); null gives the default {default}. A small "
                         "value such as 0.05 is a distance: it would count nearly every pair as duplicates.")


def _within(D: np.ndarray, threshold: float, metric: str) -> np.ndarray:
    """l2: sqrt(D) <= threshold (faiss returns squared distances; BLAS rounding can give -1e-6 for twins);
    ip: D >= threshold. Missing results (D = +-inf) are never within."""
    return np.sqrt(np.maximum(D, 0)) <= threshold if metric == "l2" else D >= threshold


def _range_count_shard(shard: faiss.Index, q: np.ndarray, exclude: np.ndarray, threshold: float,
                       metric: str) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], int]:
    """Per-query count of one flat shard's vectors within threshold (exclude[i] not counted), the edges
    (exclude[i], id) to them for the queries with an id, and how many results faiss returned. faiss keeps
    D < radius (l2) / D > radius (ip): the radius is widened by 1e-5 (relative) and `_within` draws the exact,
    inclusive line, the one `duplicate_counts` draws on top-k results."""
    radius = float(threshold) ** 2 * (1 + 1e-5) if metric == "l2" else float(threshold) - 1e-5 * abs(float(threshold))
    lims, D, I = shard.range_search(q, radius)
    row = np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64)))
    keep = _within(D, threshold, metric) & (I >= 0) & (I != exclude[row])
    edge = keep & (exclude[row] >= 0)
    return np.bincount(row[keep], minlength=len(q)), (exclude[row[edge]], I[edge].astype(np.int64)), len(I)


def _count_by_doubling(search_fn: Callable[[np.ndarray, int], SearchResult], q: np.ndarray, exclude: np.ndarray,
                       threshold: float, metric: str, k: int, max_results: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact counts (and the links of their edges, as `ShardedIndex.range_neighbors`) from top-k searches: a
    query whose k-th result is still within the threshold is searched again with 2k, until its last result
    lies beyond it (or is missing: the index has no more to give). Each search takes max(1, max_results // k)
    queries, so results stay near max_results entries."""
    counts, links = np.zeros(len(q), np.int64), Components()
    todo = np.arange(len(q))
    while len(todo):
        again = []
        step = max(1, max_results // k)
        for start in range(0, len(todo), step):
            rows = todo[start:start + step]
            D, I = search_fn(q[rows], k)
            near = _within(D, threshold, metric) & (I >= 0)
            other = near & (I != exclude[rows, None])
            counts[rows] = other.sum(axis=1)
            links.add(*_edges(exclude[rows], I, other))
            again.append(rows[near.all(axis=1)])
        todo, k = np.concatenate(again), 2 * k
    return counts, links.pairs()


def duplicate_counts(search_fn: Callable[[np.ndarray, int], SearchResult], vectors: np.ndarray, ids: np.ndarray,
                     threshold: float | None = None, k: int = 64, batch: int = 4096, *, metric: str,
                     range_fn: Callable[[np.ndarray, float, np.ndarray], tuple] | None = None) -> np.ndarray:
    """(n,) int32 near-duplicate counts: `near_duplicates`' first half."""
    return near_duplicates(search_fn, vectors, ids, threshold, k, batch, metric=metric, range_fn=range_fn)[0]


def near_duplicates(search_fn: Callable[[np.ndarray, int], SearchResult], vectors: np.ndarray, ids: np.ndarray,
                    threshold: float | None = None, k: int = 64, batch: int = 4096, *, metric: str,
                    range_fn: Callable[[np.ndarray, float, np.ndarray], tuple] | None = None,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(counts (n,) int32, links (m, 2) int64): for each training vector, how many OTHER indexed vectors lie
    within `threshold`; and the links that join near-duplicates into pictures, `Components` pairs (node,
    root) over every edge (vector, other vector within threshold) found. Counts are not capped (exact for a
    flat index; ivfpq's are what its search finds at index.nprobe): an
    image with 1,000 copies outranks one with 63 when captions are ranked by this count. A picture is one
    image stored as several rows (LAION duplicates, re-encodings): a connected component of the edges, so
    a chain a ~ b ~ c (a !~ c) is one picture. Links of several query sets (the index's shards, each its own
    task) join with `Components` again; `pictures_of` reads one set's.

    `search_fn(queries, k) -> (D, I)` is the index's own search (e.g. ShardedIndex.search), so the counts see
    exactly what the audit's membership search sees. `threshold` (None: the metric's default, see
    DUP_THRESHOLDS; an explicit value is range-checked first) is met when
      l2: sqrt(D) <= threshold: faiss L2 indexes return *squared* distances, thresholds are plain L2;
      ip: D >= threshold (cosine similarity for normalised embeddings).
    The vector itself (I == its own id) and missing results (I == -1) do not count.

    Two passes. First a top-k search of every vector; most have their last result beyond the threshold and
    their count is read off it. The rest (k-th neighbour still within: at least k-1 near-duplicates) are
    counted exactly by `range_fn(queries, threshold, exclude_ids) -> (counts, links)`
    (ShardedIndex.range_neighbors: range search on flat shards), or without one by top-k searches with k
    doubling until the last result lies
    beyond the threshold. Cost: one top-k search per vector, plus, for the vectors with >= k-1 near-duplicates
    (the duplicated images, usually few), a range search each (flat: the price of a search) or
    log2(count / k) + 1 searches each (doubling).
    Memory: queries go `batch` at a time, batch x k x 12 bytes of results (4096 x 64: 3 MiB); the doubling
    search keeps to the same number of results; range_fn bounds its own (ShardedIndex: ~12 MiB); the links
    are at most one pair per id that has a near-duplicate, plus a buffer of 4M edges (`Components`).
    """
    threshold = resolve_dup_threshold(threshold, metric)
    if not isinstance(k, (int, np.integer)) or not isinstance(batch, (int, np.integer)) or k < 2 or batch < 1:
        raise IndexSpecError(f"k={k!r} must be >= 2 (the vector itself takes one slot) and batch={batch!r} >= 1.")
    x = _as_matrix(vectors, "training vectors")
    ids = np.asarray(ids, dtype=np.int64)
    if ids.shape != (len(x),):
        raise IndexSpecError(f"ids must have shape ({len(x)},) like the vectors, got {ids.shape}.")
    counts, links = np.zeros(len(x), dtype=np.int64), Components()
    for start in range(0, len(x), batch):
        stop = min(start + batch, len(x))
        D, I = search_fn(x[start:stop], k)
        near = _within(D, threshold, metric) & (I >= 0)
        other = near & (I != ids[start:stop, None])
        counts[start:stop] = other.sum(axis=1)
        links.add(*_edges(ids[start:stop], I, other))
        more = start + np.flatnonzero(near.all(axis=1))  # the k-th neighbour is within: there may be more
        if not len(more):
            continue
        if range_fn is not None:
            exact, more_links = (np.asarray(a) for a in range_fn(x[more], threshold, ids[more]))
            if exact.shape != (len(more),) or more_links.ndim != 2 or more_links.shape[1] != 2:
                raise IndexSpecError(f"range_fn returned shapes {exact.shape}, {more_links.shape} for "
                                     f"{len(more)} queries (want ({len(more)},) and (m, 2)).")
        else:
            exact, more_links = _count_by_doubling(search_fn, x[more], ids[more], threshold, metric, 2 * k,
                                                   batch * k)
        counts[more] = exact
        links.add(more_links[:, 0], more_links[:, 1])
    return counts.astype(np.int32), links.pairs()


def _edges(ids: np.ndarray, I: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) int64: the edges (ids[i], I[i, j]) where mask[i, j], for rows with an id (>= 0)."""
    rows, cols = np.nonzero(mask & (ids[:, None] >= 0))
    return ids[rows].astype(np.int64), I[rows, cols].astype(np.int64)


class Components:
    """Connected components of a growing set of edges between ids (union-find by scipy's
    connected_components, a well-kept C implementation, rather than a Python loop over pairs).

    Edges are buffered and folded into a forest when more than `buffer` (default 4M pairs, 64 MiB) were added
    since the last fold: a component of c ids is then c - 1 pairs (id, root), root its smallest id, whatever
    edges made it. So an image stored 10,000 times, whose copies are each other's neighbours (10^8 edges),
    costs 10,000 pairs, not 10^8. 1M edges among 333k duplicated rows (a third of a 1M-image set) fold in
    1.1 s on one core. The buffer counts the edges since the last fold, not the forest: counted with it, a
    forest past `buffer` pairs was folded again at every later add (near_duplicates adds once per 4,096-query
    batch; a 5M-pair forest: ~2 s a fold on 2 cores, 13 s with np.unique), quadratic in the batches
    (bench/bench_components.py).
    `pairs()` gives the forest: (m, 2) int64 rows (id, root) for every id linked to a
    smaller one; a root itself has no row. Forests of several sets of edges join by adding their pairs
    to one Components."""

    def __init__(self, buffer: int = 1 << 22):
        self.buffer, self._a, self._b, self._n = buffer, [], [], 0
        self._limit = buffer  # fold once _n passes it: the forest's size after the last fold + buffer

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a, np.int64).ravel(), np.asarray(b, np.int64).ravel()
        if a.shape != b.shape:
            raise IndexSpecError(f"edges need as many starts as ends, got {a.shape} and {b.shape}.")
        self._a.append(a)
        self._b.append(b)
        self._n += len(a)
        if self._n > self._limit:
            self._fold()

    def _fold(self) -> None:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        a, b = np.concatenate(self._a or [np.zeros(0, np.int64)]), np.concatenate(self._b or [np.zeros(0, np.int64)])
        nodes = np.sort(np.concatenate([a, b]))  # sorted: a component's first node is its smallest
        # sort + mask, not np.unique: numpy 2.4's unique took 0.54 s for 880k int64 ids here, the sort 0.05 s
        nodes = nodes[np.r_[True, nodes[1:] != nodes[:-1]]] if len(nodes) else nodes
        if len(nodes):
            m = len(nodes)
            graph = coo_matrix((np.ones(len(a), np.int8), (np.searchsorted(nodes, a), np.searchsorted(nodes, b))),
                               shape=(m, m))
            _, label = connected_components(graph, directed=False)
            first = np.full(label.max() + 1, m, np.int64)
            np.minimum.at(first, label, np.arange(m))
            root = nodes[first[label]]
            a, b = nodes[root != nodes], root[root != nodes]
        self._a, self._b, self._n = [a], [b], len(a)
        self._limit = len(a) + self.buffer  # each fold costs O(forest + buffer), paid once per `buffer` new edges

    def pairs(self) -> np.ndarray:
        """(m, 2) int64: (id, the smallest id of its component) for every non-root id."""
        self._fold()
        return np.stack([self._a[0], self._b[0]], axis=1)


def pictures_of(ids: np.ndarray, links: np.ndarray) -> np.ndarray:
    """(n,) int64: each id's picture, the smallest id of its component in `links` (`Components.pairs`),
    or the id itself when it has no near-duplicate."""
    ids = np.asarray(ids, np.int64)
    links = np.asarray(links, np.int64).reshape(-1, 2)
    order = np.argsort(links[:, 0])
    node, root = links[order, 0], links[order, 1]
    at = np.minimum(np.searchsorted(node, ids), max(len(node) - 1, 0))
    hit = (node[at] == ids) if len(node) else np.zeros(len(ids), bool)
    return np.where(hit, root[at] if len(node) else ids, ids)
