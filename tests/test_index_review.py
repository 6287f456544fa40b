"""memex.index and the index stage against a review's findings: the out-of-memory advice, Components' fold count,
range_neighbors' first chunk, and an IVF-PQ quantizer sample that could not be read; file names that are not UTF-8
refused naming them, the index folder's temp files swept by the next build, "::" in a file's name read as part of
it."""

from __future__ import annotations

import io
import os
import tarfile
import uuid
from functools import partial

import faiss
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from memex import index as mi
from memex.images import encode_png
from memex.index import Components, IndexSpec, ShardedIndex, load_index, near_duplicates, pictures_of, save_index
from memex.ingest import IngestError, decode_rows, list_training_set
from memex.layout import StorageError
from memex.storage import Store
from memex.synth import logo


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


# ---- odd file names, a killed build's temp files ----------------------------------------------------------
def _img(i: int, size: int = 32) -> np.ndarray:
    return logo(i, size)[0]


def _latin1_file(folder, name: bytes, data: bytes) -> None:
    """A file whose name is these bytes (not UTF-8: Python lists it with surrogate escapes)."""
    try:
        fd = os.open(os.path.join(os.fsencode(folder), name), os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as e:  # a file system that holds UTF-8 names only (macOS's APFS)
        pytest.skip(f"this file system refuses a Latin-1 file name: {e}")
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:  # names as bytes, not PAX's UTF-8
        for name, data in members.items():
            info = tarfile.TarInfo(name)  # a surrogate escape is written as its byte
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _audit_cfg(path: str, root):
    from conftest import compose

    return compose([f"trainset.path={path}", f"storage.root={root}", "model.path=/planted", "index.shards=2",
                    "embedder.size=16", "resources.device=cpu", "resources.executor=local"], config_name="audit")


def test_file_names_that_are_not_utf8_are_refused_naming_them(tmp_path):
    """An image folder holding a Latin-1 name (café.png copied from an old archive) stopped the index with a bare
    UnicodeEncodeError naming no file (a traceback from the CLI): refused naming the file, escaped, with the fix.
    A shard's Latin-1 member name, and a shard's own file name, likewise."""
    from memex.stages import index

    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "a.png").write_bytes(encode_png(_img(0)))
    (pics / "a.txt").write_text("a caption")
    _latin1_file(pics, b"caf\xe9.png", encode_png(_img(1)))
    _latin1_file(pics, b"caf\xe9.txt", b"its caption")
    fix = r"rename them to UTF-8 \(convmv -f latin1 -t utf-8 -r --notest .*pics\)"
    with pytest.raises(IngestError, match=r"pics: 1 image file name\(s\) are not UTF-8.*\(e\.g\. .*pics/caf\\xe9"
                                          r"\.png\): " + fix) as e:
        list_training_set(str(pics))
    str(e.value).encode("utf-8")  # no raw surrogate: a log file or a terminal takes the message
    with pytest.raises(IngestError, match=r"caf\\xe9\.png"):  # the stage's own error (a MemexError: one line)
        index.run(_audit_cfg(str(pics), tmp_path / "runs"))
    assert not (tmp_path / "runs" / "_index").exists() or not any(
        p.is_dir() and p.name != "_shard_listings" for p in (tmp_path / "runs" / "_index").iterdir())

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(_tar({"0001.png": encode_png(_img(2)), "0001.txt": b"c",
                                             os.fsdecode(b"caf\xe9.png"): encode_png(_img(3))}))
    cache = Store(str(tmp_path / "idx" / "_shard_listings"))
    with pytest.raises(IngestError, match=r"shard .*00000.tar: 1 member name\(s\) are not UTF-8.*\(e\.g\. "
                                          r"caf\\xe9\.png\): pack it again with UTF-8 names"):
        list_training_set(str(shards), shard_cache=cache)
    assert not list(cache.listing(cache.path, "*.parquet")), "no listing kept of a shard refused"
    os.remove(shards / "00000.tar")
    _latin1_file(shards, b"\xe9t\xe9.tar", _tar({"0001.png": encode_png(_img(2))}))
    with pytest.raises(IngestError, match=r"1 shard file name\(s\) are not UTF-8.*\(e\.g\. .*shards/\\xe9t\\xe9"
                                          r"\.tar\): rename them to UTF-8"):
        list_training_set(str(shards), shard_cache=cache)


