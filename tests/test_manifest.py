
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memex.images import encode_png
from memex.manifest import DuplicationGroup, ManifestError, expand_duplicates, load_image, read_manifest
from memex.synth import logo

from conftest import REPO


def _manifest(tmp_path, n=12):
    rows = [logo(i, 32) for i in range(n)]
    t = pa.table({"id": [f"i{k}" for k in range(n)], "image": [encode_png(img) for img, _ in rows],
                  "caption": [c for _, c in rows]})
    pq.write_table(t, tmp_path / "m.parquet")
    return tmp_path / "m.parquet", rows


def test_read_and_decode(tmp_path):
    path, rows = _manifest(tmp_path)
    t = read_manifest(str(path))
    assert t.num_rows == 12
    row = t.slice(3, 1).to_pylist()[0]
    assert np.array_equal(load_image(row), rows[3][0])
    assert load_image(row, size=16).shape == (16, 16, 3)


def test_image_by_uri(tmp_path):
    img = logo(0, 32)[0]
    (tmp_path / "a.png").write_bytes(encode_png(img))
    assert np.array_equal(load_image({"id": "a", "uri": str(tmp_path / "a.png")}), img)


def test_relative_uris_are_read_from_the_manifests_folder(tmp_path, monkeypatch):
    """"imgs/0.png" is the manifest's imgs/0.png wherever the reader runs (a Ray worker's working
    directory is another folder): it was opened from the working directory, so every row was
    quarantined as missing. Same on any filesystem, and for a folder of Parquet parts."""
    import fsspec

    from memex.ingest import decode_rows, list_training_set

    imgs = [logo(i, 32)[0] for i in range(3)]
    (tmp_path / "m" / "imgs").mkdir(parents=True)
    other = tmp_path / "elsewhere"  # its own imgs/0.png, a different picture: must not be read
    (other / "imgs").mkdir(parents=True)
    for i, img in enumerate(imgs):
        (tmp_path / "m" / "imgs" / f"{i}.png").write_bytes(encode_png(img))
    (other / "imgs" / "0.png").write_bytes(encode_png(imgs[2]))
    absolute = str(tmp_path / "m" / "imgs" / "2.png")
    pq.write_table(pa.table({"id": ["a", "b", "c"], "uri": ["imgs/0.png", "./imgs/../imgs/1.png", absolute]}),
                   tmp_path / "m" / "train.parquet")
    monkeypatch.chdir(other)
    for path in (tmp_path / "m" / "train.parquet", tmp_path / "m"):  # a file, and a folder of parts
        t = read_manifest(str(path))
        assert t["uri"].to_pylist() == [f"file://{tmp_path}/m/imgs/0.png", f"file://{tmp_path}/m/imgs/1.png", absolute]
        for row, img in zip(t.to_pylist(), imgs):
            assert np.array_equal(load_image(row), img)
        dec = decode_rows(list_training_set(str(path)), None)  # the audit's reader: the same files
        assert dec.quarantine.num_rows == 0 and all(np.array_equal(a, b) for a, b in zip(dec.images, imgs))
    mem = fsspec.filesystem("memory")  # object storage: relative to the manifest's prefix, same protocol
    mem.pipe("/bucket/set/imgs/0.png", encode_png(imgs[0]))
    with mem.open("/bucket/set/train.parquet", "wb") as f:
        pq.write_table(pa.table({"id": ["a"], "uri": ["imgs/0.png"]}), f)
    t = read_manifest("memory://bucket/set/train.parquet")
    (uri,) = t["uri"].to_pylist()
    assert uri.startswith("memory://") and uri.endswith("/bucket/set/imgs/0.png"), uri
    assert np.array_equal(load_image(t.to_pylist()[0]), imgs[0])
    mem.rm("/bucket", recursive=True)


