"""memex.index and the index stage against a review's findings: the out-of-memory advice, Components' fold count,
range_neighbors' first chunk, and an IVF-PQ quantizer sample that could not be read."""

from __future__ import annotations

import io
from functools import partial

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from memex import index as mi
from memex.index import Components, IndexSpec, ShardedIndex, load_index, near_duplicates, pictures_of, save_index
from memex.layout import StorageError


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """One OpenMP thread: on 2 shared cores, 2 spinning faiss threads run k-means 5x slower."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def test_out_of_memory_names_the_size_the_match_worker_holds_and_no_rebuild_that_cannot_help(tmp_path, monkeypatch):
    """load_index's MemoryError advised "more index.shards or index=ivfpq (PQ codes, ~1/30 of a flat shard)": the
    match worker loads every shard into one process (more shards: the same total), and ivfpq keeps the float
    vectors (RFlat: ~1.04x a flat shard). It now names what the worker holds, all shards together, and that it
    needs more memory, which memex does not set."""
    rng = np.random.default_rng(0)
    sizes = []
    for s in range(3):  # one index's shards/ folder
        index = faiss.IndexFlatL2(256)
        index.add(rng.random((500 * (s + 1), 256), dtype=np.float32))  # 0.5, 1.0, 1.5 MiB
        save_index(index, str(tmp_path / f"shard-{s:06d}.faiss"))
        sizes.append((tmp_path / f"shard-{s:06d}.faiss").stat().st_size)
    (tmp_path / "_tmp-0123-shard-000003.faiss").write_bytes(b"x" * 10_000_000)  # a killed write: not held

    def out_of_memory(reader):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(mi.faiss, "read_index", out_of_memory)
    with pytest.raises(MemoryError) as e:
        load_index(str(tmp_path / "shard-000001.faiss"))
    msg = str(e.value)
    assert "ran out of memory: give the match stage a machine with more memory" in msg
    assert f"3 .faiss file(s) of {sum(sizes) / 2**20:.1f} MiB in all" in msg and sum(sizes) > 2**20
    assert "resources.executor=local" in msg and "memex sets no memory of its own" in msg
    assert "1/30" not in msg and "PQ codes" not in msg and "rebuild with more index.shards" not in msg
    assert "neither lowers it" in msg


def union_find_roots(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """(n,) each node's smallest connected node: a plain union-find, the reference."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in zip(a.tolist(), b.tolist()):
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)  # the smaller id stays the root: it is the component's smallest
    return np.array([find(x) for x in range(n)], np.int64)


def test_components_fold_once_per_buffer_of_new_edges_past_a_large_forest(monkeypatch):
    """Components counted the forest in its buffer: once the forest held more than `buffer` pairs, every add
    folded the whole forest again (near_duplicates adds once per 4,096-query batch: quadratic). Now a fold comes
    once per `buffer` edges added since the last, and the components are the union-find's."""
    folds = []
    real = Components._fold
    monkeypatch.setattr(Components, "_fold", lambda self: folds.append(1) or real(self))
    rng = np.random.default_rng(3)
    n, buffer = 20_000, 1000
    first_a = np.arange(1, 12_001, 2)  # 6,000 pairs (2i+1, 2i): a forest of 6x the buffer
    first_b = first_a - 1
    batches = [rng.integers(0, n, (2, 50)) for _ in range(300)]  # 15,000 edges, 50 an add
    c = Components(buffer=buffer)
    c.add(first_a, first_b)
    assert len(folds) == 1
    for a, b in batches:
        c.add(a, b)
    added = sum(a.size for a, _ in batches)
    assert len(folds) - 1 <= added // buffer + 1, f"{len(folds) - 1} folds for {added} edges (buffer {buffer})"
    pairs = c.pairs()
    a = np.concatenate([first_a] + [a for a, _ in batches])
    b = np.concatenate([first_b] + [b for _, b in batches])
    assert np.array_equal(pictures_of(np.arange(n), pairs), union_find_roots(a, b, n))