def test_a_killed_builds_temp_files_in_the_index_folder_are_swept_by_the_next_build(tmp_path):
    """A build killed while it wrote pictures.parquet, index.json or _SUCCESS.json left its `_tmp-<uuid>-<name>`
    in the index folder (pictures.parquet's: tens of MB at LAION scale); only a lost train.pack swept them, so
    the finished index kept them for good. The next build sweeps them, and the index is the one it was. Another
    audit's write-probe and a lease's temp file are not its to remove."""
    from memex.stages import index

    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(6):
        (pics / f"p{i}.png").write_bytes(encode_png(_img(i % 4)))  # p4, p5: copies of p0, p1
    cfg = _audit_cfg(str(pics), tmp_path / "runs")
    info = index.run(cfg)
    layout = info.layout({})
    folder = tmp_path / "runs" / "_index" / info.key
    before = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
              if p.is_file() and p.suffix != ".json"}  # (markers hold a unit's seconds)
    assert (folder / "pictures.parquet").exists()
    # as a kill in the write of pictures.parquet leaves the folder: no _SUCCESS.json, no pictures.parquet, the temp
    os.remove(folder / "_SUCCESS.json")
    os.remove(folder / "pictures.parquet")
    left = [f"_tmp-{uuid.uuid4().hex}-pictures.parquet", f"_tmp-{uuid.uuid4().hex}-_SUCCESS.json",
            f"_tmp-{uuid.uuid4().hex}-index.json"]
    for name in left:
        (folder / name).write_bytes(before["pictures.parquet"])
    spared = [f"_tmp-probe-{uuid.uuid4().hex}", f"_tmp-{uuid.uuid4().hex}_lease.json"]
    for name in spared:
        (folder / name).write_bytes(b"{}")

    again = index.run(cfg)
    assert sorted(p.name for p in folder.glob("_tmp-*")) == sorted(spared)
    after = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
             if p.is_file() and p.suffix != ".json" and p.name not in spared}
    assert after == before
    assert (again.key, again.n_train, again.n_indexed, again.n_quarantined) == \
        (info.key, info.n_train, info.n_indexed, info.n_quarantined)
    assert layout.store.read_table(layout.pictures_path).num_rows == 4  # p0 ~ p4, p1 ~ p5


def test_a_double_colon_in_a_file_name_is_part_of_the_name(tmp_path):
    """fsspec reads "::" in a uri as a chain of filesystems: an image g::h.png of a folder was opened as the file
    g (quarantined as missing), and a shard a::b.tar was no file at all. Both are read by their names now, a
    shard's members with their offsets from a kept listing or from a scan of its headers; a chained uri
    (simplecache::file://...) is still a chain."""
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "g").write_bytes(b"not the image")  # what the chain opened
    (pics / "g::h.png").write_bytes(encode_png(_img(0)))
    (pics / "a.png").write_bytes(encode_png(_img(1)))
    t = list_training_set(str(pics))
    assert t["id"].to_pylist() == ["a.png", "g::h.png"]
    dec = decode_rows(t, 32)
    assert dec.quarantine.num_rows == 0, dec.quarantine.to_pylist()
    assert dec.ids == ["a.png", "g::h.png"]
    assert np.array_equal(dec.images[1], _img(0))

    shards = tmp_path / "laion"
    shards.mkdir()
    (shards / "a::b.tar").write_bytes(_tar({"x::y.png": encode_png(_img(2)), "x::y.txt": b"a caption",
                                            "0002.png": encode_png(_img(3))}))
    cache = Store(str(tmp_path / "idx" / "_shard_listings"))
    t = list_training_set(str(shards), shard_cache=cache)
    assert t["id"].to_pylist() == ["a::b.tar/0002.png", "a::b.tar/x::y.png"]
    assert t["caption"].to_pylist() == [None, "a caption"]
    for version in (None, str(tmp_path / "idx" / "key")):  # a scan of its headers; its kept listing's offsets
        dec = decode_rows(t.drop_columns(["stamp"]), 32, version=version)
        assert dec.quarantine.num_rows == 0, dec.quarantine.to_pylist()
        assert np.array_equal(dec.images[0], _img(3)) and np.array_equal(dec.images[1], _img(2))

    from memex.shards import read_uri

    cached = f"simplecache::{fsspec.filesystem('file').unstrip_protocol(str(pics / 'a.png'))}"
    assert read_uri(cached, {"simplecache": {"cache_storage": str(tmp_path / "cache")}}) == \
        (pics / "a.png").read_bytes()
    assert os.listdir(tmp_path / "cache")  # read through the chain's cache