def test_a_hugging_face_image_column_is_read(tmp_path):
    """datasets' Image feature in Parquet (Dataset.to_parquet, the hub's Parquet files) is
    struct<bytes, path>: every reader raised Arrow's "Unsupported cast from struct<bytes: binary,
    path: string> to binary". Its bytes are the image; a row without bytes is read from its path."""
    from memex.ingest import decode_rows, list_training_set

    imgs = [logo(i, 32)[0] for i in range(3)]
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "2.png").write_bytes(encode_png(imgs[2]))
    image = pa.array([{"bytes": encode_png(imgs[0]), "path": "0.png"}, {"bytes": encode_png(imgs[1]), "path": None},
                      {"bytes": None, "path": "kept/2.png"}],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": image, "text": ["x", "y", "z"]}), tmp_path / "hf.parquet")
    t = read_manifest(str(tmp_path / "hf.parquet"))
    assert t["uri"].to_pylist() == [None, None, f"file://{tmp_path}/kept/2.png"]
    for row, img in zip(t.to_pylist(), imgs):
        assert np.array_equal(load_image(row), img)
    dec = decode_rows(list_training_set(str(tmp_path / "hf.parquet"), caption_column="text"), None)
    assert dec.quarantine.num_rows == 0 and all(np.array_equal(a, b) for a, b in zip(dec.images, imgs))
    # a struct that is not datasets' Image is named, with what to give
    pq.write_table(pa.table({"id": ["a"], "image": pa.array([{"pixels": b"x"}])}), tmp_path / "odd.parquet")
    with pytest.raises(ManifestError, match=r"odd.parquet: column 'image' is a struct<pixels: binary>, not encoded"):
        read_manifest(str(tmp_path / "odd.parquet"))


def test_bad_manifests_are_named(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(str(tmp_path / "none.parquet"))
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "image": pa.array([], pa.binary())}),
                   tmp_path / "e.parquet")
    with pytest.raises(ManifestError, match="holds no rows"):
        read_manifest(str(tmp_path / "e.parquet"))
    pq.write_table(pa.table({"name": ["a"]}), tmp_path / "c.parquet")
    with pytest.raises(ManifestError, match="needs an 'id' column"):
        read_manifest(str(tmp_path / "c.parquet"))
    # the common sources of a manifest without ids get their fix: img2dataset (LAION's downloader)
    # writes key and url beside its shards (its key + jpg output is read: tests/test_ingest.py); a
    # Hugging Face dataset has no id
    for columns, fix in [({"key": ["0"], "url": ["http://x/0.jpg"], "status": ["success"]},
                          "looks like img2dataset's metadata, whose images are not in it; give the folder "
                          "img2dataset wrote"),
                         ({"image": [b"x"], "text": ["c"]}, "row numbers will do, table.append_column('id'")]:
        pq.write_table(pa.table(columns), tmp_path / "c.parquet")
        with pytest.raises(ManifestError, match=re.escape(fix)):
            read_manifest(str(tmp_path / "c.parquet"))
    # the ids to fix are named, most repeated first (it said "ids are not unique" and no more)
    pq.write_table(pa.table({"id": ["a", "b", "a", "c", "b", "a"], "image": [b"x"] * 6}), tmp_path / "d.parquet")
    with pytest.raises(ManifestError, match=r"ids are not unique \(2 id\(s\) on several rows: 'a' x3, 'b' x2\)"):
        read_manifest(str(tmp_path / "d.parquet"))
    # a null id is not a repeated one (it was reported as "not unique")
    pq.write_table(pa.table({"id": ["a", None, "b", None], "image": [b"x"] * 4}), tmp_path / "n.parquet")
    with pytest.raises(ManifestError, match=r"2 row\(s\) have no id \(null\), rows \[1, 3\]; give every row"):
        read_manifest(str(tmp_path / "n.parquet"))
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="not readable Parquet"):
        read_manifest(str(tmp_path / "x.parquet"))
    # a folder of images given to `memex train` (which reads manifests only): Arrow's message was
    # "Could not read schema from '.../a.png'. Is this a 'parquet' file?"
    pngs = tmp_path / "pngs"
    (pngs / "sub").mkdir(parents=True)
    (pngs / "sub" / "a.png").write_bytes(encode_png(logo(0, 16)[0]))
    with pytest.raises(ManifestError, match=r"is a folder without a .parquet file \(a.png is not one\): give a "
                                            r"Parquet manifest with columns id, image"):
        read_manifest(str(pngs))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="is an empty folder"):
        read_manifest(str(tmp_path / "empty"))
    parts = tmp_path / "parts"  # a folder of Parquet parts is a manifest
    parts.mkdir()
    for k in range(2):
        pq.write_table(pa.table({"id": [f"p{k}"], "image": [encode_png(logo(k, 16)[0])]}), parts / f"{k}.parquet")
    assert sorted(read_manifest(str(parts))["id"].to_pylist()) == ["p0", "p1"]


