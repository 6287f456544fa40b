import io
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memex.images import encode_png, resize
from memex.ingest import QUARANTINE_SCHEMA, TRAINING_SCHEMA, IngestError, decode_rows, iter_batches, list_training_set
from memex.synth import logo


def _img(i: int, size: int = 32) -> np.ndarray:
    return logo(i, size)[0]


def _manifest(tmp_path):
    """Two good byte rows, one good uri row, and one of each kind of bad row."""
    (tmp_path / "on_disk.png").write_bytes(encode_png(_img(2)))
    (tmp_path / "empty.png").write_bytes(b"")
    good = encode_png(_img(0))
    rows = [  # (id, image, uri, caption)
        ("g0", good, None, "first"),
        ("g1", encode_png(_img(1, 24)), None, None),  # another size: decode_rows(size=...) must resize it
        ("g2", None, str(tmp_path / "on_disk.png"), "by uri"),
        ("bad_bytes", b"definitely not an image", None, "x"),
        ("truncated", good[: len(good) // 2], None, "x"),
        ("missing", None, str(tmp_path / "nope.png"), "x"),
        ("empty", None, str(tmp_path / "empty.png"), "x"),
        ("nothing", None, None, "x"),
    ]
    t = pa.table({"id": [r[0] for r in rows], "image": [r[1] for r in rows], "uri": [r[2] for r in rows],
                  "text": [r[3] for r in rows], "copies": [1] * len(rows)})
    pq.write_table(t, tmp_path / "m.parquet")
    return str(tmp_path / "m.parquet"), {"g0": _img(0), "g1": _img(1, 24), "g2": _img(2)}


def test_manifest_good_rows_decode_and_bad_rows_are_quarantined(tmp_path):
    path, originals = _manifest(tmp_path)
    t = list_training_set(path, caption_column="text")
    assert t.schema.equals(TRAINING_SCHEMA)  # extra columns dropped, caption renamed
    assert t["id"].to_pylist() == sorted(t["id"].to_pylist()) and t.num_rows == 8
    assert dict(zip(t["id"].to_pylist(), t["caption"].to_pylist()))["g0"] == "first"

    dec = decode_rows(t, None)
    assert dec.ids == ["g0", "g1", "g2"]
    for i, img in zip(dec.ids, dec.images):
        assert img.dtype == np.uint8 and np.array_equal(img, originals[i])
    q = {r["id"]: r for r in dec.quarantine.to_pylist()}
    assert dec.quarantine.schema.equals(QUARANTINE_SCHEMA)
    assert set(q) == {"bad_bytes", "truncated", "missing", "empty", "nothing"}
    assert q["bad_bytes"]["reason"].startswith("UnidentifiedImageError")
    assert "truncated" in q["truncated"]["reason"]
    assert q["missing"]["reason"].startswith("FileNotFoundError") and q["missing"]["uri"].endswith("nope.png")
    assert "empty file" in q["empty"]["reason"]
    assert "neither image bytes nor a uri" in q["nothing"]["reason"] and q["nothing"]["uri"] is None

    small = decode_rows(t, 16, workers=1)  # same result without threads
    assert small.images.shape == (3, 16, 16, 3) and small.images.dtype == np.uint8
    for i, img in zip(small.ids, small.images):
        assert np.array_equal(img, resize(originals[i], 16))
    assert small.quarantine.equals(dec.quarantine)


def test_manifest_caption_defaults_to_null(tmp_path):
    path, _ = _manifest(tmp_path)
    t = list_training_set(path)  # the manifest has no "caption" column
    assert t["caption"].null_count == t.num_rows


def test_decompression_bomb_is_quarantined(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 = 1024 px > 2 x 100: PIL refuses it
    rows = pa.table({"id": ["bomb"], "image": [encode_png(_img(0))]})
    dec = decode_rows(rows, 32)
    assert dec.ids == [] and dec.images.shape == (0, 32, 32, 3)
    assert dec.quarantine["reason"][0].as_py().startswith("DecompressionBombError")


def _write_folder(fs, root: str) -> dict[str, np.ndarray]:
    """Images (two suffixes, one upper case, one in a subfolder), a sidecar caption, a corrupt file, a non-image."""
    fs.makedirs(f"{root}/sub", exist_ok=True)
    fs.pipe_file(f"{root}/a.png", encode_png(_img(0)))
    fs.pipe_file(f"{root}/a.txt", "a red ring logo\n".encode())
    buf = io.BytesIO()
    Image.fromarray(_img(1)).save(buf, format="BMP")
    fs.pipe_file(f"{root}/sub/b.bmp", buf.getvalue())
    fs.pipe_file(f"{root}/d.PNG", encode_png(_img(3)))
    fs.pipe_file(f"{root}/c.png", b"\x89PNG garbage")
    fs.pipe_file(f"{root}/notes.md", b"not an image")
    return {"a.png": _img(0), "sub/b.bmp": _img(1), "d.PNG": _img(3)}


def _check_folder(path: str, protocol: str, originals: dict, opts: dict | None = None):
    t = list_training_set(path, opts)
    assert t.schema.equals(TRAINING_SCHEMA)
    assert t["id"].to_pylist() == ["a.png", "c.png", "d.PNG", "sub/b.bmp"]
    assert all(u.startswith(protocol + "://") and u.endswith(i)
               for i, u in zip(t["id"].to_pylist(), t["uri"].to_pylist()))
    assert t["caption"].to_pylist() == ["a red ring logo", None, None, None]
    assert t["image"].null_count == t.num_rows
    dec = decode_rows(t, 32, opts)
    assert dec.ids == ["a.png", "d.PNG", "sub/b.bmp"]
    for i, img in zip(dec.ids, dec.images):
        assert np.array_equal(img, originals[i])
    assert dec.quarantine["id"].to_pylist() == ["c.png"]
    assert dec.quarantine["uri"][0].as_py().startswith(protocol + "://")


def test_local_folder(tmp_path):
    originals = _write_folder(fsspec.filesystem("file"), str(tmp_path / "imgs"))
    _check_folder(str(tmp_path / "imgs"), "file", originals)


def test_memory_folder():
    root = f"/memex-{uuid.uuid4().hex}"
    originals = _write_folder(fsspec.filesystem("memory"), root)
    _check_folder(f"memory://{root}", "memory", originals)


def test_s3_folder(s3_server, bucket):
    fs = fsspec.filesystem("s3", **s3_server)
    originals = _write_folder(fs, f"{bucket}/train/imgs")
    _check_folder(f"s3://{bucket}/train/imgs", "s3", originals, s3_server)
    # a prefix holding Parquet is a manifest
    fs.pipe_file(f"{bucket}/m/part-0.parquet", _parquet_bytes(pa.table({"id": ["x"], "image": [encode_png(_img(5))]})))
    t = list_training_set(f"s3://{bucket}/m", s3_server)
    assert t["id"].to_pylist() == ["x"]
    assert np.array_equal(decode_rows(t, None).images[0], _img(5))
    with pytest.raises(IngestError, match=f"s3://{bucket}/absent does not exist"):
        list_training_set(f"s3://{bucket}/absent", s3_server)


def _parquet_bytes(t: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink)
    return sink.getvalue().to_pybytes()


def test_folder_with_parquet_files_is_a_manifest(tmp_path):
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.table({"id": ["b", "a"], "image": [encode_png(_img(1)), encode_png(_img(0))]}),
                   tmp_path / "ds" / "p0.parquet")
    t = list_training_set(str(tmp_path / "ds"))
    assert t["id"].to_pylist() == ["a", "b"]  # sorted by id
    (tmp_path / "ds" / "stray.png").write_bytes(encode_png(_img(2)))  # ambiguous: fails naming the stray file
    with pytest.raises(IngestError, match="ds is not readable Parquet.*stray.png"):
        list_training_set(str(tmp_path / "ds"))


def test_bad_locations_name_the_path(tmp_path):
    with pytest.raises(IngestError, match=f"{tmp_path}/nowhere does not exist"):
        list_training_set(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(IngestError, match=f"{tmp_path}/empty holds no images"):
        list_training_set(str(tmp_path / "empty"))
    pq.write_table(pa.table({"name": ["a"]}), tmp_path / "cols.parquet")
    with pytest.raises(IngestError, match=r"cols.parquet needs an 'id' column"):
        list_training_set(str(tmp_path / "cols.parquet"))
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "uri": pa.array([], pa.string())}),
                   tmp_path / "e.parquet")
    with pytest.raises(IngestError, match="e.parquet holds no rows"):
        list_training_set(str(tmp_path / "e.parquet"))
    (tmp_path / "one.png").write_bytes(encode_png(_img(0)))
    with pytest.raises(IngestError, match="one.png is a file but not a .parquet manifest"):
        list_training_set(str(tmp_path / "one.png"))
    with pytest.raises(IngestError, match="nosuchproto://x cannot be reached"):
        list_training_set("nosuchproto://x")
    down = {"key": "k", "secret": "s", "config_kwargs": {"retries": {"max_attempts": 1}},
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9",  # port 9: nothing listens
                              "region_name": "us-east-1"}}
    with pytest.raises(IngestError, match="s3://b/x cannot be reached: EndpointConnectionError"):
        list_training_set("s3://b/x", down)


def test_iter_batches_covers_every_row_once():
    t = pa.table({"id": [str(i) for i in range(10)]})
    parts = list(iter_batches(t, 4))
    assert [p.num_rows for p in parts] == [4, 4, 2]
    assert pa.concat_tables(parts).equals(t)
    with pytest.raises(IngestError, match="batch_rows must be >= 1"):
        list(iter_batches(t, 0))
