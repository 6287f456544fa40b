"""Ingest fixes of the third review: web image URLs listed without requests, MemoryError in a decode, one-row-group
Parquet manifests, links to the root's ancestors, a user's manifest beside .tar shards, size-only shard stamps."""
import functools
import http.server
import os
import posixpath
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memex.images import encode_png
from memex.ingest import list_training_set
from memex.synth import logo


@pytest.fixture
def web(tmp_path):
    """A local web server over tmp_path/www that answers 403 for folders (as image hosts and CDNs do) and
    counts the requests it gets: (base URL, list of (method, path))."""
    root = tmp_path / "www"
    root.mkdir()
    seen = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def send_head(self):
            seen.append((self.command, self.path))
            if os.path.isdir(self.translate_path(self.path)):
                self.send_error(403)
                return None
            return super().send_head()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}", root, seen
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("n", [8, 3])  # 8: a folder listing was asked for (403: the listing failed); 3: a HEAD each
@pytest.mark.parametrize("images", [True, False])
def test_web_image_urls_are_listed_unstamped_without_a_request(tmp_path, web, n, images):
    base, root, seen = web
    (root / "img").mkdir()
    for i in range(n):
        (root / "img" / f"{i}.png").write_bytes(encode_png(logo(i, 16)[0]))
    m = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(n)], "uri": [f"{base}/img/{i}.png" for i in range(n)],
                             "caption": ["c"] * n}), m)
    t = list_training_set(str(m), images=images)
    assert t.num_rows == n and t["stamp"].to_pylist() == [None] * n
    assert t["uri"].to_pylist() == [f"{base}/img/{i}.png" for i in range(n)]
    assert seen == []  # neither a folder listing nor a HEAD per image


def test_members_of_web_tar_shards_are_stamped_by_one_head_a_shard(tmp_path, web):
    """A web shard's version keys its members' offsets: stamped still, by one HEAD a shard, never by a folder
    listing (8 shards in one folder asked the server for one, which answered 403)."""
    import tarfile

    base, root, seen = web
    (root / "shards").mkdir()
    for s in range(8):
        with tarfile.open(root / "shards" / f"{s}.tar", "w") as tar:
            tar.add(_png_file(tmp_path, s), arcname="0.png")
    m = tmp_path / "m.parquet"
    uris = [f"tar://0.png::{base}/shards/{s}.tar" for s in range(8)] * 2  # two rows a shard: one HEAD still
    pq.write_table(pa.table({"id": [str(i) for i in range(16)], "uri": uris}), m)
    t = list_training_set(str(m))
    assert all(st and st.startswith(str(os.path.getsize(root / "shards" / "0.tar"))) for st in t["stamp"].to_pylist())
    assert sorted(p for _, p in seen) == sorted(f"/shards/{s}.tar" for s in range(8))


def _png_file(tmp_path, i: int) -> str:
    p = tmp_path / f"src{i}.png"
    p.write_bytes(encode_png(logo(i, 16)[0]))
    return str(p)


def test_a_decode_out_of_memory_fails_the_batch_rather_than_quarantining_the_image(monkeypatch):
    """A MemoryError is the process's, not the image's: quarantined, the image was left out of an index that every
    later audit reuses; raised, the unit fails and a rerun retries it. A bad image is still quarantined."""
    import memex.ingest as ingest

    real = ingest._decode

    def decode(row, *a, **k):
        if row["id"] == "big":
            raise MemoryError("Unable to allocate 103. MiB")
        return real(row, *a, **k)

    monkeypatch.setattr(ingest, "_decode", decode)
    good = encode_png(logo(0, 16)[0])
    rows = pa.table({"id": ["ok", "bad", "big"], "image": [good, b"not an image", good], "uri": [None] * 3})
    with pytest.raises(MemoryError, match="index.decode_batch"):
        ingest.decode_rows(rows, 16)
    got = ingest.decode_rows(rows.slice(0, 2), 16)
    assert got.ids == ["ok"] and got.quarantine["id"].to_pylist() == ["bad"]