def test_an_id_or_image_column_of_the_wrong_kind_is_named(tmp_path):
    """An id column that cannot be text (bytes that are not UTF-8, lists) and an image column of
    text (paths put in 'image', a mix-up with 'uri') are named with the fix before any image is
    read: Arrow raised "Invalid UTF8 payload", and text cast to bytes quarantined every row after
    the index was built."""
    from memex.ingest import IngestError, list_training_set

    png = encode_png(logo(0, 16)[0])
    for ids, typ in ((pa.array([b"\xff\xfe"], pa.binary()), "binary"), (pa.array([[1, 2]]), "list<element: int64>")):
        pq.write_table(pa.table({"id": ids, "image": [png]}), tmp_path / "i.parquet")
        with pytest.raises(ManifestError, match=rf"column 'id' holds {re.escape(typ)} that is not text .*give ids as "
                                                r"strings"):
            read_manifest(str(tmp_path / "i.parquet"))
        with pytest.raises(IngestError, match=r"column 'id' holds"):
            list_training_set(str(tmp_path / "i.parquet"), {}, images=False)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0001.png").write_bytes(png)
    pq.write_table(pa.table({"id": ["a"], "image": ["imgs/0001.png"]}), tmp_path / "s.parquet")
    says = r"column 'image' holds text \(file paths or URLs\?\), not encoded image bytes: name that column 'uri'"
    with pytest.raises(ManifestError, match=says):
        read_manifest(str(tmp_path / "s.parquet"))
    with pytest.raises(IngestError, match=says):
        list_training_set(str(tmp_path / "s.parquet"), {}, images=False)
    pq.write_table(pa.table({"id": ["a"], "uri": ["imgs/0001.png"]}), tmp_path / "s.parquet")  # the fix
    uri = read_manifest(str(tmp_path / "s.parquet"))["uri"].to_pylist()[0]
    assert uri.endswith(str(tmp_path / "imgs" / "0001.png"))


def test_empty_image_bytes_read_the_uri(tmp_path):
    """A row with empty image bytes and a uri is read from its uri by memex train, as the index
    reads it (it said "cannot be decoded")."""
    img = logo(0, 16)[0]
    (tmp_path / "a.png").write_bytes(encode_png(img))
    assert np.array_equal(load_image({"id": "a", "image": b"", "uri": str(tmp_path / "a.png")}), img)
    with pytest.raises(ManifestError, match=r"image 'a' has neither image bytes nor a uri"):
        load_image({"id": "a", "image": b"", "uri": None})


def test_corrupt_image_names_its_id():
    good = encode_png(logo(0, 32)[0])
    with pytest.raises(ManifestError, match="'bad' cannot be decoded"):
        load_image({"id": "bad", "image": good[:40]})
    with pytest.raises(ManifestError, match="neither image bytes nor a uri"):
        load_image({"id": "none", "image": None})


