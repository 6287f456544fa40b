"""memex.index against independent references: one faiss flat index over everything, and numpy brute force."""

from __future__ import annotations

import posixpath
import uuid

import faiss
import fsspec
import numpy as np
import pyarrow as pa
import pytest

from memex import index as mi
from memex.config import MemexError
from memex.index import (
    DUP_THRESHOLDS,
    EMBEDDER_METRIC,
    IndexSpec,
    IndexSpecError,
    ShardedIndex,
    build_shard,
    duplicate_counts,
    load_index,
    merge_topk,
    resolve_dup_threshold,
    save_index,
    search_shard,
)
from memex.layout import StorageError


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """One OpenMP thread: on 2 shared cores, 2 spinning faiss threads run k-means 5x slower."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def uneven_shards(n: int, n_shards: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row ranges of n_shards shards of uneven sizes; with 3+ shards one has only 5 rows (< k)."""
    if n_shards == 1:
        return [np.arange(n)]
    cuts = np.sort(rng.choice(np.arange(10, n - 10), n_shards - 2, replace=False))
    cuts = np.concatenate([[5], cuts]) if n_shards > 2 else cuts
    return np.split(np.arange(n), np.sort(cuts))


def exact_knn(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in float64: (q, k) distances (squared l2 or ip) and row numbers, best first."""
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if metric == "l2":
        s = (q64**2).sum(1)[:, None] + (x64**2).sum(1)[None] - 2 * q64 @ x64.T
    else:
        s = -(q64 @ x64.T)
    rows = np.argsort(s, axis=1, kind="stable")[:, :k]
    d = np.take_along_axis(s, rows, 1)
    return (d if metric == "l2" else -d), rows


def clustered(n: int, d: int, n_centers: int, rng: np.random.Generator, spread: float = 0.3) -> np.ndarray:
    centers = rng.standard_normal((n_centers, d)) * 2
    return (centers[rng.integers(0, n_centers, n)] + spread * rng.standard_normal((n, d))).astype(np.float32)


# ---- (1) sharded flat == one flat index -----------------------------------------------------------
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("n_shards", [1, 3, 7])
def test_sharded_flat_equals_one_flat_index(metric, n_shards):
    rng = np.random.default_rng(n_shards)
    n, d, k = 5000, 32, 10
    x = rng.standard_normal((n, d)).astype(np.float32)
    gids = rng.permutation(3 * n)[:n].astype(np.int64)  # arbitrary, shuffled global ids
    q = rng.standard_normal((200, d)).astype(np.float32)
    spec = IndexSpec(kind="flat", metric=metric)

    rows = uneven_shards(n, n_shards, rng)
    assert sum(map(len, rows)) == n and len(rows) == n_shards
    sharded = ShardedIndex([build_shard(x[r], gids[r], spec) for r in rows], spec)
    D, I = sharded.search(q, k)

    ref = faiss.IndexIDMap2(faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d))
    ref.add_with_ids(x, gids)
    D_ref, I_ref = ref.search(q, k)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == I.shape == (200, k)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-4)
    # and against numpy, so a shared faiss bug could not hide
    D_np, rows_np = exact_knn(x, q, k, metric)
    np.testing.assert_array_equal(I, gids[rows_np])
    np.testing.assert_allclose(D, D_np, rtol=1e-4, atol=1e-3)


def test_small_shard_reports_missing_results():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    for metric, worst in (("l2", np.inf), ("ip", -np.inf)):
        spec = IndexSpec(kind="flat", metric=metric)
        D, I = search_shard(build_shard(x, np.array([7, 3, 9]), spec), x[:2], 5, spec)
        assert (I[:, 3:] == -1).all() and (D[:, 3:] == worst).all()
        assert sorted(I[0, :3]) == [3, 7, 9] and I[0, 0] == 7 and I[1, 0] == 3


def test_merge_topk_ties_missing_and_padding():
    # two shards, one query; distance 1.0 is tied between ids 9 and 4: ascending id first
    d1, i1 = np.array([[0.5, 1.0, 3.4e38]], np.float32), np.array([[2, 9, -1]])
    d2, i2 = np.array([[1.0, 2.0, 7.0]], np.float32), np.array([[4, 5, 6]])
    D, I = merge_topk([(d1, i1), (d2, i2)], 4, "l2")
    assert I.tolist() == [[2, 4, 9, 5]] and D.tolist() == [[0.5, 1.0, 1.0, 2.0]]
    D, I = merge_topk([(d1, i1), (d2, i2)], 4, "ip")  # descending similarity; -1 ignored
    assert I.tolist() == [[6, 5, 4, 9]] and D.tolist() == [[7.0, 2.0, 1.0, 1.0]]
    D, I = merge_topk([(d1, i1)], 4, "l2")  # fewer valid results than k: padded
    assert I.tolist() == [[2, 9, -1, -1]] and D[0, 2:].tolist() == [np.inf, np.inf]


# ---- (2) IVF-PQ with exact re-ranking -----------------------------------------------------------
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ivfpq_recall_and_exact_distances(metric):
    rng = np.random.default_rng(1)
    n, d, k = 20000, 32, 10
    x = clustered(n, d, 100, rng)
    q = x[rng.choice(n, 300, replace=False)] + 0.3 * rng.standard_normal((300, d)).astype(np.float32)
    if metric == "ip":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    # ip needs more re-ranking: a PQ inner-product estimate multiplies the code error by the whole
    # query, an L2 estimate by the query's residual only (single index: recall 0.76 at refine_k=8)
    refine_k = 8 if metric == "l2" else 16
    spec = IndexSpec(kind="ivfpq", metric=metric, nlist=64, pq_m=16, pq_nbits=6, nprobe=8, refine_k=refine_k,
                     train_size=4000)
    D_np, rows_np = exact_knn(x, q, k, metric)

    sharded = ShardedIndex.build(x, 3, spec)  # one quantizer trained on a sample of all, shared
    single = build_shard(x, np.arange(n), spec)  # trained on its own vectors
    for name, (D, I) in (("sharded", sharded.search(q, k)), ("single", search_shard(single, q, k, spec))):
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(I, rows_np)])
        assert recall >= 0.9, f"{name} recall@10 {recall:.3f}"
        assert (I >= 0).all()
        # re-ranked distances are exact distances of the returned ids, in order
        xq = x[I].astype(np.float64)  # (q, k, d)
        exact = ((xq - q[:, None]) ** 2).sum(-1) if metric == "l2" else (xq * q[:, None]).sum(-1)
        np.testing.assert_allclose(D, exact, rtol=1e-4, atol=1e-4)
        assert (np.diff(D, axis=1) >= 0).all() if metric == "l2" else (np.diff(D, axis=1) <= 0).all()
    # one trained quantizer: every shard carries the same centroids
    cents = [faiss.vector_to_array(faiss.downcast_index(faiss.extract_index_ivf(s).quantizer).codes)
             for s in sharded.shards]
    assert all(np.array_equal(cents[0], c) for c in cents[1:])


def test_ivfpq_nprobe_is_applied():
    rng = np.random.default_rng(2)
    x = clustered(6000, 16, 50, rng)
    few = IndexSpec(kind="ivfpq", metric="l2", nlist=64, pq_m=4, nprobe=1, refine_k=1)
    many = IndexSpec(kind="ivfpq", metric="l2", nlist=64, pq_m=4, nprobe=64, refine_k=8)
    shard = build_shard(x, np.arange(len(x)), few)
    q = x[:200] + 0.5 * rng.standard_normal((200, 16)).astype(np.float32)
    _, rows = exact_knn(x, q, 10, "l2")
    recall = {s.nprobe: np.mean(search_shard(shard, q, 10, s)[1] == rows) for s in (few, many)}
    assert recall[64] > recall[1] + 0.05 and recall[64] > 0.95


# ---- (3) storage ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_save_load_round_trip(kind, tmp_path):
    rng = np.random.default_rng(3)
    x = clustered(4000, 16, 20, rng)
    spec = IndexSpec(kind=kind, metric="l2", nlist=16, pq_m=4, nprobe=4)
    shard = build_shard(x, np.arange(len(x)) + 1000, spec)
    q = x[:50] + 0.1
    D, I = search_shard(shard, q, 10, spec)
    for uri in (f"memory://idx-{uuid.uuid4().hex}/sub/shard-000000.faiss", str(tmp_path / "a" / "shard.faiss")):
        save_index(shard, uri)
        back = load_index(uri)
        assert back.ntotal == len(x)
        D2, I2 = search_shard(back, q, 10, spec)
        np.testing.assert_array_equal(I2, I)
        np.testing.assert_array_equal(D2, D)
        fs, path = fsspec.core.url_to_fs(uri)
        assert [posixpath.basename(p) for p in fs.ls(posixpath.dirname(path), detail=False)] == [
            posixpath.basename(path)]  # no temp file left behind


@pytest.mark.parametrize("root", ["memory", "local"])
def test_failed_save_never_shows_a_partial_file(root, tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    spec = IndexSpec(kind="flat", metric="l2")
    old = build_shard(rng.standard_normal((100, 8)).astype(np.float32), np.arange(100), spec)
    new = build_shard(rng.standard_normal((500, 8)).astype(np.float32), np.arange(500), spec)
    uri = (f"memory://idx-{uuid.uuid4().hex}/shard.faiss" if root == "memory" else str(tmp_path / "shard.faiss"))
    fs, path = fsspec.core.url_to_fs(uri)
    save_index(old, uri)
    real_write = faiss.write_index
    blob, old_size = faiss.serialize_index(new), len(faiss.serialize_index(old))
    seen = {}

    def write_half_then_fail(index, writer):
        writer(blob[: len(blob) // 2].tobytes())  # the callback writer takes bytes
        listing = fs.ls(posixpath.dirname(path), detail=False)
        seen["tmp"] = [p for p in listing if posixpath.basename(p).startswith("_tmp-")]
        seen["final_size"] = fs.info(path)["size"]
        raise OSError("disk full")

    class Writer:  # feed the python callback directly so a half write is possible
        def __init__(self, write):
            self.write = write

        def __call__(self, data):
            return self.write(data)

    monkeypatch.setattr(mi.faiss, "PyCallbackIOWriter", Writer)
    monkeypatch.setattr(mi.faiss, "write_index", write_half_then_fail)
    with pytest.raises(StorageError, match="cannot write index .*disk full"):
        save_index(new, uri)
    monkeypatch.setattr(mi.faiss, "write_index", real_write)
    assert len(seen["tmp"]) == 1 and seen["tmp"][0].endswith("-shard.faiss")
    assert seen["final_size"] == old_size  # mid-write, the final name holds the old file, untouched
    assert load_index(uri).ntotal == 100  # still the old, complete index
    assert not [p for p in fs.ls(posixpath.dirname(path), detail=False) if "_tmp-" in p]  # cleaned up


def test_load_errors_name_the_fix(tmp_path):
    with pytest.raises(StorageError, match="no index at .*build it first"):
        load_index(str(tmp_path / "missing.faiss"))
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(StorageError, match="delete it and its marker"):
        load_index(str(tmp_path / "junk.faiss"))


def test_a_storage_or_memory_failure_is_not_called_a_damaged_file(tmp_path, monkeypatch):
    """load_index and train_rows.read_range named every failure "damaged ... delete it": a shard too
    large for the match worker's memory, or a connection reset mid-read, and the user deleted a good
    shard (or train_rows.parquet: the whole pack copied again) to meet the same error after the
    rebuild. Each is named for what it is; only a file that does not read as its format is damaged."""
    import memex.index as mi
    import memex.train_rows as tr
    from memex.layout import TRAIN_SCHEMA, IndexLayout
    from memex.train_rows import read_range, write

    uri = str(tmp_path / "shard.faiss")
    index = faiss.IndexFlatL2(4)
    index.add(np.random.default_rng(0).random((10, 4), dtype=np.float32))
    save_index(index, uri)
    real = mi.faiss.read_index

    def out_of_memory(reader):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(mi.faiss, "read_index", out_of_memory)
    with pytest.raises(MemoryError, match="ran out of memory: give the match stage a machine with more memory") as e:
        load_index(uri)
    assert "delete" not in str(e.value)

    def reset(reader):
        raise ConnectionResetError("Connection reset by peer")

    monkeypatch.setattr(mi.faiss, "read_index", reset)
    with pytest.raises(StorageError, match="ConnectionResetError.*rerun; the file was not found damaged"):
        load_index(uri)
    monkeypatch.setattr(mi.faiss, "read_index", real)
    assert load_index(uri).ntotal == 10

    layout = IndexLayout(str(tmp_path), "k")
    train = pa.table({"gid": pa.array(range(4), pa.int64()), "id": [f"i{g}" for g in range(4)],
                      "image": [b"x"] * 4, "uri": [None] * 4, "caption": ["c"] * 4}, schema=TRAIN_SCHEMA)
    write(layout.store, layout, [train], row_group_size=2)
    real_open = tr.open_table

    class Reset:
        def __init__(self, f):
            self.metadata, self.schema_arrow = f.metadata, f.schema_arrow

        def iter_batches(self, **kw):
            raise ConnectionResetError("Connection reset by peer")

    monkeypatch.setattr(tr, "open_table", lambda *a: Reset(real_open(*a)))
    with pytest.raises(ConnectionResetError):
        list(read_range(layout, 0, 4, 2))


def test_a_store_clients_own_error_or_a_failed_pack_range_is_not_called_damage(tmp_path, monkeypatch):
    """s3fs passes botocore's and aiohttp's own errors on as they are (a dropped connection, a cut stream):
    is_damage called them damage, and load_index said to delete a good FAISS shard. A range of train.pack that
    fsspec returned as a reset (its on_error="return") was "damaged: remove it and train_rows.parquet", the
    whole training set copied again for a network blip. A range that is gone or short is still damage."""
    import aiohttp
    import botocore.exceptions as be

    import memex.index as mi
    from memex import train_rows
    from memex.layout import TRAIN_SCHEMA, IndexLayout
    from memex.storage import is_damage

    store_side = [be.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
                  be.ResponseStreamingError(error="cut"), aiohttp.ClientPayloadError("cut")]
    assert not any(map(is_damage, store_side))
    assert is_damage(pa.ArrowInvalid("bad footer")) and is_damage(FileNotFoundError("x"))

    uri = str(tmp_path / "shard.faiss")
    save_index(faiss.IndexFlatL2(4), uri)

    def dropped(reader):
        raise store_side[0]

    monkeypatch.setattr(mi.faiss, "read_index", dropped)
    with pytest.raises(StorageError, match="EndpointConnectionError.*rerun; the file was not found damaged"):
        load_index(uri)

    layout = IndexLayout(str(tmp_path), "k")
    train = pa.table({"gid": pa.array(range(4), pa.int64()), "id": [f"i{g}" for g in range(4)],
                      "image": [b"abc"] * 4, "uri": [None] * 4, "caption": ["c"] * 4}, schema=TRAIN_SCHEMA)
    train_rows.write(layout.store, layout, [train], row_group_size=2)
    offset, length = np.array([0, 3]), np.array([3, 3])
    for failure, says in [(ConnectionResetError("reset by peer"), "not found damaged"),
                          (be.ResponseStreamingError(error="cut"), "not found damaged"),
                          (FileNotFoundError("gone"), "Remove it and train_rows.parquet beside it")]:
        monkeypatch.setattr(type(layout.store.fs), "cat_ranges", lambda self, p, s, e, **k: [failure])
        with pytest.raises(StorageError, match=says) as e:
            train_rows.read_pack(layout, offset, length)
        assert ("Remove it" in str(e.value)) == (says != "not found damaged")
    monkeypatch.setattr(type(layout.store.fs), "cat_ranges", lambda self, p, s, e, **k: [RuntimeError("loop")])
    with pytest.raises(RuntimeError, match="^loop$"):  # no I/O failure (fsspec's loop, a bug): raised as itself
        train_rows.read_pack(layout, offset, length)
    monkeypatch.setattr(type(layout.store.fs), "cat_ranges", lambda self, p, s, e, **k: [b"abcab"])  # short
    with pytest.raises(StorageError, match="EOFError.*Remove it and train_rows.parquet"):
        train_rows.read_pack(layout, offset, length)


# ---- (4) near-duplicate counts ------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_duplicate_counts_match_brute_force(metric):
    rng = np.random.default_rng(5)
    base = rng.standard_normal((1500, 16)).astype(np.float32)
    groups = [2, 3, 5, 8, 12]  # planted copies per base image; 8 and 12 go past k (counted exactly beyond it)
    planted = [base[i] + 0.01 * rng.standard_normal((g, 16)).astype(np.float32) for i, g in enumerate(groups)]
    x = np.concatenate([base] + planted)
    if metric == "ip":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x[rng.permutation(len(x))]
    gids = rng.permutation(len(x)).astype(np.int64) + 10
    threshold = 0.3 if metric == "l2" else 0.99
    k = 8
    spec = IndexSpec(kind="flat", metric=metric)
    rows = uneven_shards(len(x), 3, rng)
    sharded = ShardedIndex([build_shard(x[r], gids[r], spec) for r in rows], spec)
    counts = duplicate_counts(sharded.search, x, gids, threshold, k=k, batch=300, metric=metric)

    x64 = x.astype(np.float64)
    if metric == "l2":
        sq = (x64**2).sum(1)
        near = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * x64 @ x64.T, 0)) <= threshold
    else:
        near = x64 @ x64.T >= threshold
    expected = near.sum(1) - 1  # minus the vector itself; no cap at k - 1 any more
    assert counts.dtype == np.int32
    np.testing.assert_array_equal(counts, expected)
    # the planted structure is what was found: group of g copies + base -> g others each
    # group of g copies + its base: g + 1 vectors with g others each; 8 and 12 exactly, beyond k - 1 = 7
    histogram = {c: int(m) for c, m in enumerate(np.bincount(counts)) if c and m}
    assert histogram == {2: 3, 3: 4, 5: 6, 8: 9, 12: 13}


def planted_groups(metric: str, rng: np.random.Generator, sizes=(10, 100, 300), singles: int = 400):
    """Groups of g near-identical copies of one image each, plus `singles` unrelated images, shuffled.

    l2: pixel-like vectors as the pixels embedder makes them (3x8x8 images in [0, 1], scaled by 1/sqrt(dim),
    so sqrt(D) is the RMS pixel difference): copies differ by ~0.007 RMS, unrelated images by ~0.4.
    ip: unit vectors: copies have cosine ~0.99, unrelated ones below ~0.6.
    Returns vectors, the group size of each row (1 for singles) and its caption."""
    d = 192 if metric == "l2" else 64
    bases = rng.random((len(sizes) + singles, d)) if metric == "l2" else rng.standard_normal((len(sizes) + singles, d))
    parts, size, caption = [], [], []
    for b, g in enumerate(sizes):
        noise = (0.005 if metric == "l2" else 0.01) * rng.standard_normal((g, d))
        parts.append(np.clip(bases[b] + noise, 0, 1) if metric == "l2" else bases[b] + noise)
        size += [g] * g
        caption += [f"copy of image {g}"] * g
    parts.append(bases[len(sizes):])
    size += [1] * singles
    caption += [f"image {i}" for i in range(singles)]
    x = np.concatenate(parts)
    x = x / np.sqrt(d) if metric == "l2" else x / np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(len(x))
    return x[order].astype(np.float32), np.asarray(size)[order], [caption[i] for i in order]


@pytest.mark.parametrize("n_shards", [1, 3])
@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_duplicate_counts_are_exact_beyond_k(metric, kind, n_shards):
    """Groups of 10, 100 and 300 copies: every member counts the g - 1 others exactly (299 > dup_k = 64),
    at the embedder's default threshold (pixels: RMS 0.05, sscd/clip: cosine 0.95), and the 300-copy
    image ranks first (capped at 63, it would tie with the 100-copy one and lose on caption order)."""
    import pyarrow as pa

    from memex.prompts import rank_by_near_duplicates

    rng = np.random.default_rng(11)
    x, size, caption = planted_groups(metric, rng)
    gids = rng.permutation(len(x)).astype(np.int64) + 100
    spec = IndexSpec(kind=kind, metric=metric, nlist=16, pq_m=8, nprobe=8, refine_k=4)
    index = ShardedIndex.build(x, n_shards, spec, ids=gids)
    counts = duplicate_counts(index.search, x, gids, None, k=64, batch=256, metric=metric,
                              range_fn=index.range_neighbors)
    assert counts.dtype == np.int32
    np.testing.assert_array_equal(counts, size - 1)
    assert sorted(set(counts.tolist())) == [0, 9, 99, 299]
    # without a range counter: top-k searches with doubling k give the same exact counts
    np.testing.assert_array_equal(duplicate_counts(index.search, x, gids, None, k=64, metric=metric), size - 1)
    # results bounded to a handful per search: chunks of one query (flat), doubling 8 rows at a time (ivfpq)
    some = np.flatnonzero(size > 1)[:40]
    np.testing.assert_array_equal(index.range_count(x[some], DUP_THRESHOLDS[metric][0], gids[some], start_k=4,
                                                    max_results=32), size[some] - 1)
    # each row's picture is its group's smallest gid (a single is its own picture), by either route
    from memex.index import near_duplicates, pictures_of

    expected = {}
    for g, c in zip(gids.tolist(), caption):
        expected[c] = min(expected.get(c, g), g)
    want = np.array([expected[c] for c in caption])
    for kw in ({"range_fn": index.range_neighbors}, {}):
        _, links = near_duplicates(index.search, x, gids, None, k=64, batch=256, metric=metric, **kw)
        np.testing.assert_array_equal(pictures_of(gids, links), want)
    # the planted image with the most copies is the first prompt
    dups = pa.table({"caption": caption, "near_duplicates": counts})
    assert rank_by_near_duplicates(dups, 3)["prompt"].to_pylist() == [
        "copy of image 300", "copy of image 100", "copy of image 10"]


@pytest.mark.parametrize("ranged", [True, False])
def test_a_chain_of_near_duplicates_is_one_picture(ranged):
    """Pictures are connected components of the near-duplicate edges, as brute force finds them: rows
    spaced 0.8 x threshold along a line (a ~ b ~ c, a !~ c) are one picture, however the gids interleave
    the chains and however the rows split into shards, each shard's query set linked on its own (the
    index stage's tasks) and joined afterwards. A row's smallest direct neighbour, the rule before this
    one, split every such chain. k=2 sends the rows with 2+ neighbours through the range counts (or the
    doubling top-k searches), and a 16-edge buffer folds the forest many times."""
    from scipy.sparse.csgraph import connected_components

    from memex.index import Components, near_duplicates, pictures_of

    rng = np.random.default_rng(3)
    t, d = 0.05, 16
    rows = []
    for length in (2, 5, 12, 30):  # chains
        start, step = rng.normal(size=d), rng.normal(size=d)
        step *= 0.8 * t / np.linalg.norm(step)
        rows += [start + i * step for i in range(length)]
    rows += list(rng.normal(size=(60, d)))  # singles, far apart (typical distance ~5.6)
    x = np.asarray(rows, np.float32)
    gids = rng.permutation(len(x)).astype(np.int64) * 3 + 7  # ids are not row numbers
    truth_d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    _, label = connected_components(truth_d <= t, directed=False)
    want = np.array([gids[label == label[i]].min() for i in range(len(x))])
    index = ShardedIndex.build(x, 3, IndexSpec(kind="flat", metric="l2"), ids=gids)
    joined = Components(buffer=16)
    for part in np.array_split(rng.permutation(len(x)), 4):  # the index stage: one task per shard
        counts, links = near_duplicates(index.search, x[part], gids[part], t, k=2, batch=7, metric="l2",
                                        range_fn=index.range_neighbors if ranged else None)
        np.testing.assert_array_equal(counts, (truth_d[part] <= t).sum(1) - 1)
        joined.add(links[:, 0], links[:, 1])
    np.testing.assert_array_equal(pictures_of(gids, joined.pairs()), want)
    assert len(set(want)) == 4 + 60  # each chain is one picture


def test_dup_threshold_defaults_and_ranges():
    from memex.embed import CLIPEmbedder, PixelEmbedder, SSCDEmbedder

    assert EMBEDDER_METRIC == {"pixels": PixelEmbedder.metric, "sscd": SSCDEmbedder.metric,
                               "clip": CLIPEmbedder.metric}
    assert [resolve_dup_threshold(None, EMBEDDER_METRIC[e], e) for e in ("pixels", "sscd", "clip")] == [
        0.05, 0.95, 0.95]
    assert resolve_dup_threshold(0.5, "l2") == 0.5 and resolve_dup_threshold(0.5, "ip") == 0.5
    for value, metric, message in [
        (0.05, "ip", r"index.dup_threshold=0.05 does not fit embedder clip \(metric ip\).*cosine similarity.*"
                     r"\[0.5, 1.0\)"),
        (1.0, "ip", r"\[0.5, 1.0\)"), (0.49, "ip", r"\[0.5, 1.0\)"),
        (0.0, "l2", r"index.dup_threshold=0.0 does not fit embedder clip \(metric l2\).*RMS.*\(0.0, 0.5\]"),
        (0.9, "l2", r"\(0.0, 0.5\]"), ("0.1", "l2", r"\(0.0, 0.5\]"), (True, "l2", r"\(0.0, 0.5\]"),
    ]:
        with pytest.raises(IndexSpecError, match=message) as e:
            resolve_dup_threshold(value, metric, "clip")
        assert isinstance(e.value, MemexError)
    # the library function checks its own inputs before searching anything
    spec = IndexSpec(kind="flat", metric="ip")
    x = np.eye(4, dtype=np.float32)
    index = ShardedIndex([build_shard(x, np.arange(4), spec)], spec)
    with pytest.raises(IndexSpecError, match="the sscd/clip embedders"):
        duplicate_counts(index.search, x, np.arange(4), 0.05, metric="ip")
    with pytest.raises(IndexSpecError, match="k=1 must be >= 2"):
        duplicate_counts(index.search, x, np.arange(4), None, k=1, metric="ip")
    assert duplicate_counts(index.search, x, np.arange(4), None, k=2, metric="ip").tolist() == [0, 0, 0, 0]


# ---- (5) bad specs --------------------------------------------------------------------------------
def test_bad_specs_raise_with_the_fix():
    x = np.random.default_rng(6).standard_normal((500, 24)).astype(np.float32)
    ids = np.arange(500)
    cases = [
        (lambda: IndexSpec(kind="hnsw", metric="l2"), "index.kind='hnsw' is not one of"),
        (lambda: IndexSpec(kind="flat", metric="cosine"), "metric 'cosine' is not one of"),
        (lambda: IndexSpec(kind="ivfpq", metric="l2", nprobe=0), r"index.nprobe=0 must be an integer >= 1"),
        (lambda: IndexSpec(kind="ivfpq", metric="l2", pq_nbits=20), r"index.pq_nbits=20 must be .* \[1, 16\]"),
        (lambda: build_shard(x, ids, IndexSpec(kind="ivfpq", metric="l2", pq_m=5, nlist=8)),
         r"pq_m=5 must divide the embedding dimension 24: choose one of \[1, 2, 3, 4, 6, 8, 12, 24\]"),
        (lambda: build_shard(x, ids, IndexSpec(kind="ivfpq", metric="l2", pq_m=4, nlist=1024)),
         "at least max.*= 1024 training vectors, got 500: lower index.nlist"),
        (lambda: build_shard(x, ids, IndexSpec(kind="ivfpq", metric="l2", pq_m=4, nlist=8, pq_nbits=10)),
         r"2\*\*index.pq_nbits=1024\) = 1024 training vectors"),
        (lambda: build_shard(x, ids, IndexSpec(kind="ivfpq", metric="l2", pq_m=4, nlist=8, train_size=100)),
         "train_size=100 is below the 256"),
        (lambda: build_shard(x, np.zeros(500), IndexSpec(kind="flat", metric="l2")), "ids must be unique"),
        (lambda: build_shard(x, ids[:10], IndexSpec(kind="flat", metric="l2")), r"ids must have shape \(500,\)"),
        (lambda: ShardedIndex.build(x, 0, IndexSpec(kind="flat", metric="l2")), "index.shards=0 must be"),
    ]
    for make, message in cases:
        with pytest.raises(IndexSpecError, match=message) as e:
            make()
        assert isinstance(e.value, MemexError) and isinstance(e.value, ValueError)

    flat = build_shard(x, ids, IndexSpec(kind="flat", metric="l2"))
    with pytest.raises(IndexSpecError, match="queries have dimension 16 but the index has 24"):
        search_shard(flat, x[:3, :16], 5, IndexSpec(kind="flat", metric="l2"))
    with pytest.raises(IndexSpecError, match="this shard is a flat/l2 index but the spec says flat/ip"):
        search_shard(flat, x[:3], 5, IndexSpec(kind="flat", metric="ip"))
    with pytest.raises(IndexSpecError, match="not an index from build_shard"):
        search_shard(faiss.IndexFlatL2(24), x[:3], 5, IndexSpec(kind="flat", metric="l2"))


def test_spec_from_config():
    from memex.config import IndexConfig, IndexKind

    spec = IndexSpec.from_config(IndexConfig(kind=IndexKind.ivfpq, nlist=256, pq_m=8, nprobe=16, refine_k=2), "ip")
    assert (spec.kind, spec.metric, spec.nlist, spec.pq_m, spec.pq_nbits, spec.nprobe, spec.refine_k) == (
        "ivfpq", "ip", 256, 8, 8, 16, 2)
    assert spec.factory_string() == "IDMap2,IVF256,PQ8x8np,RFlat"


def test_duplicate_counts_through_the_pixels_embedder():
    """The same planted groups as images, embedded by the real pixels embedder (what `memex audit`
    uses by default): JPEG-like noise of +-3/255 on copies of 10, 100 and 300 pictures, plus 200
    unrelated ones. Every copy counts its group's other members, beyond dup_k = 64, and each row's
    picture is its group's smallest id."""
    from memex.config import EmbedderConfig
    from memex.embed import make_embedder
    from memex.index import near_duplicates, pictures_of

    rng = np.random.default_rng(5)
    bases = [np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((8, 8, 1))) for _ in range(3 + 200)]
    images, group = [], []
    for b, g in enumerate((10, 100, 300)):
        for _ in range(g):
            images.append(np.clip(bases[b] + rng.integers(-3, 4, bases[b].shape), 0, 255))
            group.append(b)
    images += bases[3:]
    group += list(range(3, 203))
    x = make_embedder(EmbedderConfig(kind="pixels", size=32))(np.stack(images).astype(np.uint8))
    gids = np.arange(len(x), dtype=np.int64)
    index = ShardedIndex.build(x, 3, IndexSpec(kind="flat", metric="l2"), ids=gids)
    counts, links = near_duplicates(index.search, x, gids, None, k=64, metric="l2", range_fn=index.range_neighbors)
    pictures = pictures_of(gids, links)
    size = np.bincount(group)[group]
    np.testing.assert_array_equal(counts, size - 1)  # 9, 99, 299 for the copies, 0 for the rest
    first = {}
    for i, gr in enumerate(group):
        first.setdefault(gr, i)
    np.testing.assert_array_equal(pictures, [first[gr] for gr in group])