def test_a_manifest_of_one_row_group_is_read_a_page_at_a_time(monkeypatch):
    """pq.write_table and pandas write up to 1Mi rows a row group (a whole 100k-image part): its image column was read
    whole at once (peak RSS ~1.2x the file) despite the 256-row batches. Read through pyarrow's buffer, no read is
    larger than it, and the batches are the same rows."""
    import fsspec
    import numpy as np
    from fsspec.implementations.memory import MemoryFile

    from memex.manifest import PARQUET_BUFFER, iter_manifest

    rng = np.random.default_rng(0)
    n, size = 300, 40_000  # 12 MB of images in one row group: past the 8 MiB buffer
    images = [rng.integers(0, 256, size, np.uint8).tobytes() for _ in range(n)]
    t = pa.table({"id": [f"{i:04d}" for i in range(n)], "image": pa.array(images, pa.binary()),
                  "caption": [f"c{i}" for i in range(n)]})
    uri = f"memory://onegroup-{os.getpid()}/m.parquet"
    with fsspec.open(uri, "wb") as f:
        pq.write_table(t, f, compression="none")  # one row group, pyarrow's default
    assert pq.ParquetFile(fsspec.open(uri, "rb").open()).metadata.num_row_groups == 1
    reads = []
    real = MemoryFile.read

    def read(self, n=-1):
        out = real(self, n)
        reads.append(len(out))
        return out

    monkeypatch.setattr(MemoryFile, "read", read)
    got = list(iter_manifest(uri, batch_rows=64))
    monkeypatch.undo()
    fsspec.filesystem("memory").rm(posixpath.dirname(uri), recursive=True)
    assert max(reads) <= PARQUET_BUFFER < n * size
    whole = pa.concat_tables(got)
    assert [b.num_rows for b in got] == [64, 64, 64, 64, 44]
    assert whole["id"].to_pylist() == t["id"].to_pylist() and whole["image"].to_pylist() == images


def test_a_link_to_an_ancestor_of_the_root_lists_none_of_its_other_folders(tmp_path):
    """train/parent -> .. walked the parent's other folders (a held-out set beside train/) into the training images;
    a link to a folder outside the root that is no ancestor is still followed."""
    (tmp_path / "train").mkdir()
    (tmp_path / "heldout").mkdir()
    (tmp_path / "pool").mkdir()
    (tmp_path / "train" / "a.png").write_bytes(encode_png(logo(0, 16)[0]))
    for i in range(2):
        (tmp_path / "heldout" / f"x{i}.png").write_bytes(encode_png(logo(i + 1, 16)[0]))
    (tmp_path / "pool" / "p.png").write_bytes(encode_png(logo(5, 16)[0]))
    os.symlink("..", tmp_path / "train" / "parent")
    os.symlink("../..", tmp_path / "train" / "grandparent")
    os.symlink("../pool", tmp_path / "train" / "pool")
    assert list_training_set(str(tmp_path / "train"))["id"].to_pylist() == ["a.png", "pool/p.png"]


