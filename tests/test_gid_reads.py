"""Reads of training rows and pictures by a set of gids (train_rows.read_in): only the row groups holding them.

pyarrow's ("gid", "in", gids) filter pruned row groups only for a few values: the ~640 neighbours of a match
shard (64 generations x match.k=10) read every row group of train_rows.parquet (1M rows: 4.0 s for 640 rows)
and of pictures.parquet, once per samples shard."""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memex import train_rows
from memex.layout import PICTURES_SCHEMA, TRAIN_SCHEMA, IndexLayout
from memex.membership import IndexInfo, fetch_train_rows, picture_rows, read_pictures
from memex.storage import StorageError
from memex.train_rows import write

from conftest import load_bench

N, GROUP = 6000, 100  # 60 row groups of ~25 KB each (captions of random hex): past pre_buffer's 8 KB hole limit


def _spans(fs, path: str) -> list[tuple[int, int]]:
    """Each row group's bytes in the file: [first column chunk's start, last one's end)."""
    with fs.open(path, "rb") as f:
        md = pq.ParquetFile(f).metadata
    out = []
    for i in range(md.num_row_groups):
        cols = [md.row_group(i).column(c) for c in range(md.num_columns)]
        starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in cols]
        out.append((min(starts), max(s + c.total_compressed_size for s, c in zip(starts, cols))))
    return out


@pytest.fixture
def counted(monkeypatch):
    """(an index layout on an in-memory store, a function path -> the row groups of that file whose bytes
    were read since the last call). Reads are seen through the store's files; the footer's (each read to the
    file's end) are left out."""
    root = f"memory://gid-reads-{uuid.uuid4().hex}"
    layout = IndexLayout(root, "k")
    layout.root = root
    monkeypatch.setattr(train_rows, "PACK_GAP", 0)  # only touching chunks fetched as one (else groups between too)
    fs, reads = layout.store.fs, []
    load_bench("fs_reads").record_reads(fs, reads, monkeypatch.setattr)

    def groups_read(path: str) -> list[int]:
        path = fs._strip_protocol(path)
        size, spans = fs.info(path)["size"], _spans(fs, path)
        got = [(lo, hi) for p, lo, hi in reads if p == path and hi < size and hi > lo]
        reads.clear()
        return [i for i, (a, b) in enumerate(spans) if any(lo < b and hi > a for lo, hi in got)]

    return layout, groups_read


def _train(layout: IndexLayout) -> pa.Table:
    rng = np.random.default_rng(1)
    t = pa.table({"gid": pa.array(np.arange(N), pa.int64()), "id": [f"i{g}" for g in range(N)],
                  "image": [bytes([g % 256]) * 3 for g in range(N)], "uri": [None] * N,
                  "caption": [rng.bytes(120).hex() for _ in range(N)]}, schema=TRAIN_SCHEMA)
    write(layout.store, layout, [t.slice(0, 2500), t.slice(2500)], row_group_size=GROUP)
    return t