@pytest.mark.parametrize("stored", ["pack", "inline"])
def test_a_shard_reads_its_training_rows_a_batch_at_a_time(tmp_path, stored):
    """read_range: the rows of a gid range (and of a sample of gids, the quantizer's) a batch at a
    time, from the row groups that reach it: the same rows as one filtered read of train.parquet,
    no table over `batch` rows; rows out of gid order in the file are found by their gid; a
    truncated table (or train.pack) is named with its recovery. Both layouts: train_rows.parquet and
    its images in train.pack, and train.parquet with its images inline (an index built before the pack)."""
    from memex.layout import TRAIN_SCHEMA, IndexLayout
    from memex.storage import StorageError
    from memex.train_rows import read_range, write

    layout = IndexLayout(str(tmp_path), "k")
    n = 50
    order = np.r_[0:20, 35:50, 20:35]  # one stretch written late: its row groups' statistics say so
    train = pa.table({"gid": pa.array(order, pa.int64()), "id": [f"i{g}" for g in order],
                      "image": [bytes([g]) * 100 for g in order], "uri": [None] * n,
                      "caption": [f"c{g}" for g in order]}, schema=TRAIN_SCHEMA)
    if stored == "pack":
        write(layout.store, layout, [train.slice(0, 17), train.slice(17)], row_group_size=8)
    else:
        layout.store.write_table(layout.inline_train_path, train, row_group_size=8)
    assert (tmp_path / "k" / "train.pack").exists() == (stored == "pack")
    for start, stop, gids in ((0, n, None), (5, 17, None), (18, 40, None), (0, 1, None),
                              (3, 48, np.array([3, 9, 21, 22, 36, 47]))):
        got = list(read_range(layout, start, stop, 3, gids=gids))
        assert got and all(0 < t.num_rows <= 3 and t.schema == TRAIN_SCHEMA for t in got)
        want = [g for g in order if start <= g < stop and (gids is None or g in gids)]
        assert pa.concat_tables(got)["gid"].to_pylist() == want
        assert pa.concat_tables(got)["image"].to_pylist() == [bytes([g]) * 100 for g in want]
    if stored == "pack":
        raw = (tmp_path / "k" / "train.pack").read_bytes()
        (tmp_path / "k" / "train.pack").write_bytes(raw[:-150])
        with pytest.raises(StorageError, match=r"train.pack is not readable image pack .*EOFError.*Remove it and "
                                               r"train_rows.parquet beside it"):
            list(read_range(layout, 0, n, 3))
    table = tmp_path / "k" / ("train_rows.parquet" if stored == "pack" else "train.parquet")
    raw = table.read_bytes()
    table.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StorageError, match=rf"{table.name} is not readable Parquet .*Remove it"):
        list(read_range(layout, 0, n, 3))