def test_range_neighbors_first_chunk_keeps_to_max_results_for_heavily_duplicated_queries(monkeypatch):
    """range_neighbors sized its first chunk for start_k results a query, but near_duplicates sends it exactly
    the queries with the most near-duplicates: 390 copies of an image stored 3,000 times returned 1.17M results
    in one range_search for max_results=50,000. No range_search now returns more than max_results, and the
    counts and pictures are brute force's."""
    rng = np.random.default_rng(0)
    copies, singles, max_results = 3000, 1000, 50_000
    x = np.concatenate([np.tile(rng.standard_normal((1, 8)), (copies, 1)) + 1e-4 * rng.standard_normal((copies, 8)),
                        rng.standard_normal((singles, 8))]).astype(np.float32)
    spec = IndexSpec(kind="flat", metric="l2")
    index = ShardedIndex.build(x, 1, spec)
    returned = []
    real = faiss.IndexIDMap2.range_search

    def spy(self, q, radius, *args, **kwargs):
        lims, D, I = real(self, q, radius, *args, **kwargs)
        returned.append(len(I))
        return lims, D, I

    monkeypatch.setattr(faiss.IndexIDMap2, "range_search", spy)
    counts, links = near_duplicates(index.search, x, np.arange(len(x)), 0.05, metric="l2", k=64,
                                    range_fn=partial(index.range_neighbors, start_k=128, max_results=max_results))
    assert returned and max(returned) <= max_results, f"range_search results: {returned[:5]}"

    d2 = sum((x[:, None, j] - x[None, :, j]) ** 2 for j in range(x.shape[1]))  # brute force, 4,000^2, the truth
    near = np.sqrt(np.maximum(d2, 0)) <= 0.05
    np.fill_diagonal(near, False)
    assert np.array_equal(counts, near.sum(1))
    assert counts[0] == copies - 1
    _, label = connected_components(csr_matrix(near), directed=False)  # 9M edges: scipy, not the Python loop
    smallest = np.full(label.max() + 1, len(x))
    np.minimum.at(smallest, label, np.arange(len(x)))
    truth = smallest[label]
    assert np.array_equal(pictures_of(np.arange(len(x)), links), truth)


def _png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


@pytest.mark.parametrize("readable", [0, 10])
def test_an_ivfpq_sample_that_cannot_be_read_is_named_as_unreadable_images_not_a_setting(tmp_path, readable):
    """train_quantizer dropped its sample's quarantine, so a training set whose images cannot be read (a moved
    folder, damaged files) failed with "IVF-PQ needs 16 training vectors, got 0: lower index.nlist". Now a
    StorageError like a flat index's: how many were quarantined and the first reasons."""
    from memex.stages import index as stage
    from memex.synth import logo

    from conftest import compose

    pics = tmp_path / "pics"
    pics.mkdir()
    n = 60
    for i in range(n):  # the first `readable` are PNGs, the rest bytes that are no image
        (pics / f"p{i:02d}.png").write_bytes(_png(logo(i, 16)[0]) if i < readable else b"not a png")
    pq.write_table(pa.table({"id": [f"r{i:02d}" for i in range(n)], "uri": [str(pics / f"p{i:02d}.png")
                                                                           for i in range(n)],
                             "caption": [f"c{i}" for i in range(n)]}), tmp_path / "m.parquet")
    cfg = compose([f"trainset.path={tmp_path / 'm.parquet'}", f"storage.root={tmp_path / 'runs'}",
                   "model.path=/planted", "embedder.size=16", "resources.device=cpu", "resources.executor=local",
                   "index=ivfpq", "index.nlist=4", "index.pq_m=4", "index.pq_nbits=4", "index.shards=2"],
                  config_name="audit")
    with pytest.raises(StorageError) as e:
        stage.run(cfg)
    msg = str(e.value)
    what = "no training image" if not readable else f"only {readable} of the {n} training images"
    assert msg.startswith(f"{what} sampled to train the IVF-PQ quantizer")
    assert f"({n - readable} quarantined; the first 3 reasons: r{readable:02d} (" in msg
    assert "UnidentifiedImageError" in msg and "= 16" in msg
    assert ("lower index.nlist" in msg) == bool(readable)  # a setting is the fix only when images were read
