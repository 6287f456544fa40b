"""A tar member read by the offsets its shard's kept listing holds (memex/shards.py kept_offsets): the match
stage's neighbour fetch and the index's reads of WebDataset rows start from a row's uri
(`tar://<member>::<shard>`, no bytes in train.pack) and read one ranged request of the member, where a scan
of the shard's headers through s3fs read the whole shard for each (~400 MB a LAION shard)."""

import io
import logging
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from memex.ingest import fetch_bytes, list_training_set
from memex.storage import Store


def _tar(members: dict[str, bytes], fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members(tar: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def _laion(fs, root: str, shards: int, per_shard: int, size: int, seed: int = 0) -> dict[str, bytes]:
    """WebDataset shards of `per_shard` samples (a .jpg of `size` random bytes and its .txt): {row id: bytes}."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in range(shards):
        members = {}
        for k in range(per_shard):
            members[f"{k:06d}.jpg"] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            members[f"{k:06d}.txt"] = f"caption {s} {k}".encode()
        fs.pipe_file(f"{root}/{s:05d}.tar", _tar(members))
        out.update({f"{s:05d}.tar/{m}": d for m, d in members.items() if m.endswith(".jpg")})
    return out


def _index_rows(listing: pa.Table) -> pa.Table:
    """The rows as the index's train_rows.parquet gives them: a uri each, no image, no stamp."""
    return pa.table({"id": listing["id"], "image": pa.nulls(listing.num_rows, pa.binary()), "uri": listing["uri"]})


def _no_scan(monkeypatch):
    """A scan of a shard's headers (tarfile's random-access mode, "r:", which memex opens a shard in for that
    alone; the listing streams it, "r|") fails the test."""
    real = tarfile.open

    def opened(*a, **kw):
        if kw.get("mode") == "r:":
            pytest.fail("a shard's headers were scanned")
        return real(*a, **kw)

    monkeypatch.setattr(tarfile, "open", opened)


def _fresh_process():
    from memex import shards

    shards._index.clear()  # the per-process offsets of earlier reads


@pytest.fixture
def s3_reads(monkeypatch):
    """Requests sent to S3 by method, and the bytes get_object answered with ("bytes")."""
    import s3fs

    seen = {"bytes": 0}
    real = s3fs.S3FileSystem._call_s3

    async def call(self, method, *a, **kw):
        out = await real(self, method, *a, **kw)
        seen[method] = seen.get(method, 0) + 1
        if method == "get_object":
            seen["bytes"] += int(out.get("ContentLength") or 0)
        return out

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", call)
    return seen


def test_a_neighbour_fetch_reads_its_members_not_their_shards(s3_server, bucket, s3_reads):
    """Match's fetch of scattered neighbours (two rows from each of 8 shards of 50 samples, ~1 MB each):
    a HEAD of each shard, its kept listing (a few KB) and one ranged GET a member, against the whole of every
    shard read by the header scan (s3fs's readahead file: 8 MB and more for 320 KB of images)."""
    import fsspec

    opts = s3_server
    fs = fsspec.filesystem("s3", **opts)
    root = f"{bucket}/laion"
    images = _laion(fs, root, shards=8, per_shard=50, size=20_000)
    listing = list_training_set(f"s3://{root}", opts, shard_cache=Store(f"s3://{bucket}/_index/_shard_listings", opts))
    rows = _index_rows(listing)
    rng = np.random.default_rng(1)
    want = sorted(int(i) for s in range(8) for i in s * 50 + rng.choice(50, 2, replace=False))
    picked = rows.take(want)
    listing_bytes = sum(i["size"] for i in fs.ls(f"{bucket}/_index/_shard_listings", detail=True))
    _fresh_process()
    s3_reads.clear()
    s3_reads["bytes"] = 0
    got, bad = fetch_bytes(picked, opts, version=f"s3://{bucket}/_index/0123abcd")
    assert bad.num_rows == 0
    assert got == {i: images[i] for i in picked["id"].to_pylist()}
    member_bytes = sum(len(v) for v in got.values())
    requests = sum(v for k, v in s3_reads.items() if k != "bytes")
    assert s3_reads["bytes"] <= 1.1 * member_bytes + listing_bytes, (s3_reads, member_bytes, listing_bytes)
    # a HEAD and a listing a shard, a GET a member
    assert requests <= 2 * 8 + len(want), s3_reads


def test_the_bytes_read_are_the_tar_members_own(s3_server, bucket, monkeypatch):
    """Names with their own headers (a long name: GNU's ././@LongLink, one not ASCII: pax), one holding "::"
    (tar://img::1.jpg::s3://... was split at the first "::": member "img" of a shard "1.jpg::s3://..."),
    one in a folder, a 0-byte one: each read by its kept offsets, with no scan of the shard, and equal to what
    tarfile extracts. A member the listing has no row of (a caption) is still read, by a scan."""
    import fsspec

    from memex.shards import member_uri, read_uri

    opts = s3_server
    fs = fsspec.filesystem("s3", **opts)
    rng = np.random.default_rng(2)
    names = ["a" * 150 + ".jpg", "img::1.jpg", "sub/0001.png", "ünïcode.webp", "0002.jpg", "empty.png"]
    members = {n: (b"" if n == "empty.png" else rng.integers(0, 256, int(rng.integers(1, 3000)),
                                                             dtype=np.uint8).tobytes()) for n in names}
    members["0002.txt"] = b"the caption"
    for fmt, shard in ((tarfile.GNU_FORMAT, "00000.tar"), (tarfile.PAX_FORMAT, "00001.tar")):
        fs.pipe_file(f"{bucket}/wds/{shard}", _tar(members, fmt))
    listing = list_training_set(f"s3://{bucket}/wds", opts, shard_cache=Store(f"s3://{bucket}/_index/_shard_listings",
                                                                                opts))
    assert listing.num_rows == 2 * len(names)
    _fresh_process()
    _no_scan(monkeypatch)
    got, bad = fetch_bytes(_index_rows(listing), opts, version=f"s3://{bucket}/_index/0123abcd")
    for shard in ("00000.tar", "00001.tar"):
        truth = _members(fs.cat_file(f"{bucket}/wds/{shard}"))
        assert {n: got[f"{shard}/{n}"] for n in names if n != "empty.png"} == \
            {n: truth[n] for n in names if n != "empty.png"}
    assert bad["id"].to_pylist() == ["00000.tar/empty.png", "00001.tar/empty.png"]  # an empty file, quarantined
    monkeypatch.undo()
    tar = f"s3://{bucket}/wds/00000.tar"
    assert read_uri(member_uri("0002.txt", tar), opts, "v", f"s3://{bucket}/_index/_shard_listings") == b"the caption"


def test_a_listing_kept_before_offsets_lists_and_reads_as_before(tmp_path, monkeypatch, caplog):
    """Listings kept by memex before they held offsets (member, caption): the listing still reads them (no shard
    read again), and a member is read by a scan of its shard, with one warning naming the folder to delete."""
    import fsspec
    import pyarrow.parquet as pq

    import memex.ingest as ingest
    from memex.ingest import SHARD_LISTING_SCHEMA

    fs = fsspec.filesystem("file")
    (tmp_path / "laion").mkdir()
    images = _laion(fs, str(tmp_path / "laion"), shards=3, per_shard=5, size=500)
    kept = tmp_path / "_index" / "_shard_listings"
    cache = Store(str(kept))
    listing = list_training_set(str(tmp_path / "laion"), shard_cache=cache)
    files = sorted(kept.glob("*.parquet"))
    assert len(files) == 3 and all({"offset", "size"} <= set(pq.read_schema(f).names) for f in files)
    for f in files:  # as memex wrote them before
        pq.write_table(pq.read_table(f, columns=["member", "caption"]).cast(SHARD_LISTING_SCHEMA), f)
    monkeypatch.setattr(ingest, "shard_samples", lambda *a: pytest.fail("a shard was listed again"))
    assert list_training_set(str(tmp_path / "laion"), shard_cache=cache).equals(listing)
    _fresh_process()
    with caplog.at_level(logging.WARNING, logger="memex.shards"):
        got, bad = fetch_bytes(_index_rows(listing), {}, version=str(tmp_path / "_index" / "0123abcd"))
    assert bad.num_rows == 0 and got == images
    warned = [r.getMessage() for r in caplog.records if "hold no member offsets" in r.getMessage()]
    assert len(warned) == 1 and str(kept) in warned[0]


def test_a_shard_rewritten_since_its_listing_is_not_read_at_its_old_offsets(s3_server, bucket):
    """The kept listing is found by the shard's version now (a HEAD, not this process's listing of the folder):
    a shard rewritten in place after its listing (other sizes: the old offsets fall inside other members) is
    read at its new offsets, by a scan."""
    import fsspec

    opts = s3_server
    fs = fsspec.filesystem("s3", **opts)
    root = f"{bucket}/laion"
    _laion(fs, root, shards=2, per_shard=6, size=700, seed=3)
    listing = list_training_set(f"s3://{root}", opts, shard_cache=Store(f"s3://{bucket}/_index/_shard_listings", opts))
    newer = _laion(fs, root, shards=2, per_shard=6, size=1_100, seed=4)
    _fresh_process()
    got, bad = fetch_bytes(_index_rows(listing), opts, version=f"s3://{bucket}/_index/0123abcd")
    assert bad.num_rows == 0 and got == newer


def test_a_member_uri_splits_at_its_shard_s_uri(tmp_path):
    """At the "::" before the shard's URI: tar://img::1.jpg::<shard> was member "img" of a shard "1.jpg::<shard>"
    (no such file: the image quarantined)."""
    from memex.shards import member_uri, read_uri

    tar = tmp_path / "00000.tar"
    tar.write_bytes(_tar({"img::1.jpg": b"jpeg bytes", "img": b"another member"}))
    _fresh_process()
    assert read_uri(member_uri("img::1.jpg", str(tar)), {}) == b"jpeg bytes"
    assert read_uri(member_uri("img::1.jpg", f"file://{tar}"), {}) == b"jpeg bytes"
    from memex.shards import split_member_uri

    for member, tar in [("img::1.jpg", "s3://b/laion/00000.tar"), ("0001.jpg", "s3://b/odd::name/00000.tar"),
                        ("a::/b.jpg", "/data/00000.tar"), ("img::1.jpg", "file:///data/00000.tar"),
                        ("0001.jpg", "relative/00000.tar")]:
        assert split_member_uri(member_uri(member, tar)) == (member, tar)
    assert split_member_uri("s3://b/0001.jpg") is None


def test_the_index_and_match_read_a_webdataset_set_by_its_kept_offsets(tmp_path, monkeypatch):
    """Through the stages: the index's decode (its rows: uris, no stamp, version = the index's URI) and match's
    fetch_training_images find each shard's offsets in <root>/_index/_shard_listings, and scan no shard."""
    from memex import runner
    from memex.images import encode_png
    from memex.stages import index
    from memex.stages.match import fetch_training_images

    from conftest import compose

    def run_tasks(folder, units, fn, resources, gpu=True, **shared):  # no Ray: each unit here
        todo = [i for i in units if i not in set(folder.complete())]
        for i in todo:
            runner.do_unit(folder, i, fn, {**shared, **units[i]})
        runner.check_complete(folder, list(units))
        return len(todo)

    monkeypatch.setattr(runner, "run_tasks", run_tasks)
    rng = np.random.default_rng(5)
    (tmp_path / "laion").mkdir()
    pngs = {}
    for s in range(3):
        members = {}
        for k in range(4):
            members[f"{k:04d}.png"] = encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            members[f"{k:04d}.txt"] = f"caption {s} {k}".encode()
        (tmp_path / "laion" / f"{s:05d}.tar").write_bytes(_tar(members))
        pngs.update({f"{s:05d}.tar/{m}": d for m, d in members.items() if m.endswith(".png")})
    cfg = compose([f"trainset.path={tmp_path / 'laion'}", f"storage.root={tmp_path / 'runs'}", "model.path=/planted",
                   "index.shards=2", "embedder.size=16", "resources.device=cpu"], config_name="audit")
    _fresh_process()
    _no_scan(monkeypatch)
    info = index.run(cfg)
    assert info.n_indexed == 12 and any((tmp_path / "runs" / "_index" / "_shard_listings").glob("*.parquet"))
    _fresh_process()
    pixels, meta = fetch_training_images(info, [0, 5, 11], {})
    ids = sorted(pngs)  # gid = row number of the listing, in id order
    assert {meta[g][0]: pixels.encoded[g] for g in (0, 5, 11)} == {ids[g]: pngs[ids[g]] for g in (0, 5, 11)}