def test_training_images_are_fetched_by_gid_with_ranged_reads(tmp_path, monkeypatch):
    """The match stage's fetch of scattered neighbours reads each image's bytes from train.pack, not the
    row groups that hold them (with the images in train.parquet, pyarrow read a whole row group's
    image column for one row: 20 MB of 512 LAION images for one ~40 KB neighbour). Ranges within
    PACK_GAP are one request, none longer than PACK_SPAN; rows without stored bytes (read from
    their uri) and empty images come back as they were written; no image asked, none read."""
    from memex import train_rows
    from memex.layout import TRAIN_SCHEMA, IndexLayout
    from memex.membership import fetch_train_rows

    rng = np.random.default_rng(0)
    n = 400
    images = [rng.bytes(int(rng.integers(1000, 3000))) for _ in range(n)]
    images[7], images[8] = None, b""  # an image read from its uri; an empty one (quarantined when decoded)
    train = pa.table({"gid": pa.array(np.arange(n), pa.int64()), "id": [f"i{g}" for g in range(n)],
                      "image": pa.array(images, pa.binary()), "uri": ["u7" if g == 7 else None for g in range(n)],
                      "caption": [f"c{g}" for g in range(n)]}, schema=TRAIN_SCHEMA)
    layout = IndexLayout(str(tmp_path), "k")
    train_rows.write(layout.store, layout, (train.slice(a, 64) for a in range(0, n, 64)), row_group_size=64)
    assert (tmp_path / "k" / "train.pack").stat().st_size == sum(len(b or b"") for b in images)

    asked = []
    real = type(layout.store.fs).cat_ranges
    monkeypatch.setattr(type(layout.store.fs), "cat_ranges",  # (the pack's: train_rows.parquet's chunks come so too)
                        lambda self, paths, starts, ends, **k: (paths[0].endswith("train.pack") and
                                                                asked.append(list(zip(starts, ends)))) or
                        real(self, paths, starts, ends, **k))
    gids = [390, 5, 200, 201, 7, 8, 64]
    monkeypatch.setattr(train_rows, "PACK_GAP", 0)  # only touching ranges merge: 200 and 201
    got = fetch_train_rows(layout, gids)
    assert got["gid"].to_pylist() == sorted(gids) and got.schema == TRAIN_SCHEMA
    assert got["image"].to_pylist() == [images[g] for g in sorted(gids)]
    assert got["uri"].to_pylist()[1] == "u7" and got["caption"].to_pylist() == [f"c{g}" for g in sorted(gids)]
    sizes = {g: len(images[g] or b"") for g in gids}
    # 8 (empty) and 7 (no bytes stored): no request (an empty range went to S3 as bytes=N-(N-1): the whole file)
    assert len(asked[-1]) == 4 and sum(e - s for s, e in asked[-1]) == sum(sizes.values())
    assert all(s < e for s, e in asked[-1])

    monkeypatch.setattr(train_rows, "PACK_GAP", 1 << 30)  # everything one request, but for PACK_SPAN
    monkeypatch.setattr(train_rows, "PACK_SPAN", 200_000)
    assert fetch_train_rows(layout, gids).equals(got)
    assert len(asked[-1]) == 3 and all(e - s <= 200_000 for s, e in asked[-1])  # 5-64, 200-201, 390

    calls = len(asked)
    ids = fetch_train_rows(layout, gids, columns=["gid", "id"])
    assert ids.column_names == ["gid", "id"] and len(asked) == calls  # no image asked, no pack read
    assert fetch_train_rows(layout, []).num_rows == 0 and len(asked) == calls