def _shard(path, n: int = 2) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for name, data in ((f"{i:04d}.png", encode_png(logo(i, 16)[0])), (f"{i:04d}.txt", f"alt {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_users_manifest_beside_tar_shards_is_refused_naming_both(tmp_path):
    """A user's own Parquet manifest among the shards (the subset trained on, recaptioned) was silently ignored: every
    shard image listed with its raw .txt caption. img2dataset's metadata beside the shards is still read past."""
    _shard(tmp_path / "00000.tar")
    _shard(tmp_path / "00001.tar")
    meta = {"key": ["00000"], "url": ["http://x/0.jpg"], "caption": ["c"], "status": ["success"]}
    pq.write_table(pa.table(meta), tmp_path / "00000.parquet")  # img2dataset's, by its shard's name: not read
    pq.write_table(pa.table(meta), tmp_path / "extra_meta.parquet")  # img2dataset-shaped, by its columns
    assert list_training_set(str(tmp_path)).num_rows == 4
    uris = [f"tar://0000.png::{tmp_path}/00000.tar"]
    pq.write_table(pa.table({"id": ["a"], "uri": uris, "caption": ["recaptioned"]}), tmp_path / "train.parquet")
    with pytest.raises(Exception, match=r"holds both \.tar shards and a Parquet file .*train\.parquet.*"
                                        r"Set trainset\.path=.*train\.parquet") as e:
        list_training_set(str(tmp_path))
    assert type(e.value).__name__ == "IngestError"
    assert list_training_set(str(tmp_path / "train.parquet"))["caption"].to_pylist() == ["recaptioned"]


def _hf_like(blob_id: bool):
    """A memory filesystem whose listing gives what Hugging Face's hf:// does: name, size, type and a blob_id that
    follows the content (blob_id=False: the size alone, a store that gives no version)."""
    import hashlib

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class HfLike(MemoryFileSystem):
        protocol = "memexhflike"
        root_marker = "/"

        @classmethod
        def _strip_protocol(cls, path):
            return MemoryFileSystem._strip_protocol(path.removeprefix("memexhflike://"))

        def info(self, path, **kw):
            i = super().info(path, **kw)
            out = {"name": i["name"], "size": i["size"], "type": i["type"]}
            if i["type"] == "file" and blob_id:
                out["blob_id"] = hashlib.sha1(self.cat_file(path)).hexdigest()
            return out

        def find(self, path, *a, detail=False, **kw):
            got = super().find(path, *a, detail=detail, **kw)
            return {k: self.info(k) for k in got} if detail else got

        def ls(self, path, detail=True, **kw):
            return [self.info(e["name"]) for e in super().ls(path, detail=True)] if detail else super().ls(path, False)

    fsspec.register_implementation("memexhflike", HfLike, clobber=True)
    return HfLike()


@pytest.mark.parametrize("blob_id", [True, False])
def test_a_shard_rewritten_at_the_same_size_on_a_store_without_mtimes_is_listed_again(tmp_path, blob_id):
    """hf:// gives no ETag or mtime: a shard's stamp was its size alone, which tar's 10,240-byte records keep across
    a rewrite with other captions, so the kept listing of the old shard was served. Now its blob_id is in the stamp;
    and a stamp of the size alone never serves a kept listing."""
    import io
    import tarfile

    from memex.storage import Store

    def shard(caption: str) -> bytes:
        b = io.BytesIO()
        with tarfile.open(fileobj=b, mode="w") as tar:
            for name, data in (("0001.txt", caption.encode()), ("0001.png", encode_png(logo(0, 16)[0]))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return b.getvalue()

    fs, folder = _hf_like(blob_id), f"/review3-{os.getpid()}-{blob_id}"
    cache = Store(str(tmp_path / "_shard_listings"))
    try:
        fs.pipe(f"{folder}/00000.tar", shard("a photo of a cat"))
        first = list_training_set(f"memexhflike://{folder}", shard_cache=cache)
        fs.pipe(f"{folder}/00000.tar", shard("Mickey Mouse waving, 1928"))  # the same size
        again = list_training_set(f"memexhflike://{folder}", shard_cache=cache)
    finally:
        fs.rm(folder, recursive=True)
    assert first["caption"].to_pylist() == ["a photo of a cat"]
    assert again["caption"].to_pylist() == ["Mickey Mouse waving, 1928"]
    assert (first["stamp"][0].as_py() != again["stamp"][0].as_py()) == blob_id


def test_local_and_s3_stamps_are_unchanged_by_content_ids(tmp_path):
    """The index key hashes the stamps: a local or S3 file's must stay what it was (size + mtime, size + ETag), so
    every index built before is reused; a content id (hf://'s blob_id) is read only where neither is given."""
    import fsspec

    from memex.ingest import _stamp

    (tmp_path / "a.png").write_bytes(b"x" * 10)
    info = fsspec.filesystem("file").info(str(tmp_path / "a.png"))
    assert _stamp(info) == f"10 mtime={info['mtime']}"
    s3 = {"name": "b/a.png", "size": 10, "ETag": '"abc"', "LastModified": "2026-01-01", "blob_id": "f00"}
    assert _stamp(s3) == '10 ETag="abc"'
    assert _stamp({"name": "a", "size": 10, "blob_id": "f00", "last_commit": {"oid": "c1"}}) == "10 blob_id=f00"
    assert _stamp({"name": "a", "size": 10, "lfs": {"sha256": "e3b0", "size": 10}}) == "10 lfs=e3b0"
    assert _stamp({"name": "a", "size": 10}) == "10"