def test_memex_train_names_a_decompression_bomb_and_a_store_error(monkeypatch):
    """PIL's DecompressionBombError (an image over ~179 Mpx) and botocore's errors (not OSError) came out of
    memex train as a traceback, where the audit quarantines the same image."""
    from botocore.exceptions import EndpointConnectionError
    from PIL import Image

    import memex.manifest as manifest

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 = 1024 px > 2 x 100: PIL refuses it
    with pytest.raises(ManifestError, match=r"'big' cannot be decoded: DecompressionBombError"):
        load_image({"id": "big", "image": encode_png(logo(0, 32)[0])})

    def unreachable(uri, opts, version=None):
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    monkeypatch.setattr(manifest, "read_uri", unreachable)
    with pytest.raises(ManifestError, match=r"image 'a': cannot read s3://b/a.png: EndpointConnectionError.*Rerun"):
        load_image({"id": "a", "uri": "s3://b/a.png"})


def test_a_uri_whose_filesystem_is_not_installed_is_named(monkeypatch):
    """memex train on gs:// uris without gcsfs: fsspec's ImportError came out as a Hydra traceback."""
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "absentfs",
                        {"class": "memex_absent_pkg.AbsentFileSystem",
                         "err": "Install memex-absent-pkg to read absentfs"})
    with pytest.raises(ManifestError, match=r"image 'b' at absentfs://bucket/b.png needs a package that is not "
                                            r"installed: Install memex-absent-pkg"):
        load_image({"id": "b", "image": None, "uri": "absentfs://bucket/b.png"})


def test_duplication_schedule_gives_the_stated_counts(tmp_path):
    t = read_manifest(str(_manifest(tmp_path)[0]))
    out = expand_duplicates(t, [DuplicationGroup(copies=5, ids=["i0"]), DuplicationGroup(copies=4, count=3)], seed=1)
    counts = {}
    for s in out["source_id"].to_pylist():
        counts[s] = counts.get(s, 0) + 1
    assert counts["i0"] == 5
    assert sorted(counts.values()) == [1] * 8 + [4] * 3 + [5]
    assert out.num_rows == 8 + 12 + 5
    assert len(set(out["id"].to_pylist())) == out.num_rows  # ids stay unique
    assert out["copies"].to_pylist() == [counts[s] for s in out["source_id"].to_pylist()]
    # copies hold the same bytes and caption as their source
    by_id = {r["id"]: r for r in out.to_pylist()}
    assert by_id["i0#4"]["image"] == by_id["i0"]["image"] and by_id["i0#4"]["caption"] == by_id["i0"]["caption"]
    # the schedule's seed decides which images: same seed, same choice
    again = expand_duplicates(t, [DuplicationGroup(copies=5, ids=["i0"]), DuplicationGroup(copies=4, count=3)], seed=1)
    assert again.equals(out)
    with pytest.raises(ManifestError, match="only 11 are left"):
        expand_duplicates(t, [DuplicationGroup(copies=2, ids=["i0"]), DuplicationGroup(copies=2, count=20)])
    # a negative count used to take all but that many images (free[:-3]): 9 of 12 duplicated
    with pytest.raises(ManifestError, match="count must be >= 0"):
        expand_duplicates(t, [DuplicationGroup(copies=32, count=-3)])
    # an image in two groups used to get the last group's copies, silently
    with pytest.raises(ManifestError, match=r"two groups.*'i0'"):
        expand_duplicates(t, [DuplicationGroup(copies=32, ids=["i0"]), DuplicationGroup(copies=8, ids=["i0", "i1"])])
    with pytest.raises(ManifestError, match=r"two groups.*'i2'"):
        expand_duplicates(t, [DuplicationGroup(copies=32, ids=["i2", "i2"])])