def test_the_pack_is_written_in_place_on_s3_and_nothing_is_left_by_a_failed_copy(s3_server, bucket, monkeypatch):
    """On S3 the pack is uploaded to its own key: a temp object moved into place is a server-side copy, in
    serial 50 MiB parts over 5 GB (~4,000 requests for 5M training images). Its upload in parts is visible
    only once completed: a copy that fails midway (here after two 5 MiB parts) aborts it and leaves no
    object and no pending upload. What was written reads back through s3fs's concurrent ranged reads."""
    import boto3
    import fsspec

    from memex import train_rows
    from memex.layout import TRAIN_SCHEMA, IndexLayout
    from memex.membership import fetch_train_rows
    from memex.storage import StorageError

    opts = {**s3_server, "default_block_size": 5 << 20}  # parts of 5 MiB (S3's least), so 12 MiB makes three
    fsspec.filesystem("s3", **opts).invalidate_cache()
    rng = np.random.default_rng(1)
    n = 24
    images = [rng.bytes(512 << 10) for _ in range(n)]  # 12 MiB
    t = pa.table({"gid": pa.array(np.arange(n), pa.int64()), "id": [f"i{g}" for g in range(n)],
                  "image": images, "uri": [None] * n, "caption": [""] * n}, schema=TRAIN_SCHEMA)
    layout = IndexLayout(f"s3://{bucket}/idx", "k", opts)
    moved = []
    real = type(layout.store.fs).mv
    monkeypatch.setattr(type(layout.store.fs), "mv", lambda self, a, b, **k: moved.append(b) or real(self, a, b, **k))
    train_rows.write(layout.store, layout, [t.slice(0, 10), t.slice(10)], row_group_size=8)
    assert [p.rsplit("/", 1)[1] for p in moved] == ["train_rows.parquet"]  # the pack was not moved
    assert fetch_train_rows(layout, [20, 3, 11])["image"].to_pylist() == [images[3], images[11], images[20]]

    def failing():
        yield t.slice(0, 20)
        raise OSError("the manifest's bucket went away")

    broken = IndexLayout(f"s3://{bucket}/idx", "broken", opts)
    with pytest.raises(StorageError, match="cannot write .*went away"):  # (atomic() names the table's path)
        train_rows.write(broken.store, broken, failing(), row_group_size=8)
    client = boto3.client("s3", endpoint_url=s3_server["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="idx/broken").get("Contents", [])]
    assert keys == [] and not client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_a_pack_upload_on_s3_grows_its_parts_past_the_10000_part_limit(s3_server, bucket, monkeypatch):
    """S3 takes 10,000 parts an upload: at s3fs's 50 MiB block a pack over ~488 GiB (LAION-Aesthetics'
    12M pictures are ~1 TB) failed at its 10,001st part. The block now doubles every PARTS_PER_SIZE parts
    (2,000; here 2, with 5 MiB blocks): 40 MiB in 1 MiB writes go up as parts of 5, 5, 10, 10 and 10
    MiB, not eight of 5, and S3 (moto) takes the unequal parts back as the same bytes."""
    import fsspec

    from memex import storage

    monkeypatch.setattr(storage, "PARTS_PER_SIZE", 2)
    monkeypatch.setattr(storage, "SIZE_DOUBLINGS", 2)
    opts = {**s3_server, "default_block_size": 5 << 20}
    fsspec.filesystem("s3", **opts).invalidate_cache()
    store = storage.Store(f"s3://{bucket}/idx", opts)
    data = np.random.default_rng(2).bytes(40 << 20)
    sizes = []  # each part's size: the bytes s3fs had sent (its offset) when the part was added
    with store.writing(store.join("train.pack")) as f:
        for i in range(40):
            f.write(data[i << 20:(i + 1) << 20])
            if len(f.parts or ()) > len(sizes):
                sizes.append(f.offset - sum(sizes))
    assert [s >> 20 for s in sizes] == [5, 5, 10, 10]  # + the last 10 MiB, sent on close
    assert store.fs.cat_file(store.join("train.pack")) == data


def test_the_quantizer_sample_reads_whole_row_groups_only(tmp_path, monkeypatch):
    """IVF-PQ's k-means sample: random rows reached nearly every row group of train.parquet (65,536 of
    5M rows in groups of 512: 99.9% of a ~200 GB file read for 2.6 GB of images). Now `size` rows drawn
    from a systematic sample of the groups (evenly spaced), so a training set in id order (an image
    folder's classes one after another) is still met everywhere; train_batches reads only the groups
    that hold one."""
    import pyarrow.parquet as pq

    from memex.layout import TRAIN_SCHEMA, IndexLayout
    from memex.stages.index import quantizer_sample
    from memex.train_rows import read_range as train_batches

    layout = IndexLayout(str(tmp_path), "k")
    n, group = 2000, 50  # 40 row groups; "classes" of 200 rows (4 groups each), one after another
    train = pa.table({"gid": pa.array(np.arange(n), pa.int64()), "id": [f"c{g // 200}/{g}" for g in range(n)],
                      "image": [b"x" * 10] * n, "uri": [None] * n, "caption": [""] * n}, schema=TRAIN_SCHEMA)
    layout.store.write_table(layout.inline_train_path, train, row_group_size=group)
    pick = quantizer_sample(layout, n, 230, min_groups=10)
    assert len(pick) == 230 and np.all(np.diff(pick) > 0)
    groups = sorted(set((pick // group).tolist()))
    assert len(groups) == 10 and set(np.diff(groups)) == {4}  # 10 of the 40, evenly spaced
    assert set((pick // 200).tolist()) == set(range(10))  # every class met (a few whole groups met 5)
    assert np.array_equal(quantizer_sample(layout, n, 230, min_groups=10), pick)  # one index, one quantizer
    assert np.array_equal(quantizer_sample(layout, n, 5000), np.arange(n))

    read = []
    real = pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda self, *a, row_groups=None, **k: read.append(row_groups) or real(self, *a,
                                                                                               row_groups=row_groups,
                                                                                               **k))
    got = pa.concat_tables(train_batches(layout, int(pick[0]), int(pick[-1]) + 1, 64, gids=pick))
    assert got["gid"].to_pylist() == pick.tolist() and sorted(read[0]) == groups


def test_ivfpq_trains_on_at_least_39_vectors_a_list_by_default():
    """faiss wants >= 39 training vectors per inverted list and only warns below; conf/index/ivfpq.yaml's
    4,096 lists were trained on 65,536 vectors (16 a list). The default is now max(65,536, 39 x nlist);
    index.train_size sets it; a flat index refuses it."""
    from memex.config import ConfigError
    from memex.index import IndexSpec

    from conftest import compose

    assert IndexSpec(kind="ivfpq", metric="l2", nlist=4096).train_size == 39 * 4096
    assert IndexSpec(kind="ivfpq", metric="l2", nlist=1024).train_size == 65536
    assert IndexSpec(kind="ivfpq", metric="l2", nlist=1024, train_size=9000).train_size == 9000
    cfg = compose(["index=ivfpq", "index.train_size=200000"], config_name="audit")
    assert IndexSpec.from_config(cfg.index, "ip").train_size == 200000
    with pytest.raises(ConfigError, match=r"index.train_size is set, and index=flat"):
        compose(["index.train_size=1000"], config_name="audit")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_shards_vectors_stream_to_storage_and_back(tmp_path, where, request):
    """write_vectors streams the .npz into the file (S3: a multipart upload through s3fs), read_vectors
    reads it from the file: the same arrays, and a truncated file is named."""
    from memex.layout import IndexLayout
    from memex.stages.index import read_vectors, write_vectors
    from memex.storage import StorageError

    if where == "s3":
        opts, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("bucket")
        layout = IndexLayout(f"s3://{bucket}/_index", "k", opts)
    else:
        layout = IndexLayout(str(tmp_path), "k")
    x = np.random.default_rng(0).standard_normal((3000, 768)).astype(np.float32)  # 9 MB: several S3 parts
    gids = np.arange(100, 3100, dtype=np.int64)
    write_vectors(layout, 0, x, gids)
    got_x, got_g = read_vectors(layout, 0)
    assert np.array_equal(got_x, x) and np.array_equal(got_g, gids) and got_x.dtype == np.float32
    path = layout.vectors_path(0)
    raw = layout.store.read_bytes(path)
    layout.store.write_bytes(path, raw[: len(raw) // 2])
    with pytest.raises(StorageError, match=r"vectors \(\.npz\).*Remove it and its marker \(.*shards/_markers/"
                                           r"shard-000000.json\)"):  # the unit that writes it again
        read_vectors(layout, 0)


def test_a_dups_unit_counts_against_one_shard_at_a_time_as_against_all(tmp_path):
    """count_duplicates searches the index shards one at a time (it held them all, the whole index in
    every dups task): counts add up over disjoint shards, beyond dup_k too, and its links join the
    copies that lie in other shards. Brute force is the truth."""
    from memex.config import IndexConfig
    from memex.index import IndexSpec, build_shard, pictures_of, save_index
    from memex.layout import TRAIN_SCHEMA, IndexLayout
    from memex.stages.index import count_duplicates, write_vectors

    rng = np.random.default_rng(5)
    n = 120
    x = rng.standard_normal((n, 8)).astype(np.float32)
    copies = np.r_[3:15, 50:62, 100:112]  # one image stored 36 times, in all 3 shards (> dup_k = 8)
    x[copies] = x[3] + 0.001 * rng.standard_normal((len(copies), 8)).astype(np.float32)
    x[41] = x[40] + 0.002  # a pair within shard 0... and one across shards 0 and 2
    x[90] = x[20] + 0.002
    layout = IndexLayout(str(tmp_path), "k")
    layout.store.write_table(layout.inline_train_path, pa.table(
        {"gid": pa.array(np.arange(n), pa.int64()), "id": [f"i{g}" for g in range(n)], "image": [b""] * n,
         "uri": [None] * n, "caption": [""] * n}, schema=TRAIN_SCHEMA))
    idx = IndexConfig(shards=3, dup_threshold=0.05, dup_k=8)
    spec = IndexSpec.from_config(idx, "l2")
    ranges = [(0, 40), (40, 80), (80, 120)]
    for s, (a, b) in enumerate(ranges):
        gids = np.arange(a, b)
        save_index(build_shard(x[a:b], gids, spec), layout.store.uri_of(layout.faiss_path(s)))
        write_vectors(layout, s, x[a:b], gids)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    truth = ((d <= 0.05).sum(1) - 1).astype(int)
    import memex.stages.index as stage

    loaded, real = [], stage.load_shards
    stage.load_shards = lambda lay, shards: loaded.append(list(shards)) or real(lay, shards)
    links = []
    try:
        tables = [count_duplicates(s, layout, 3, idx, "l2") for s in range(3)]
    finally:
        stage.load_shards = real
    assert loaded == [[0], [1], [2]] * 3  # one index shard at a time, each unit searching all three
    for s, (a, b) in enumerate(ranges):
        t = tables[s]
        assert t["gid"].to_pylist() == list(range(a, b))
        assert t["near_duplicates"].to_pylist() == truth[a:b].tolist()
        lk = layout.store.read_table(layout.links_path(s))
        links.append(np.stack([lk["gid"].to_numpy(), lk["root"].to_numpy()], axis=1))
    assert truth[3] == 35 and truth[90] == 1
    pic = pictures_of(np.arange(n), np.concatenate(links))
    assert len(set(pic[copies])) == 1 and pic[90] == pic[20] and pic[41] == pic[40] and pic[0] != pic[3]