def test_a_match_shards_neighbours_read_only_the_row_groups_holding_them(counted, monkeypatch):
    """640 gids (a match shard's neighbours) in 16 of the 60 row groups of train_rows.parquet: those 16 are
    read (all 60 were); the rows, images included, equal the old filtered read's on random gid sets (in
    gid order; gids in no group, negative or repeated ones ignored)."""
    layout, groups_read = counted
    train = _train(layout)
    rng = np.random.default_rng(0)
    holding = sorted(rng.choice(N // GROUP, 16, replace=False).tolist())
    gids = np.concatenate([g * GROUP + rng.choice(GROUP, 40, replace=False) for g in holding])
    got = fetch_train_rows(layout, rng.permutation(gids).tolist(), columns=["gid", "id", "caption"])
    assert groups_read(layout.rows_path) == holding
    assert got["gid"].to_pylist() == sorted(gids.tolist())
    assert got["caption"].to_pylist() == train.take(np.sort(gids))["caption"].to_pylist()
    # fetched READ_BATCH bytes at a time (an older index's inline images: ~20 MB a group), the same rows
    with monkeypatch.context() as m:
        m.setattr(train_rows, "READ_BATCH", 1)  # a group at a time
        assert fetch_train_rows(layout, gids, columns=["gid", "id", "caption"]).equals(got)
        assert groups_read(layout.rows_path) == holding

    for n in (1, 5, 150, 640, 3000):
        some = rng.choice(N + 50, n, replace=False).tolist() + [-1, 7, 7]
        got = fetch_train_rows(layout, some)
        want = train.filter(pa.compute.is_in(train["gid"], pa.array(sorted(set(some)), pa.int64())))
        assert got.equals(want), n
        assert fetch_train_rows(layout, np.array(some), columns=["id"])["id"].equals(want["id"])
    groups_read(layout.rows_path)
    assert fetch_train_rows(layout, [N + 5]).num_rows == 0 and groups_read(layout.rows_path) == []


def test_a_shards_pictures_read_only_the_row_groups_holding_its_gids(counted):
    """read_pictures of 640 gids reads the pictures.parquet row groups that hold one of them, not every one;
    read_pictures and picture_rows answer as the whole table says."""
    layout, groups_read = counted
    rng = np.random.default_rng(2)
    gids = np.sort(rng.choice(200_000, 60_000, replace=False)).astype(np.int64)
    picture = gids - gids % 9
    # (pictures.parquet is written sorted by gid, as stages/index.py write_pictures writes it)
    layout.store.write_table(layout.pictures_path, pa.table(
        {"gid": gids, "id": [rng.bytes(12).hex() for _ in gids.tolist()], "picture": picture}, schema=PICTURES_SCHEMA),
        row_group_size=2000)
    info = IndexInfo(root=layout.root, key="k", shards=[(0, 200_000)], metric="ip", dim=8, n_train=200_000,
                     n_indexed=200_000, n_quarantined=0)
    holding = [3, 11, 12, 25]  # of 30 groups of 2,000 rows
    want = np.concatenate([gids[rng.choice(np.arange(g * 2000, (g + 1) * 2000), 160, replace=False)]
                           for g in holding])
    got = read_pictures(info, {}, np.concatenate([want, [-1, 199_999_999]]))
    assert groups_read(layout.pictures_path) == holding
    truth = dict(zip(gids.tolist(), picture.tolist()))
    assert got == {g: truth[g] for g in want.tolist()} | {199_999_999: 199_999_999}

    rows = picture_rows(info, {}, [int(picture[5]), int(picture[30_000])])
    ids = layout.store.read_table(layout.pictures_path)
    for p, members in rows.items():
        assert members == [i for i, q in zip(ids["id"].to_pylist(), ids["picture"].to_pylist()) if q == p]

    # no rows (an index without near-duplicates): its empty chunks start at offset 0, where pyarrow reads them
    layout.store.write_table(layout.pictures_path, PICTURES_SCHEMA.empty_table())
    assert read_pictures(info, {}, [4, 9]) == {4: 4, 9: 9} and picture_rows(info, {}, []) == {}

    # cut short, then gone: named with the fix, as the filtered read named them
    layout.store.write_table(layout.pictures_path, ids)
    raw = layout.store.read_bytes(layout.pictures_path)
    layout.store.write_bytes(layout.pictures_path, raw[:len(raw) // 2])
    with pytest.raises(StorageError, match=r"pictures.parquet is not readable Parquet .*Remove it"):
        read_pictures(info, {}, want)
    layout.store.delete(layout.pictures_path)
    with pytest.raises(StorageError, match=r"pictures.parquet is not readable Parquet \(FileNotFoundError"):
        read_pictures(info, {}, want)


# ---- a WebDataset set's tar shard offsets, kept per process by bytes (memex/shards.py) ----------------------
def _tars(root, shards: int, per_shard: int) -> dict[str, bytes]:
    import io
    import tarfile

    out = {}
    for s in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for k in range(per_shard):
                for name, data in ((f"{k:06d}.jpg", f"img {s} {k}".encode() * 20), (f"{k:06d}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                out[f"{s:05d}.tar/{k:06d}.jpg"] = f"img {s} {k}".encode() * 20
        (root / f"{s:05d}.tar").write_bytes(buf.getvalue())
    return out


def test_a_sets_shard_offsets_are_kept_by_bytes_not_64_shards(tmp_path, monkeypatch):
    """Each samples shard's neighbours lie in as many tar shards as neighbours; each shard whose offsets the
    process no longer holds costs a HEAD of it and a GET of its kept listing (~0.5 MB a LAION shard). 64 shards
    were kept: a second samples shard meeting the same 100 shards looked all 100 up again. Now the offsets are
    kept up to TAR_CACHE_BYTES (~770 LAION shards in 256 MB), the oldest dropped past it."""
    from memex import shards
    from memex.ingest import fetch_bytes, list_training_set
    from memex.storage import Store

    (tmp_path / "laion").mkdir()
    images = _tars(tmp_path / "laion", shards=100, per_shard=3)
    listing = list_training_set(str(tmp_path / "laion"), {},
                                shard_cache=Store(str(tmp_path / "_index" / "_shard_listings")))
    rows = pa.table({"id": listing["id"], "image": pa.nulls(listing.num_rows, pa.binary()), "uri": listing["uri"]})
    looked = []
    real = shards.kept_offsets
    monkeypatch.setattr(shards, "kept_offsets", lambda *a, **k: looked.append(a[0]) or real(*a, **k))
    shards._index.clear()  # a fresh process
    version = str(tmp_path / "_index" / "0123abcd")
    for unit in range(2):  # two samples shards, a neighbour in each of the 100 tar shards
        pick = rows.take(np.arange(unit, rows.num_rows, 3))
        got, bad = fetch_bytes(pick, {}, version=version)
        assert bad.num_rows == 0 and got == {i: images[i] for i in pick["id"].to_pylist()}
        assert len(looked) == 100, unit  # each shard looked up once, by the first (the second: 100 again before)
    held = sum(m.nbytes for m, _ in shards._index.values())
    assert len(shards._index) == 100 and 100 * 3 * 8 < held < 100 * 3 * 60

    monkeypatch.setattr(shards, "TAR_CACHE_BYTES", held // 2)  # half of them fit: the 50 read last are kept
    shards._index.clear()
    looked.clear()
    for _ in range(2):
        fetch_bytes(rows.take(np.arange(0, rows.num_rows, 3)), {}, version=version)
    assert len(looked) == 200 and 45 <= len(shards._index) <= 50  # (read in order: each dropped before its turn)


def test_a_shards_offsets_answer_as_the_dict_they_replace():
    """shards.Offsets: a member's (data offset, size), None for one not there, and a name twice (a tar appended
    to) its last member, as tarfile and the dict comprehension gave it."""
    from memex.shards import Offsets

    o = Offsets(["a.jpg", "b.jpg", "a.jpg"], [512, 2048, 4096], [10, 20, 30])
    assert (o.get("a.jpg"), o.get("b.jpg"), o.get("c.jpg"), len(o)) == ((4096, 30), (2048, 20), None, 3)
    empty = Offsets(pa.array([], pa.large_string()), pa.array([], pa.int64()), pa.array([], pa.int64()))
    assert empty.get("a.jpg") is None


@pytest.mark.parametrize("seed", range(4))
def test_a_shards_offsets_find_every_name_as_a_dict_does(seed):
    """Names bisected in their sorted order (a scan per lookup made a whole shard's reads quadratic): random
    names, non-ASCII ones (UTF-8 order is Python's), prefixes of one another and names twice, each found as the
    dict of the tar's members (the last of a name) finds it; names not there, and before or after all, None."""
    from memex.shards import Offsets

    rng = np.random.default_rng(seed)
    pool = ["a", "a.jpg", "a.jpg.txt", "ab", "b", "é.jpg", "z", "\U0001f600.png", "0001.jpg", "A.jpg", "a b.jpg"]
    names = [pool[i] if rng.random() < 0.3 else f"{rng.integers(0, 10**6):06d}{rng.choice(['.jpg', '.txt'])}"
             for i in rng.integers(0, len(pool), int(rng.integers(1, 400)))]
    offsets, sizes = rng.integers(0, 10**9, len(names)), rng.integers(0, 10**6, len(names))
    want = {m: (int(o), int(z)) for m, o, z in zip(names, offsets, sizes)}
    got = Offsets(names, offsets, sizes)
    assert all(got.get(m) == want[m] for m in want)
    for absent in ("", " ", "0", "a.jp", "a.jpgz", "zz", "\uffff", "999999.jpg0"):
        assert got.get(absent) == want.get(absent)


# ---- the report's training images, at most REPORT_SIDE px (memex/stages/match.py keep_for_report) -----------
def test_the_reports_training_images_are_kept_bounded_and_chunked_by_bytes(tmp_path, monkeypatch):
    """keep_for_report stored each extracted match's training image as a PNG of its whole pixels: a 24 MP photo a
    46 MB PNG, 64 a chunk (2.9 GiB, past a binary column's 2 GiB) for a page of 256 px thumbnails. Now at most
    REPORT_SIDE px on the long side (aspect kept; a small image as it is), and a chunk ends at REPORT_CHUNK_BYTES
    of PNGs too; the report still shows it."""
    import io
    from types import SimpleNamespace

    import pyarrow.parquet as pq
    from PIL import Image

    from memex.images import decode, encode_png
    from memex.report import data_uri
    from memex.stages import match
    from memex.storage import Store

    shapes = {1: (2400, 3600), 2: (300, 200), 3: (1800, 5000), 4: (2100, 2100)}
    encoded = {}
    for g, (h, w) in shapes.items():
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG" if g != 2 else "PNG", quality=90)
        encoded[g] = buf.getvalue()
    monkeypatch.setattr(match, "fetch_training_images", lambda info, gids, opts: (match.TrainPixels(
        {int(g): encoded[int(g)] for g in gids}, {int(g): str(g) for g in gids}), {}))
    extracted = pa.table({"train_gid": pa.array(list(shapes), pa.int64()), "train_id": [f"t{g}" for g in shapes]})
    layout = SimpleNamespace(store=Store(str(tmp_path)), matched_train_path=str(tmp_path / "m.parquet"))
    match.keep_for_report(layout, None, {}, extracted=extracted)
    kept = pq.read_table(layout.matched_train_path)
    assert kept["train_gid"].to_pylist() == list(shapes)
    for g, png in zip(kept["train_gid"].to_pylist(), kept["image"].to_pylist()):
        h, w = shapes[g]
        got = decode(png).shape[:2]
        if max(h, w) <= 1024:  # match.REPORT_SIDE
            assert png == encode_png(decode(encoded[g]))  # as it was
        else:
            assert max(got) == 1024 and abs(got[0] / got[1] - h / w) < 0.01, (g, got)  # (was 3600, 5000, 2100)
        assert data_uri(png).startswith("data:image/png;base64,")
    assert pq.ParquetFile(layout.matched_train_path).metadata.num_row_groups == 1

    # a chunk ends where its PNGs pass REPORT_CHUNK_BYTES: here each image its own row group
    monkeypatch.setattr(match, "REPORT_CHUNK_BYTES", 1)
    match.keep_for_report(layout, None, {}, extracted=extracted)
    assert pq.read_table(layout.matched_train_path).equals(kept)
    assert pq.ParquetFile(layout.matched_train_path).metadata.num_row_groups == len(shapes)