def test_named_ids_are_kept_from_earlier_random_picks_and_copy_names_do_not_collide(tmp_path):
    """A later group's named id is never taken by an earlier group's random pick: that failed as
    "ids in two groups", which the schedule never said, for some seeds (6 of 20 in the review) and
    not others. An id the schedule would give a copy (<id>#<k>) is refused by name: the training
    manifest held two rows of that id, and memex mia then refused it as not unique."""
    t = read_manifest(str(_manifest(tmp_path)[0]))
    first = expand_duplicates(t, [DuplicationGroup(copies=4, count=1)], seed=1)
    chosen = [s for s, c in zip(first["source_id"].to_pylist(), first["copies"].to_pylist()) if c == 4][0]
    for seed in range(20):
        out = expand_duplicates(t, [DuplicationGroup(copies=4, count=1), DuplicationGroup(copies=8, ids=[chosen])],
                                seed=seed)
        counts = dict(zip(out["source_id"].to_pylist(), out["copies"].to_pylist()))
        assert counts[chosen] == 8 and sorted(counts.values()) == [1] * 10 + [4, 8], seed
    hashed = pa.table({"id": ["a", "a#1", "b"], "image": [b"x", b"y", b"z"]})
    with pytest.raises(ManifestError, match=r"ids \['a#1'\] are the names the duplication schedule gives copies"):
        expand_duplicates(hashed, [DuplicationGroup(copies=2, ids=["a"])])
    assert expand_duplicates(hashed, [DuplicationGroup(copies=2, ids=["b"])])["id"].to_pylist() == \
        ["a", "a#1", "b", "b#1"]


def test_synthetic_logos_are_deterministic_and_varied():
    a, cap = logo(5, 32)
    b, cap2 = logo(5, 32)
    assert np.array_equal(a, b) and cap == cap2 and a.shape == (32, 32, 3)
    imgs = [logo(i, 32)[0].astype(float) / 255 for i in range(40)]
    # no two logos are pixel copies of each other (min RMS distance well above the paper's 0.15)
    d = min(np.sqrt(((imgs[i] - imgs[j]) ** 2).mean()) for i in range(40) for j in range(i))
    assert d > 0.05


def test_shipped_demo_data_matches_its_generator(tmp_path):
    t = read_manifest(str(REPO / "demo" / "data" / "logos.parquet"))
    assert t.num_rows == 256
    row = t.slice(7, 1).to_pylist()[0]
    img, cap = logo(7, 32, 0)
    assert row["caption"] == cap and np.array_equal(load_image(row), img)


def test_rows_are_taken_past_arrows_2_gib_offsets(monkeypatch):
    """Arrow's take and sort_by concatenate a column's chunks, and a binary column's offsets are 32-bit:
    over 2 GiB of image bytes (a whole read for memex train or memex mia, the copies of a duplication
    schedule) failed with "offset overflow while concatenating arrays" (reproduced at 2.1 GiB: 17
    chunks of one 128 MiB value). take_rows goes through the 64-bit types and cuts the result back
    into chunks under the limit, in the table's own schema. The limits are lowered here so that a
    small table takes that path: the same rows as Arrow's take, every chunk under the limit."""
    import numpy as np
    import pyarrow as pa

    from memex import manifest

    rng = np.random.default_rng(0)
    blobs = [bytes(rng.integers(0, 256, int(n), dtype=np.uint8)) for n in rng.integers(1, 300, 40)]
    table = pa.table({"id": pa.chunked_array([[f"r{i}" for i in range(20)], [f"r{i}" for i in range(20, 40)]]),
                      "image": pa.chunked_array([blobs[:20], blobs[20:]], pa.binary()),
                      "n": pa.array(range(40), pa.int32())})
    order = rng.permutation(40)
    want = table.take(order)
    monkeypatch.setattr(manifest, "ARROW_OFFSET_LIMIT", 1000)
    monkeypatch.setattr(manifest, "TAKE_CHUNK_BYTES", 600)
    got = manifest.take_rows(table, order)
    assert got.schema == table.schema and got.equals(want)
    assert all(sum(len(v) for v in c.to_pylist()) <= 600 or len(c) == 1 for c in got["image"].chunks)
    assert got["image"].num_chunks > 1
