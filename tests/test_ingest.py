import io
import json
import os
import shutil
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memex.images import decode, encode_png, resize
from memex.ingest import (
    QUARANTINE_SCHEMA,
    TRAINING_SCHEMA,
    IngestError,
    decode_rows,
    fetch_bytes,
    iter_batches,
    list_training_set,
    row_bytes,
)
from memex.manifest import ManifestError, read_manifest
from memex.storage import StorageError
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


def _png16(picture: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG of an 8-bit picture: v * 257 (0 -> 0, 255 -> 65535), as an export at 16 bits."""
    buf = io.BytesIO()
    Image.fromarray(picture.astype(np.uint16) * 257).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    return buf.getvalue()


def test_16_bit_png_decodes_to_its_picture_and_matches_it(tmp_path):
    """A 16-bit grayscale PNG in a training folder decodes to the picture (PIL's convert showed all
    white), at full size (match's training pixels) and fitted (index shards), and verifies at
    distance 0 against an 8-bit generation of the same picture."""
    from memex.config import DistanceKind
    from memex.images import decode
    from memex.stages.match import pixel_distances

    picture = _img(4)[..., 1]  # a logo's green channel: a grayscale picture with structure
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "deep.png").write_bytes(_png16(picture))
    (tmp_path / "imgs" / "flat.png").write_bytes(encode_png(picture))
    t = list_training_set(str(tmp_path / "imgs"))
    full, fitted = decode_rows(t, None), decode_rows(t, 16)
    assert full.ids == fitted.ids == ["deep.png", "flat.png"] and full.quarantine.num_rows == 0
    want = np.repeat(picture[..., None], 3, axis=2)
    assert np.array_equal(full.images[0], want) and (full.images[0] != 255).any()
    assert np.array_equal(fitted.images[0], fitted.images[1])  # the index embeds the same square
    gen = encode_png(picture[..., None])  # a grayscale model's generation of that picture
    d = pixel_distances(decode(gen), full.images, DistanceKind.tiled_l2, "center_crop")
    assert d.tolist() == [0.0, 0.0]
    white = pixel_distances(decode(gen), [np.full_like(want, 255)], DistanceKind.tiled_l2, "center_crop")
    assert white[0] > 0.1  # what the all-white decode scored: never a match


def test_image_without_a_display_conversion_is_quarantined_naming_its_mode():
    def tiff(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="TIFF")
        return buf.getvalue()
    rows = pa.table({"id": ["lab", "floats", "ok"],
                     "image": [tiff(Image.frombytes("LAB", (4, 4), bytes(48))),
                               tiff(Image.fromarray(np.full((4, 4), 200, np.float32))),  # 0..255 floats
                               _png16(_img(0)[..., 0])]})
    for size in (None, 8):
        dec = decode_rows(rows, size)
        assert dec.ids == ["ok"]
        reasons = dict(zip(dec.quarantine["id"].to_pylist(), dec.quarantine["reason"].to_pylist()))
        assert reasons["lab"].startswith("UnsupportedImageError: mode 'LAB' has no display conversion")
        assert reasons["floats"].startswith("UnsupportedImageError: mode 'F' samples span [200, 200]")


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


def test_tiff_and_jfif_files_of_an_image_folder_are_training_images(tmp_path):
    """images.decode reads TIFF (scans, archives' masters) and .jfif is JPEG under another suffix (what
    browsers save): an image folder's .tif/.tiff/.jfif files were left out of the listing without a word."""
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    for name, fmt in (("scan.tif", "TIFF"), ("master.TIFF", "TIFF"), ("saved.jfif", "JPEG"), ("a.png", "PNG")):
        Image.fromarray(_img(len(name))).save(root / name, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    t = list_training_set(str(root))
    assert t["id"].to_pylist() == ["a.png", "master.TIFF", "saved.jfif", "scan.tif"]
    dec = decode_rows(t, None)
    assert dec.quarantine.num_rows == 0
    assert np.array_equal(dec.images[dec.ids.index("scan.tif")], _img(len("scan.tif")))  # TIFF: lossless


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


def test_an_imagefolder_metadata_file_gives_the_captions(tmp_path):
    """Hugging Face's imagefolder layout, what diffusers' fine-tuning scripts train on: a
    metadata.jsonl (or .csv) of file_name + caption columns, file_name relative to its folder.
    It was ignored: every caption null, and the audit's caption-ranked prompts failed after the
    index build. Metadata comes first; a sidecar <stem>.txt still captions what it does not."""
    fs, root = fsspec.filesystem("file"), str(tmp_path / "set")
    fs.makedirs(f"{root}/train/sub", exist_ok=True)
    fs.makedirs(f"{root}/extra", exist_ok=True)
    for name in ("train/0.png", "train/sub/1.png", "train/2.png", "extra/3.png", "extra/4.png"):
        fs.pipe_file(f"{root}/{name}", encode_png(_img(len(name))))
    fs.pipe_file(f"{root}/train/metadata.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"file_name": "0.png", "text": "a red\u2028logo"}, {"file_name": "sub/1.png", "text": " a blue logo "},
        {"file_name": "2.png", "text": None}]).encode())  # U+2028 raw in a JSON string: valid, and one line
    fs.pipe_file(f"{root}/train/2.txt", b"a sidecar caption")
    fs.pipe_file(f"{root}/extra/metadata.csv", "\ufefffile_name,text\n3.png,\"a green, round logo\"\n".encode())
    t = list_training_set(root, caption_column="text")
    assert dict(zip(t["id"].to_pylist(), t["caption"].to_pylist())) == {
        "extra/3.png": "a green, round logo", "extra/4.png": None, "train/0.png": "a red\u2028logo",
        "train/2.png": "a sidecar caption", "train/sub/1.png": "a blue logo"}
    assert list_training_set(root)["caption"].to_pylist() == [None, None, None, "a sidecar caption", None]
    # the metadata is part of the listing, so of the index key: a caption edited is a new index
    fs.pipe_file(f"{root}/extra/metadata.csv", b"file_name,text\n3.png,another caption\n")
    assert list_training_set(root, caption_column="text")["caption"][0].as_py() == "another caption"
    from memex.ingest import read_folder_metadata  # old Mac line ends (\r alone): one row a line, as \n and \r\n

    fs.pipe_file(f"{root}/cr.jsonl", b'{"file_name": "a.png"}\r{"file_name": "b.png"}\r\n{"file_name": "c.png"}')
    assert [r["file_name"] for r in read_folder_metadata(fs, f"{root}/cr.jsonl")] == ["a.png", "b.png", "c.png"]
    fs.rm(f"{root}/cr.jsonl")
    # several captions an image (a JSON list): the first non-empty one, as a manifest's list column gives
    fs.pipe_file(f"{root}/train/metadata.jsonl", "\n".join(json.dumps(r) for r in [
        {"file_name": "0.png", "text": ["a red cat", "a cat"]}, {"file_name": "2.png", "text": ["", "a dog"]},
        {"file_name": "sub/1.png", "text": []}]).encode())
    t = list_training_set(root, caption_column="text")
    got = dict(zip(t["id"].to_pylist(), t["caption"].to_pylist()))
    assert [got[f"train/{f}"] for f in ("0.png", "2.png", "sub/1.png")] == ["a red cat", "a dog", None]
    for bad, message in [(b'{"file_name": "0.png"}\n{oops', "metadata.jsonl line 2 is not valid JSON"),
                         (b'{"text": "no file"}', "metadata.jsonl row 1 has no file_name"),
                         (b'{"file_name": "0.png", "text": {"en": "a cat"}}',
                          r"metadata.jsonl row 1: text is a JSON object, not a caption .* trainset.caption_column")]:
        fs.pipe_file(f"{root}/train/metadata.jsonl", bad)
        with pytest.raises(IngestError, match=message):
            list_training_set(root, caption_column="text")


def test_a_caption_column_of_several_captions_gives_the_first_and_other_types_are_named(tmp_path):
    """COCO-style manifests hold several captions an image (list<string>): Arrow's cast raised
    "Unsupported cast from list<element: string> to utf8" as a traceback, after the preflight. The
    first caption is the image's; a column that is not text (a struct) is named with its type."""
    img = encode_png(_img(0))
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": [img] * 3,
                             "captions": [["a red logo", "a logo, red"], [], None],
                             "meta": [{"w": 1}] * 3, "pixels": [1, 2, 3]}), tmp_path / "coco.parquet")
    t = list_training_set(str(tmp_path / "coco.parquet"), caption_column="captions")
    assert t["caption"].to_pylist() == ["a red logo", None, None]
    with pytest.raises(IngestError, match=r"^members.path=.*coco.parquet: column 'meta' holds struct<w: int64>, not "
                                          r"string \(set members.caption_column to a text column\)$"):
        list_training_set(str(tmp_path / "coco.parquet"), caption_column="meta", key="members.path")
    pq.write_table(pa.table({"id": ["a"], "image": [1]}), tmp_path / "ints.parquet")
    with pytest.raises(IngestError, match=r"column 'image' holds int64, not binary \(encoded image bytes\)"):
        list_training_set(str(tmp_path / "ints.parquet"))


def _write_shards(fs, root: str) -> dict[str, np.ndarray]:
    """Two WebDataset shards as img2dataset writes them: <key>.jpg/.png + .txt + .json per sample,
    and a metadata .parquet beside each .tar; one image member is corrupt, one sample has no caption."""
    import tarfile

    originals = {}
    for shard, keys in (("00000", range(0, 3)), ("00001", range(3, 5))):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for k in keys:
                image = b"\x89PNG garbage" if k == 4 else encode_png(_img(k))
                members = [(f"{k:09d}.png", image), (f"{k:09d}.json", json.dumps({"key": k}).encode())]
                if k != 1:
                    members.append((f"{k:09d}.txt", f"caption {k}\n".encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                if k != 4:
                    originals[f"{shard}.tar/{k:09d}.png"] = _img(k)
        fs.pipe_file(f"{root}/{shard}.tar", buf.getvalue())
        fs.pipe_file(f"{root}/{shard}.parquet", _parquet_bytes(pa.table({"key": [f"{k:09d}" for k in keys]})))
    return originals


def _laion_folder(where: str, tmp_path, request) -> tuple[dict, fsspec.AbstractFileSystem, str, str]:
    """(storage options, filesystem, its path, the URI a user gives) of an empty laion/ folder, local
    or in a moto bucket."""
    if where == "s3":
        opts, b = request.getfixturevalue("s3_server"), request.getfixturevalue("bucket")
        return opts, fsspec.filesystem("s3", **opts), f"{b}/laion", f"s3://{b}/laion"
    root = str(tmp_path / "laion")
    fs = fsspec.filesystem("file")
    fs.makedirs(root)
    return {}, fs, root, root


@pytest.mark.parametrize("where", ["local", "s3"])
def test_webdataset_shards_are_read_member_by_member(tmp_path, where, request, monkeypatch):
    """LAION's layout (img2dataset's webdataset output): a folder of .tar shards, a sample's image,
    caption (.txt) and metadata as members sharing a key. It was read as the manifest its metadata
    .parquet files make ("needs an 'id' column"). Each image member is a row, read on the decoder's
    threads with one ranged read of its shard (memex/shards.py)."""
    opts, fs, root, path = _laion_folder(where, tmp_path, request)
    originals = _write_shards(fs, root)
    t = list_training_set(path, opts)
    assert t["id"].to_pylist() == [f"00000.tar/{k:09d}.png" for k in range(3)] + \
        [f"00001.tar/{k:09d}.png" for k in (3, 4)]
    assert t["caption"].to_pylist() == ["caption 0", None, "caption 2", "caption 3", "caption 4"]
    assert t["uri"][0].as_py() == f"tar://000000000.png::{fs.unstrip_protocol(root + '/00000.tar')}"
    assert t["stamp"].null_count == 0
    # the listings kept beside the index, in the same store (S3 here too): a second listing reads no shard
    import memex.ingest as ingest
    from memex.storage import Store

    cache = Store(path.rsplit("/", 1)[0] + "/_index/_shard_listings", opts)
    assert list_training_set(path, opts, shard_cache=cache).equals(t)
    monkeypatch.setattr(ingest, "shard_samples", lambda *a: pytest.fail("a shard was read again"))
    assert list_training_set(path, opts, shard_cache=cache).equals(t)
    monkeypatch.undo()
    dec = decode_rows(t, None, opts)
    assert dec.ids == sorted(originals) and all(np.array_equal(a, originals[i]) for i, a in zip(dec.ids, dec.images))
    assert dec.quarantine["id"].to_pylist() == ["00001.tar/000000004.png"]
    from memex.manifest import load_image

    assert np.array_equal(load_image(t.to_pylist()[2], None, opts), originals["00000.tar/000000002.png"])
    # one shard given alone (a first look at a LAION part) lists as the folder holding only it did:
    # it was "is a file but not a .parquet manifest"
    one = list_training_set(f"{path}/00001.tar", opts)
    assert one.equals(t.filter(pc.starts_with(t["id"], "00001.tar/")))
    fs.pipe_file(f"{root}/00002.tar", b"not a tar at all" * 100)
    with pytest.raises(IngestError, match=r"shard .*00002.tar is not a readable tar"):
        list_training_set(f"{path}/00002.tar", opts)
    with pytest.raises(IngestError, match=r"shard .*00002.tar is not a readable tar"):
        list_training_set(path, opts)
    fs.rm(f"{root}/00002.tar")
    import memex.ingest as ingest

    def timed_out(*a):
        raise TimeoutError("read timed out")

    with monkeypatch.context() as m:  # the store's failure, not the shard's: no "move it out", which drops it
        m.setattr(ingest, "shard_samples", timed_out)
        with pytest.raises(StorageError, match=r"cannot read shard .*00001.tar \(TimeoutError: read timed out\): a "
                                               r"storage problem, not a damaged shard; rerun to retry it"):
            list_training_set(f"{path}/00001.tar", {**opts})
    fs.makedirs(f"{root}/extra", exist_ok=True)
    fs.pipe_file(f"{root}/extra/a.png", encode_png(_img(9)))  # shards and loose images: which one is meant?
    with pytest.raises(IngestError, match=r"holds both .tar shards and image files \(.*extra/a.png\)"):
        list_training_set(path, opts)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_shards_named_by_a_pattern_are_the_training_set(tmp_path, where, request):
    """WebDataset names a set of shards with braces (laion/{00000..00099}.tar), and a glob picks some.
    Such a trainset.path was "does not exist". The shards it names are read, with the ids the folder
    gives them; a shard it names that is missing, or a pattern of anything but shards, is named."""
    from memex.stages.audit import ConfigError, check_trainset

    opts, fs, root, path = _laion_folder(where, tmp_path, request)
    _write_shards(fs, root)
    whole = list_training_set(path, opts)
    for pattern in ("{00000..00001}.tar", "*.tar", "0000[01].tar", "{00000,00001}.tar"):
        got = list_training_set(f"{path}/{pattern}", opts)
        assert got.equals(whole), pattern
        check_trainset(f"{path}/{pattern}", opts)  # the audit's preflight takes it too
    one = list_training_set(f"{path}/{{00001..00001}}.tar", opts)
    assert one["id"].to_pylist() == ["00001.tar/000000003.png", "00001.tar/000000004.png"]
    with pytest.raises(IngestError, match=r"names 2 shard\(s\) that do not exist \(e.g. .*00002.tar\), of 4"):
        list_training_set(f"{path}/{{00000..00003}}.tar", opts)
    with pytest.raises(ConfigError, match=r"^trainset.path=.* names 1 shard\(s\) that do not exist .*9\*.tar"):
        check_trainset(f"{path}/9*.tar", opts)
    with pytest.raises(IngestError, match=r"as a pattern, memex reads only WebDataset shards"):
        list_training_set(f"{path}/*.png", opts)


def _img2dataset(fs, root: str, output_format: str) -> dict[str, np.ndarray]:
    """What img2dataset (rom1504/img2dataset, LAION's downloader) writes for one shard of 4 urls, the
    last of which failed to download: output_format=files puts 00000/<key>.jpg, .txt (caption) and
    .json beside a metadata 00000.parquet; output_format=parquet writes 00000.parquet with the
    metadata columns + jpg (null where the download failed). Both write 00000_stats.json."""
    fs.makedirs(f"{root}/00000", exist_ok=True)
    keys = [f"00000{k:04d}" for k in range(4)]
    meta = {"key": keys, "url": [f"http://x/{k}.jpg" for k in keys], "caption": [f"a photo {k}" for k in range(4)],
            "status": ["success"] * 3 + ["failed_to_download"], "error_message": [None] * 3 + ["timeout"],
            "width": [16] * 3 + [None], "height": [12] * 3 + [None]}
    originals, jpgs = {}, []
    for k in range(3):
        buf = io.BytesIO()
        Image.fromarray(np.full((12, 16, 3), 40 * k + 20, np.uint8)).save(buf, format="JPEG", quality=95)
        jpgs.append(buf.getvalue())
        originals[keys[k]] = decode(buf.getvalue())
    if output_format == "files":
        for k in range(3):
            fs.pipe_file(f"{root}/00000/{keys[k]}.jpg", jpgs[k])
            fs.pipe_file(f"{root}/00000/{keys[k]}.txt", f"a photo {k}".encode())
            fs.pipe_file(f"{root}/00000/{keys[k]}.json", json.dumps({"key": keys[k]}).encode())
        fs.pipe_file(f"{root}/00000.parquet", _parquet_bytes(pa.table(meta)))
    else:
        fs.pipe_file(f"{root}/00000.parquet", _parquet_bytes(pa.table({**meta, "jpg": jpgs + [None]})))
    fs.pipe_file(f"{root}/00000_stats.json", json.dumps({"count": 4, "successes": 3}).encode())
    return originals


@pytest.mark.parametrize("output_format", ["files", "parquet"])
def test_img2dataset_output_is_a_training_set(tmp_path, output_format, monkeypatch):
    """img2dataset's default output (files) was refused as "img2dataset's metadata, whose images lie
    in the shards beside it", and its parquet output as "rename key and jpg to id and image". The
    files are an image folder now (captions from <key>.txt), the parquet a manifest (key -> id,
    jpg -> image), and its failed downloads are left out."""
    from memex.stages.audit import ConfigError, check_trainset

    fs, root = fsspec.filesystem("file"), str(tmp_path / "laion")
    originals = _img2dataset(fs, root, output_format)
    t = list_training_set(root, {})
    prefix = "00000/" if output_format == "files" else ""
    suffix = ".jpg" if output_format == "files" else ""
    assert t["id"].to_pylist() == [f"{prefix}{k}{suffix}" for k in sorted(originals)]
    assert t["caption"].to_pylist() == [f"a photo {k}" for k in range(3)]
    dec = decode_rows(t, None)
    assert dec.quarantine.num_rows == 0 and all(np.array_equal(a, b) for a, b in zip(dec.images, originals.values()))
    check_trainset(root, {}, "caption")  # the audit's preflight takes it, captions and all
    if output_format == "files":  # captions from each shard's metadata .parquet: no request per <key>.txt
        read = []
        cat = fsspec.implementations.local.LocalFileSystem.cat_file
        monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "cat_file",
                            lambda self, p, *a, **k: read.append(p) or cat(self, p, *a, **k))
        assert list_training_set(root, {}).equals(t) and not [p for p in read if p.endswith(".txt")]
        monkeypatch.undo()
    if output_format == "files":  # the metadata without its images is still named as such
        fs.rm(f"{root}/00000", recursive=True)
        with pytest.raises(ConfigError, match=r"00000.parquet needs an 'id' column .* img2dataset's metadata"):
            check_trainset(root, {}, "caption")
        with pytest.raises(IngestError, match=r"looks like img2dataset's metadata, whose images are not in it"):
            list_training_set(root, {})
    else:  # a shard whose every download failed holds no training image
        meta = pq.read_table(f"{root}/00000.parquet").drop(["jpg"])
        pq.write_table(meta.append_column("jpg", pa.nulls(4, pa.binary())), f"{root}/00000.parquet")
        with pytest.raises(IngestError, match=r"img2dataset's output with no image: every one of its 4 rows failed"):
            list_training_set(root, {})


HF_DATA = os.path.join(os.path.dirname(__file__), "data", "hf_datasets")  # written by datasets 5.2.0 (its README)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_hugging_face_save_to_disk_folder_is_a_training_set(tmp_path, where, request):
    """`Dataset.save_to_disk` writes Arrow streams listed by state.json, images as datasets' Image
    struct {bytes, path}. It was "holds no images and no .parquet manifest". It reads as a manifest
    now (the audit, memex train and memex mia); a DatasetDict names its splits, a dataset without ids
    the datasets call that adds them, one Arrow file its folder."""
    from memex.manifest import ManifestError, read_manifest
    from memex.stages.audit import ConfigError, check_trainset

    if where == "s3":
        opts, b = request.getfixturevalue("s3_server"), request.getfixturevalue("bucket")
        fs = fsspec.filesystem("s3", **opts)
        fs.put(HF_DATA, f"{b}/hf", recursive=True)
        root = f"s3://{b}/hf"
    else:
        opts, root = {}, HF_DATA
    rng = np.random.default_rng(0)
    originals = [rng.integers(0, 255, (12 + 2 * i, 16, 3), dtype=np.uint8) for i in range(4)]

    t = list_training_set(f"{root}/with_ids", opts, "text")
    assert t["id"].to_pylist() == [f"img-{i}" for i in range(4)]
    assert t["caption"].to_pylist() == [f"a photo {i}" for i in range(4)]
    dec = decode_rows(t, None, opts)
    assert dec.quarantine.num_rows == 0 and all(np.array_equal(a, b) for a, b in zip(dec.images, originals))
    assert read_manifest(f"{root}/with_ids", opts)["id"].to_pylist() == t["id"].to_pylist()  # memex train's reader
    # the index's listing streams the Arrow file a record batch at a time: the same rows, key and train rows
    from memex.ingest import IMAGE_SHA256, iter_train_rows
    from memex.stages.index import index_key

    streamed = list_training_set(f"{root}/with_ids", opts, "text", images=False)
    assert IMAGE_SHA256 in streamed.column_names and streamed["image"].null_count == 4
    assert streamed.drop_columns(["image", IMAGE_SHA256]).equals(t.drop_columns(["image"]))
    cfg = _audit_cfg(f"{root}/with_ids", tmp_path / "runs")
    assert index_key(streamed, cfg) == index_key(t, cfg)
    rows = pa.concat_tables(iter_train_rows(f"{root}/with_ids", opts, streamed, batch_rows=3))
    assert rows["image"].to_pylist() == t["image"].to_pylist() and rows["gid"].to_pylist() == [0, 1, 2, 3]
    check_trainset(f"{root}/with_ids", opts, "text")  # the audit's preflight reads the schema alone
    with pytest.raises(ConfigError, match=r"the dataset has no 'caption' column .* \(columns: \['id', 'image', 'text'"):
        check_trainset(f"{root}/with_ids", opts, "caption")

    for bad, match in [("no_ids", r"needs an 'id' column .* ds.add_column\('id', .*save_to_disk"),
                       ("dict", r"is a Hugging Face DatasetDict \(splits: train, test\): give one split's folder, "
                                r"e.g. .*dict/train")]:
        with pytest.raises(IngestError, match=match):
            list_training_set(f"{root}/{bad}", opts, "text")
        with pytest.raises((ConfigError, ManifestError), match=r"^trainset.path=.*" + bad + ".*" + match):
            check_trainset(f"{root}/{bad}", opts, "text")
    with pytest.raises(IngestError, match=r"is one Arrow file: give the folder Dataset.save_to_disk wrote \(.*ids\)"):
        list_training_set(f"{root}/with_ids/data-00000-of-00001.arrow", opts)
    # its captions as prompts (prompts=captions), or a prompt dataset saved the same way (prompts=file)
    from memex.config import PromptsConfig, PromptSource
    from memex.prompts import PromptError, load_prompts

    for source, column in [(PromptSource.captions, {"caption_column": "text"}),
                           (PromptSource.file, {"column": "text"})]:
        got = load_prompts(PromptsConfig(source=source, path=f"{root}/no_ids", **column), opts)
        assert sorted(got["prompt"].to_pylist()) == [f"a photo {i}" for i in range(4)]
    with pytest.raises(PromptError, match=r"^prompts.path=.*dict is a Hugging Face DatasetDict"):
        load_prompts(PromptsConfig(source=PromptSource.file, path=f"{root}/dict", column="text"), opts)
    if where == "local":  # a copy that lost its Arrow file
        shutil.copytree(f"{root}/with_ids", tmp_path / "partial")
        os.remove(tmp_path / "partial" / "data-00000-of-00001.arrow")
        with pytest.raises(IngestError, match=r"state.json lists Arrow files that are missing"):
            list_training_set(str(tmp_path / "partial"), opts)


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
    # an image beside the parts (one a relative uri may point at) is not a row, and is not read as
    # Parquet (pyarrow read every file of the folder: "not readable Parquet ... stray.png")
    (tmp_path / "ds" / "stray.png").write_bytes(encode_png(_img(2)))
    assert list_training_set(str(tmp_path / "ds")).equals(t)


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


# ---- a stale index is never reused: the key follows each image's content (issue 14) ------------
def _audit_cfg(path: str, root):
    from conftest import compose

    return compose([f"trainset.path={path}", f"storage.root={root}", "model.path=/planted", "index.shards=2",
                    "embedder.size=16", "resources.device=cpu"], config_name="audit")


def _key(path: str, root, opts: dict | None = None) -> str:
    from memex.stages.index import index_key

    return index_key(list_training_set(path, opts), _audit_cfg(path, root))


def test_a_manifest_with_embedded_images_is_listed_without_copying_them(tmp_path):
    """The driver holds a manifest's images for the whole audit (bench/RESULTS.md, manifest memory:
    its listing and key peaked at 5.2-5.6x the file, now at pyarrow's own read). The listing keeps
    the read's image buffers when the rows are in id order (the bench shows the memory) and sorts
    them when not; the key hashes
    each image from Arrow's buffers, equal to hashing its bytes one by one (so existing index keys
    stay), across chunks, a sliced chunk's offset, nulls and empty cells."""
    import hashlib

    from memex.ingest import image_bytes

    imgs = [encode_png(logo(i, 8)[0]) for i in range(5)]
    pq.write_table(pa.table({"id": [f"{i}" for i in range(5)], "image": imgs}), tmp_path / "sorted.parquet")
    t = list_training_set(str(tmp_path / "sorted.parquet"), {})
    assert t["image"].to_pylist() == imgs
    pq.write_table(pa.table({"id": ["3", "0", "4", "1", "2"], "image": [imgs[i] for i in (3, 0, 4, 1, 2)]}),
                   tmp_path / "shuffled.parquet")
    u = list_training_set(str(tmp_path / "shuffled.parquet"), {})
    assert u["id"].to_pylist() == ["0", "1", "2", "3", "4"] and u["image"].to_pylist() == imgs

    cells = [imgs[0], None, b"", imgs[1], imgs[2], None, imgs[3]]
    chunked = pa.chunked_array([pa.array(cells[:3], pa.binary()), pa.array(cells, pa.binary()).slice(3)])
    got = [bytes(b) for b in image_bytes(chunked)]
    assert got == [c or b"" for c in cells]
    assert [hashlib.sha256(b).digest() for b in image_bytes(chunked)] == \
        [hashlib.sha256(c or b"").digest() for c in chunked.to_pylist()]


def _overwrite(path, data: bytes) -> None:
    """Same name, new content, and an mtime surely different from the old one."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(before + 5 * 10**9, before + 5 * 10**9))


@pytest.fixture
def in_process_units(monkeypatch):
    """runner.run_tasks without Ray: the same skip / do / mark / check loop, in this process.
    Returns the (stage folder, units run) of every call."""
    from memex import runner

    ran = []

    def run_tasks(folder, units, fn, resources, gpu=True, **shared):
        todo = [i for i in units if i not in set(folder.complete())]
        for i in todo:
            runner.do_unit(folder, i, fn, {**shared, **units[i]})
        runner.check_complete(folder, list(units))
        ran.append((folder.name, todo))
        return len(todo)

    monkeypatch.setattr(runner, "run_tasks", run_tasks)
    return ran


def _indexed_vectors(info) -> dict[str, np.ndarray]:
    """id -> the vector the index holds for it."""
    layout = info.layout({})
    ids = dict(zip(*(layout.store.read_table(layout.rows_path)[c].to_pylist() for c in ("gid", "id"))))
    out = {}
    for s in range(len(info.shards)):
        with np.load(io.BytesIO(layout.store.read_bytes(layout.vectors_path(s)))) as z:
            out.update({ids[int(g)]: v for g, v in zip(z["gids"], z["vectors"])})
    return out


def _files_state(folder) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_an_index_copied_to_another_index_root_is_reused_there(tmp_path, in_process_units):
    """index.root says where the folder lies, not what it holds: an index copied to another root (another
    bucket, a shared volume) is found there, with no unit run again. One built when the key held index.root
    as given is still found under that key, so its run folders (whose matches/ name it) resume."""
    from memex.stages import index
    from memex.stages.index import index_key

    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(6):
        (pics / f"p{i}.png").write_bytes(encode_png(_img(i)))
    a = _audit_cfg(str(pics), tmp_path / "runs")
    a.index.root = str(tmp_path / "a")
    info = index.run(a)
    assert [todo for name, todo in in_process_units if name == "shards"] == [[0, 1]]

    b = _audit_cfg(str(pics), tmp_path / "runs")
    b.index.root = str(tmp_path / "b")
    shutil.copytree(tmp_path / "a" / info.key, tmp_path / "b" / info.key)
    in_process_units.clear()
    assert index.run(b).key == info.key and in_process_units == []

    # the folder an earlier memex made: the same index under the key that hashed index.root=<a>
    old = index_key(list_training_set(str(pics)), a, root_in_key=True)
    assert old != info.key
    os.rename(tmp_path / "a" / info.key, tmp_path / "a" / old)
    success = tmp_path / "a" / old / "_SUCCESS.json"
    success.write_text(json.dumps({**json.loads(success.read_text()), "key": old}))  # as that memex wrote it
    state = _files_state(tmp_path / "a")
    assert index.run(a).key == old and in_process_units == [] and _files_state(tmp_path / "a") == state


@pytest.mark.parametrize("source", ["folder", "uri_manifest"])
def test_image_overwritten_in_place_rebuilds_the_index(tmp_path, in_process_units, source):
    """9 images in one folder (a uri manifest stamps them with one listing of it) + 1 in another
    (stamped with info()). Unchanged inputs: same key, nothing rebuilt, no file touched. One image
    overwritten in place: a new key, and the new index holds the new picture's vector."""
    from memex.config import EmbedderConfig
    from memex.embed import make_embedder
    from memex.stages import index

    pics = tmp_path / "pics"
    (pics / "sub").mkdir(parents=True)
    files = [pics / f"p{i}.png" for i in range(9)] + [pics / "sub" / "q.png"]
    for i, f in enumerate(files):
        f.write_bytes(encode_png(_img(i)))
    if source == "folder":
        path, target = str(pics), "p4.png"
    else:
        path, target = str(tmp_path / "m.parquet"), "r4"
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(10)], "uri": [str(f) for f in files],
                                 "caption": [f"c{i}" for i in range(10)]}), path)
    root = tmp_path / "runs"
    cfg = _audit_cfg(path, root)
    info = index.run(cfg)
    old = _indexed_vectors(info)
    assert info.n_indexed == 10 and set(old) == set(list_training_set(path)["id"].to_pylist())

    # unchanged: the same key, the index reused as it is
    state = _files_state(root)
    in_process_units.clear()
    assert index.run(cfg).key == info.key and _key(path, root) == info.key
    assert in_process_units == [] and _files_state(root) == state

    # p4.png overwritten in place with another picture
    _overwrite(files[4], encode_png(_img(20)))
    new_info = index.run(cfg)
    assert new_info.key != info.key
    assert [todo for name, todo in in_process_units if name == "shards"] == [[0, 1]]  # the whole index rebuilt
    new = _indexed_vectors(new_info)
    want = make_embedder(EmbedderConfig(size=16))(decode_rows(pa.table({"id": [target], "uri": [str(files[4])]}),
                                                              16).images)[0]
    np.testing.assert_allclose(new[target], want, atol=1e-6)
    assert not np.allclose(old[target], want)
    assert all(np.array_equal(new[i], old[i]) for i in old if i != target)
    assert _files_state(root / "_index" / info.key) == state  # the old index left as it was (state: only it)


def test_same_size_overwrite_changes_the_key_by_mtime(tmp_path):
    (tmp_path / "imgs").mkdir()
    f = tmp_path / "imgs" / "a.png"
    f.write_bytes(encode_png(_img(0)))
    key = _key(str(tmp_path / "imgs"), tmp_path)
    data = bytearray(f.read_bytes())
    data[-20] ^= 0xFF  # the same size
    _overwrite(f, bytes(data))
    changed = _key(str(tmp_path / "imgs"), tmp_path)
    assert changed != key
    # the mtime alone: the same bytes rewritten later are another version to the key (local files carry no
    # content hash; size + mtime is their version, as s3fs's listing gives ETag)
    _overwrite(f, bytes(data))
    assert _key(str(tmp_path / "imgs"), tmp_path) not in (key, changed)


def test_embedded_bytes_changed_under_the_same_id_change_the_key(tmp_path):
    def manifest(images):
        pq.write_table(pa.table({"id": ["a", "b"], "image": [encode_png(x) for x in images]}), tmp_path / "m.parquet")
        return _key(str(tmp_path / "m.parquet"), tmp_path)

    key = manifest([_img(0), _img(1)])
    assert manifest([_img(0), _img(1)]) == key  # the file is rewritten (new mtime), the images are the same
    assert list_training_set(str(tmp_path / "m.parquet"))["stamp"].null_count == 2  # bytes: no file stamps
    assert manifest([_img(0), _img(2)]) != key


def test_s3_overwrite_in_place_changes_the_key(s3_server, bucket):
    """On S3 the stamp is the ETag; the file is overwritten by another client (boto3), so a listing
    cached in the s3fs instance would be stale: the listing must not use it."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    names = [f"imgs/p{i}.png" for i in range(9)] + ["other/q.png"]
    for i, n in enumerate(names):
        s3.put_object(Bucket=bucket, Key=n, Body=encode_png(_img(i)))
    fs = fsspec.filesystem("s3", **s3_server)
    fs.pipe_file(f"{bucket}/m/m.parquet", _parquet_bytes(pa.table({"id": [f"r{i}" for i in range(10)],
                                                                   "uri": [f"s3://{bucket}/{n}" for n in names]})))
    sources = (f"s3://{bucket}/imgs", f"s3://{bucket}/m/m.parquet")
    keys = [_key(p, "/tmp/unused", s3_server) for p in sources]
    t = list_training_set(sources[1], s3_server)
    assert t["stamp"].null_count == 0 and all("ETag=" in s for s in t["stamp"].to_pylist())
    assert [_key(p, "/tmp/unused", s3_server) for p in sources] == keys  # unchanged: the same keys
    for n in ("imgs/p4.png", "other/q.png"):  # one stamped by the folder's listing, one by info()
        s3.put_object(Bucket=bucket, Key=n, Body=encode_png(_img(30)))
        new = [_key(p, "/tmp/unused", s3_server) for p in sources]
        assert new[0] != keys[0] if n.startswith("imgs") else new[0] == keys[0]
        assert new[1] != keys[1]
        keys = new
    s3.delete_object(Bucket=bucket, Key="imgs/p5.png")  # a missing file: unstamped (the decoder quarantines it)
    t = list_training_set(sources[1], s3_server)
    assert t["stamp"].to_pylist()[5] is None and _key(sources[1], "/tmp/unused", s3_server) != keys[1]


def test_a_damaged_vectors_file_is_named_when_its_near_duplicates_are_redone(tmp_path, in_process_units):
    """The near-duplicate unit of a shard reads the vectors its shards unit kept (.npz): when that
    file is damaged and the unit has to be redone, the error names the file and the fix (it was
    numpy's BadZipFile, one line with no path, from a Ray task)."""
    from memex.stages import index
    from memex.storage import StorageError

    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(6):
        (pics / f"p{i}.png").write_bytes(encode_png(_img(i)))
    cfg = _audit_cfg(str(pics), tmp_path / "runs")
    info = index.run(cfg)
    layout = info.layout({})
    npz = tmp_path / "runs" / "_index" / info.key / "shards" / "vectors-shard-000001.npz"
    assert npz.exists()
    npz.write_bytes(npz.read_bytes()[:64])
    (tmp_path / "runs" / "_index" / info.key / "dups" / "_markers" / "shard-000001.json").unlink()
    with pytest.raises(StorageError, match=f"{npz} is not readable vectors .*Remove it"):
        index.run(cfg)
    assert layout.dups.complete() == [0]  # nothing else changed
    npz.unlink()  # as the message says: the file, and the marker of its unit (the shards unit)
    (tmp_path / "runs" / "_index" / info.key / "shards" / "_markers" / "shard-000001.json").unlink()
    assert index.run(cfg) == info and layout.dups.complete() == [0, 1]


def test_a_chain_of_near_duplicates_across_shards_is_one_picture(tmp_path, in_process_units):
    """p0 ~ p3 ~ p5 (each step 10 grey levels, RMS 0.04 under the 0.05 threshold; p0 to p5 is 0.08), in
    two shards: one picture, named by p0 (gid 0), in read_pictures and picture_rows. Each row used to
    take its smallest direct neighbour: p5 (whose only neighbour is p3) was a picture of its own. A lost
    links file is named with its dups unit's marker, and the rebuild after removing that marker gives
    the same pictures."""
    from memex.membership import picture_rows, read_pictures
    from memex.stages import index
    from memex.storage import StorageError

    pics = tmp_path / "pics"
    pics.mkdir()
    base = (_img(0).astype(np.int16) * 7) // 10  # 0..178: the steps never clip
    for i in range(6):
        img = base + 10 * {0: 0, 3: 1, 5: 2}[i] if i in (0, 3, 5) else _img(i)
        (pics / f"p{i}.png").write_bytes(encode_png(np.asarray(img, np.uint8)))
    cfg = _audit_cfg(str(pics), tmp_path / "runs")
    info = index.run(cfg)
    assert [tuple(s) for s in info.shards] == [(0, 3), (3, 6)]
    layout = info.layout({})
    assert layout.dups.read().sort_by("gid")["near_duplicates"].to_pylist() == [1, 0, 0, 2, 0, 1]
    assert read_pictures(info, {}, np.arange(6)) == {0: 0, 1: 1, 2: 2, 3: 0, 4: 4, 5: 0}
    assert picture_rows(info, {}, [0, 4]) == {0: ["p0.png", "p3.png", "p5.png"], 4: ["p4.png"]}

    # a killed build's copy of the training set is removed when the copy is made again
    root = tmp_path / "runs" / "_index" / info.key
    (root / "train_rows.parquet").unlink()
    (root / "_tmp-0a1b-train_rows.parquet").write_bytes(b"cut short")
    assert index.run(cfg) == info and not (root / "_tmp-0a1b-train_rows.parquet").exists()

    lost = tmp_path / "runs" / "_index" / info.key / "links" / "shard-000001.parquet"
    lost.unlink()
    (tmp_path / "runs" / "_index" / info.key / "pictures.parquet").unlink()
    marker = tmp_path / "runs" / "_index" / info.key / "dups" / "_markers" / "shard-000001.json"
    with pytest.raises(StorageError, match=f"{lost} is not readable Parquet.*dups unit 1: its marker is {marker}"):
        index.run(cfg)
    marker.unlink()
    assert index.run(cfg) == info and read_pictures(info, {}, [5]) == {5: 0}


def _manifest_index(tmp_path, n: int):
    """An index of a manifest of n embedded PNGs -> (their bytes, cfg, IndexInfo, IndexLayout, its folder)."""
    from memex.stages import index

    imgs = [encode_png(_img(i)) for i in range(n)]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"{i:02d}" for i in range(n)], "image": imgs}), path)
    cfg = _audit_cfg(str(path), tmp_path / "runs")
    info = index.run(cfg)
    return imgs, cfg, info, info.layout({}), tmp_path / "runs" / "_index" / info.key


def test_a_lost_or_damaged_image_pack_is_named_and_written_again(tmp_path, in_process_units):
    """train.pack (the manifest's image bytes, read by ranged reads) removed from a complete index: a fetch
    of an image names it and says to rerun the audit, whose index stage makes the copy again,
    train.parquet first (same gids, same bytes), and the shards are kept. Cut short:
    the fetch of a training image names it and says to remove it with train_rows.parquet, after which the
    index is whole again. A killed copy's `_tmp-*-train.pack` is removed before the new one, and a lost
    pack's old table before the copy is made (else a kill between the pack's move and the table's left
    a whole index with the new table's temp file beside it, never swept)."""
    from memex.membership import fetch_train_rows
    from memex.stages import index
    from memex.storage import StorageError

    imgs, cfg, info, layout, root = _manifest_index(tmp_path, 6)
    assert (root / "train.pack").read_bytes() == b"".join(imgs)
    assert fetch_train_rows(layout, [4, 1])["image"].to_pylist() == [imgs[1], imgs[4]]
    shard = (root / "shards" / "shard-000000.faiss").stat().st_mtime_ns

    (root / "train.pack").unlink()
    with pytest.raises(StorageError, match=r"train.pack is missing, the images of .*train_rows.parquet.*rerun the "
                                           "audit"):
        fetch_train_rows(layout, [1])
    assert fetch_train_rows(layout, [1], columns=["id"])["id"].to_pylist() == ["01"]  # no image asked
    (root / "_tmp-0a1b-train.pack").write_bytes(b"cut short")
    table_there = []
    write = index.train_rows.write

    def watched(store, lay, *a, **k):
        table_there.append(store.exists(lay.rows_path))
        return write(store, lay, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(index.train_rows, "write", watched)
        assert index.run(cfg) == info and (root / "train.pack").read_bytes() == b"".join(imgs)
    assert table_there == [False]
    assert not (root / "_tmp-0a1b-train.pack").exists()
    assert (root / "shards" / "shard-000000.faiss").stat().st_mtime_ns == shard  # only the copy was made again

    (root / "train.pack").write_bytes(b"".join(imgs)[:-10])
    with pytest.raises(StorageError, match=f"{root / 'train.pack'} is not readable image pack .*Remove it and "
                                           "train_rows.parquet beside it"):
        fetch_train_rows(layout, [5])
    (root / "train.pack").unlink()
    (root / "train_rows.parquet").unlink()
    assert index.run(cfg) == info and fetch_train_rows(layout, [5])["image"].to_pylist() == [imgs[5]]


def test_an_index_built_before_the_pack_is_reused_as_it_is(tmp_path, in_process_units):
    """An index folder written before train.pack holds train.parquet, its images inline. It keeps its key
    and is reused as it is: no pack written, its images fetched and read by range from the table. A new
    folder holds no train.parquet, so memex from before the pack (a second checkout on one storage.root)
    writes its own copy there instead of reading a table without images (every training image
    quarantined: an audit with no finding and no error)."""
    from memex.layout import TRAIN_SCHEMA
    from memex.membership import fetch_train_rows
    from memex.stages import index
    from memex.train_rows import read_range

    imgs, cfg, info, layout, root = _manifest_index(tmp_path, 5)
    assert not (root / "train.parquet").exists() and (root / "train_rows.parquet").exists()
    rows = fetch_train_rows(layout, list(range(5)))
    layout.store.write_table(layout.inline_train_path, rows.cast(TRAIN_SCHEMA), row_group_size=2)  # as before
    (root / "train_rows.parquet").unlink()
    (root / "train.pack").unlink()

    assert index.run(cfg) == info
    assert not (root / "train.pack").exists() and not (root / "train_rows.parquet").exists()
    assert fetch_train_rows(layout, [3, 0])["image"].to_pylist() == [imgs[0], imgs[3]]
    assert pa.concat_tables(read_range(layout, 1, 4, 2)).equals(rows.slice(1, 3))


def test_a_grayscale_models_index_is_searched_among_the_training_images_luma(tmp_path, in_process_units):
    """A grayscale model's generation that copies a colour training picture copies its luma. Searched in
    a colour index, it lies the picture's chroma away from it (here RMS 0.2), so a gray picture 0.18 off
    (not a copy) ranks first and the source is never verified (on the demo logos, an exact luma copy
    missed the top 10 for 7% of them). The luma index (index.run(luma=True), a key of its own) ranks the
    source first; the colour index of the same data is still there under its own key."""
    from memex.images import decode, fit
    from memex.stages import index
    from memex.stages.nearest import NeighbourWorker

    rng = np.random.default_rng(4)
    gray = np.kron(rng.integers(80, 170, (4, 4)), np.ones((8, 8))).astype(np.uint8)  # the generation: (32, 32)
    a = 55.0  # chroma: R and B up by a, G down so that the ITU-R 601 luma is unchanged
    source = np.stack([gray + a, gray - a * (0.299 + 0.114) / 0.587, gray + a], axis=-1).round().astype(np.uint8)
    decoy = np.where(gray < 128, gray + 46, gray - 46).astype(np.uint8)  # RMS 46/255 = 0.18: not a copy
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "source.png").write_bytes(encode_png(source))
    (pics / "decoy.png").write_bytes(encode_png(decoy))
    for i in range(4):
        (pics / f"other{i}.png").write_bytes(encode_png(_img(i)))
    cfg = _audit_cfg(str(pics), tmp_path / "runs")
    query = [encode_png(gray)]  # an "L" PNG, as a grayscale model's generation
    assert np.abs(fit(decode(encode_png(source)), 32, "center_crop").astype(float) @ [0.299, 0.587, 0.114]
                  - gray).max() < 1  # the source's luma is the generation
    top = {}
    for luma in (False, True):
        info = index.run(cfg, luma=luma)
        worker = NeighbourWorker(info, cfg.embedder, cfg.index, "cpu", cfg.trainset.preprocess.value, {})
        _, ids = worker(query, 1)
        top[luma] = fetch_id(info, int(ids[0, 0]))
        assert info.luma == luma
    assert top == {False: "decoy.png", True: "source.png"}
    assert len({p.name for p in (tmp_path / "runs" / "_index").iterdir()}) == 2  # two keys, both kept


def test_non_square_generations_are_searched_among_training_images_cut_to_their_aspect(tmp_path,
                                                                                      in_process_units):
    """A model trained on 96x128 pictures cut to 3:2 (height:width) makes portrait generations: an
    exact copy's centre square is the source's middle 64x64, while the index held each picture's own
    centre square, 96x96: a 1.5x zoom apart. A picture whose centre square happens to look like that
    zoom (the decoy: the source's middle, upscaled, plus noise) ranked first, and the source was never
    verified. Cut to the generations' aspect first (index.run(aspect=...), a key of its own), the
    index ranks the source first; a square audit keeps the plain index's key."""
    from PIL import Image as PILImage

    from memex.images import to_aspect
    from memex.stages import index
    from memex.stages.nearest import NeighbourWorker

    rng = np.random.default_rng(6)
    source = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 96 x 128
    gen = to_aspect(source, 3, 2, "center_crop")  # what the model saw and copies: 96 x 64
    assert gen.shape == (96, 64, 3)
    middle = np.asarray(PILImage.fromarray(source[16:80, 32:96]).resize((96, 96), PILImage.BICUBIC))
    decoy = rng.integers(0, 256, (96, 128, 3)).astype(np.uint8)
    decoy[:, 16:112] = np.clip(middle.astype(int) + rng.integers(-6, 7, middle.shape), 0, 255)
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "source.png").write_bytes(encode_png(source))
    (pics / "decoy.png").write_bytes(encode_png(decoy))
    for i in range(4):
        (pics / f"other{i}.png").write_bytes(encode_png(_img(i, 96)))
    cfg = _audit_cfg(str(pics), tmp_path / "runs")
    top = {}
    for aspect in (None, (96, 64)):
        info = index.run(cfg, aspect=aspect)
        worker = NeighbourWorker(info, cfg.embedder, cfg.index, "cpu", cfg.trainset.preprocess.value, {})
        top[aspect] = fetch_id(info, int(worker([encode_png(gen)], 1)[1][0, 0]))
    assert top == {None: "decoy.png", (96, 64): "source.png"}
    assert info.aspect == [3, 2] and index.run(cfg, aspect=(64, 64)).key == index.run(cfg).key


def fetch_id(info, gid: int) -> str:
    from memex.membership import fetch_train_rows

    return fetch_train_rows(info.layout({}), [gid], columns=["id"])["id"][0].as_py()


def test_ivfpq_settings_that_do_not_fit_the_data_are_refused_before_the_index_folder(tmp_path, in_process_units):
    """More IVF lists than training vectors, or a pq_m that does not divide the pixel dimension
    (3 x 16 x 16 = 768): the quantizer task raised it, after train.parquet (a copy of the training
    set) was written into a new index folder. Now before anything is written."""
    import dataclasses

    from memex.index import IndexSpecError
    from memex.stages import index

    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(6):
        (pics / f"p{i}.png").write_bytes(encode_png(_img(i)))
    cfg = _audit_cfg(str(pics), tmp_path / "runs")
    for change, message in [({"nlist": 8}, r"IVF-PQ needs at least max\(index.nlist=8, 2\*\*index.pq_nbits=2\) = 8 "
                                            r"training vectors, got 6"),
                            ({"nlist": 2, "pq_m": 7}, r"index.pq_m=7 must divide the embedding dimension 768")]:
        bad = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, kind="ivfpq", pq_nbits=1, **change))
        with pytest.raises(IndexSpecError, match=message):
            index.run(bad)
        assert not (tmp_path / "runs").exists()


def test_uris_whose_filesystem_is_not_installed_are_refused_before_any_row_is_read(tmp_path, monkeypatch):
    """gs:// uris without gcsfs: a fault of this machine, not of the rows. Each row was quarantined
    with the same ImportError and the audit went on without them. A protocol fsspec does not know
    at all (a garbled uri) stays a row's fault: that row is quarantined, the rest is read.
    The uninstalled filesystem is one registered here with a package that does not exist (as
    fsspec registers gs:// to gcsfs), so the test holds on a machine with gcsfs installed too."""
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "absentfs",
                        {"class": "memex_absent_pkg.AbsentFileSystem",
                         "err": "Install memex-absent-pkg to read absentfs"})
    good = encode_png(_img(0))
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": [good, None, None],
                             "uri": [None, "absentfs://bucket/b.png", "absentfs://bucket/c.png"]}), path)
    with pytest.raises(IngestError, match=r"training image uris such as absentfs://bucket/b.png need a package that is "
                                          r"not installed: Install memex-absent-pkg .*\(install it here and in the "
                                          r"workers' image"):
        list_training_set(str(path))
    pq.write_table(pa.table({"id": ["a", "b"], "image": [good, None], "uri": [None, "foo://bucket/b.png"]}), path)
    dec = decode_rows(list_training_set(str(path)), None)
    assert dec.ids == ["a"] and dec.quarantine["id"].to_pylist() == ["b"]
    assert "foo" in dec.quarantine["reason"][0].as_py()


@pytest.mark.parametrize("shape", ["memex", "img2dataset", "datasets_struct"])
def test_the_index_streams_a_manifest_of_embedded_images_in_id_order(tmp_path, in_process_units, shape,
                                                                     monkeypatch):
    """A Parquet manifest of embedded images, in two files whose rows are in id order: the index's
    listing (images=False) holds each image's sha256, not its bytes; its key equals the whole read's
    (so indexes built before are reused), and train.parquet, written from the manifest a batch at
    a time, equals the one the whole read writes. memex's own layout (a uri row among the images),
    img2dataset's (key, jpg; failed downloads left out) and datasets' Image struct {bytes, path}."""
    from memex.ingest import IMAGE_SHA256, iter_train_rows
    from memex.layout import TRAIN_SCHEMA
    from memex.stages import index

    imgs = [encode_png(logo(i, 8)[0]) for i in range(9)]
    rng = np.random.default_rng(2)  # two non-square pictures (LAION's are), a JPEG among them
    imgs[2] = encode_png(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (30, 14, 3), dtype=np.uint8)).save(buf, format="JPEG")
    imgs[6] = buf.getvalue()
    (tmp_path / "loose.png").write_bytes(imgs[8])
    folder = tmp_path / "m"
    folder.mkdir()
    for part, rows in enumerate((range(0, 5), range(5, 9))):
        ids = [f"{i:03d}" for i in rows]
        caps = [f"c{i}" for i in rows]
        if shape == "memex":
            image = [None if i == 8 else imgs[i] for i in rows]
            uri = [str(tmp_path / "loose.png") if i == 8 else None for i in rows]
            t = pa.table({"id": ids, "image": pa.array(image, pa.binary()), "caption": caps,
                          "uri": pa.array(uri, pa.string())})
        elif shape == "img2dataset":  # row 3's download failed: no jpg
            t = pa.table({"key": ids, "jpg": pa.array([None if i == 3 else imgs[i] for i in rows], pa.binary()),
                          "caption": caps, "status": ["failed_to_download" if i == 3 else "success" for i in rows]})
        else:
            t = pa.table({"id": ids, "image": [{"bytes": imgs[i], "path": f"{i}.png"} for i in rows], "caption": caps})
        pq.write_table(t, folder / f"part-{part}.parquet", row_group_size=2)
    path = str(folder)

    streamed = list_training_set(path, {}, images=False)
    whole = list_training_set(path, {})
    assert IMAGE_SHA256 in streamed.column_names and IMAGE_SHA256 not in whole.column_names
    assert streamed["image"].null_count == streamed.num_rows == whole.num_rows == (8 if shape == "img2dataset" else 9)
    assert streamed.drop_columns(["image", IMAGE_SHA256]).equals(whole.drop_columns(["image"]))
    cfg = _audit_cfg(path, tmp_path / "runs")
    assert index.index_key(streamed, cfg) == index.index_key(whole, cfg)
    rows = pa.concat_tables(iter_train_rows(path, {}, streamed, batch_rows=3))
    want = pa.table({"gid": pa.array(range(whole.num_rows), pa.int64()), "id": whole["id"], "image": whole["image"],
                     "uri": whole["uri"], "caption": whole["caption"]}, schema=TRAIN_SCHEMA)
    assert rows.cast(TRAIN_SCHEMA).equals(want)

    import memex.ingest

    streamed_batches = []  # the stage itself streams (its train.parquet is the whole read's)
    monkeypatch.setattr(memex.ingest, "iter_train_rows", lambda *a, **k: (
        streamed_batches.append(t) or t for t in iter_train_rows(*a, **k)))
    info = index.run(cfg)
    assert len(streamed_batches) >= 1
    layout = info.layout({})
    from memex.membership import fetch_train_rows

    train = fetch_train_rows(layout, list(range(whole.num_rows)))  # (its images from train.pack)
    assert train.equals(want) and info.n_indexed == whole.num_rows


def test_a_streamed_manifest_out_of_id_order_or_changed_midway(tmp_path, in_process_units, monkeypatch):
    """Rows not in id order (img2dataset writes them as downloads finish): the streamed listing keeps
    the manifest's order, and so do the gids of train.parquet, while the key is the whole read's
    (sorted by id). A manifest rewritten between its listing and train.parquet's write is named."""
    from memex.ingest import IMAGE_SHA256, IngestError, iter_train_rows
    from memex.stages import index

    imgs = [encode_png(logo(i, 8)[0]) for i in range(4)]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["b", "a", "d", "c"], "image": [imgs[1], imgs[0], imgs[3], imgs[2]]}), path)
    t = list_training_set(str(path), {}, images=False)
    whole = list_training_set(str(path), {})
    assert t["id"].to_pylist() == ["b", "a", "d", "c"] and IMAGE_SHA256 in t.column_names
    assert whole["id"].to_pylist() == ["a", "b", "c", "d"]
    cfg = _audit_cfg(str(path), tmp_path / "runs")
    assert index.index_key(t, cfg) == index.index_key(whole, cfg)
    info = index.run(cfg)
    layout = info.layout({})
    from memex.membership import fetch_train_rows

    train = fetch_train_rows(layout, [0, 1, 2, 3])
    assert train["gid"].to_pylist() == [0, 1, 2, 3] and train["id"].to_pylist() == ["b", "a", "d", "c"]
    assert train["image"].to_pylist() == [imgs[1], imgs[0], imgs[3], imgs[2]]

    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "image": imgs}), path)
    listing = list_training_set(str(path), {}, images=False)
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "image": [imgs[0], imgs[2], imgs[2], imgs[3]]}), path)
    with pytest.raises(IngestError, match=r"changed while the index read it \(rows from 0 on differ"):
        list(iter_train_rows(str(path), {}, listing))
    from memex.layout import IndexLayout
    from memex.train_rows import write

    lay = IndexLayout(str(tmp_path / "index"), "k")  # as the index stage writes it: nothing, not a part of it
    with pytest.raises(IngestError, match=r"changed while the index read it"):
        write(lay.store, lay, iter_train_rows(str(path), {}, listing), row_group_size=2)
    assert not list((tmp_path / "index" / "k").iterdir())  # neither train.pack nor train.parquet
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": imgs[:3]}), path)
    with pytest.raises(IngestError, match=r"changed while the index read it \(3 rows, its listing has 4\)"):
        list(iter_train_rows(str(path), {}, listing))

    # through the index stage: rewritten after the listing (which made the key), before the copy
    import memex.ingest

    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "image": imgs}), path)
    real = memex.ingest.iter_train_rows

    def rewritten_first(*a, **k):
        pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "image": [imgs[0], imgs[2], imgs[2], imgs[3]]}), path)
        return real(*a, **k)

    monkeypatch.setattr(memex.ingest, "iter_train_rows", rewritten_first)
    cfg = _audit_cfg(str(path), tmp_path / "runs2")
    before = index.index_key(list_training_set(str(path), {}, images=False), cfg)
    with pytest.raises(IngestError, match=rf"^trainset.path={path} changed while the index read it"):
        index.run(cfg)
    assert not (tmp_path / "runs2" / "_index" / before / "train_rows.parquet").exists()
    monkeypatch.setattr(memex.ingest, "iter_train_rows", real)
    again = index.run(cfg)  # the rerun lists the manifest anew: another key, and a whole index
    assert again.key != before and again.n_indexed == 4
    assert (tmp_path / "runs2" / "_index" / again.key / "train_rows.parquet").exists()


def test_a_manifest_whose_parts_differ_is_refused_naming_the_part(tmp_path):
    """Parts of a manifest folder with other columns: pyarrow reads several files with the first
    one's schema, so the second part's images and captions were dropped without a word (its rows
    quarantined as "neither image bytes nor a uri"). Refused by the streamed listing and by the
    whole read (memex train, memex mia), naming the part and the columns; a part without an id too."""
    imgs = [encode_png(logo(i, 8)[0]) for i in range(4)]
    m = tmp_path / "m"
    m.mkdir()
    (m / "0.png").write_bytes(imgs[0])
    pq.write_table(pa.table({"id": ["a"], "uri": ["0.png"]}), m / "p0.parquet")
    pq.write_table(pa.table({"id": ["b", "c"], "image": imgs[1:3], "caption": ["x", "y"]}), m / "p1.parquet")
    says = (r"training manifest .*/m: its parts hold different columns: p1.parquet lacks \['uri'\] and adds "
            r"\['caption', 'image'\] against p0.parquet \(\['id', 'uri'\]\)\. Read as one table")
    with pytest.raises(IngestError, match=says):
        list_training_set(str(m), {}, images=False)
    with pytest.raises(ManifestError, match=says):
        read_manifest(str(m))
    pq.write_table(pa.table({"id": ["a"], "image": imgs[:1]}), m / "p0.parquet")
    pq.write_table(pa.table({"name": ["c", "d"], "image": imgs[2:]}), m / "p1.parquet")
    with pytest.raises(IngestError, match=r"p1.parquet lacks \['id'\] and adds \['name'\] against p0.parquet"):
        list_training_set(str(m), {}, images=False)


def test_parquet_files_in_underscore_folders_are_not_manifest_rows(tmp_path):
    """A Spark output folder's _temporary/ attempt and a Delta table's _delta_log/ checkpoint are
    not rows of the manifest (pyarrow's datasets skip them too): their ids were counted twice
    ("ids are not unique") or their columns named as the manifest's."""
    imgs = [encode_png(logo(i, 8)[0]) for i in range(3)]
    m = tmp_path / "m"
    (m / "_temporary" / "0" / "task_1").mkdir(parents=True)
    (m / "_delta_log").mkdir()
    (m / ".cache").mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "image": imgs[:2]}), m / "part-00000.parquet")
    pq.write_table(pa.table({"id": ["b"], "image": imgs[1:2]}), m / "_temporary" / "0" / "task_1" / "part-0.parquet")
    pq.write_table(pa.table({"add": ["x"], "metaData": ["y"]}), m / "_delta_log" / "00000.checkpoint.parquet")
    pq.write_table(pa.table({"id": ["c"], "image": imgs[2:]}), m / ".cache" / "part.parquet")
    assert read_manifest(str(m))["id"].to_pylist() == ["a", "b"]
    assert list_training_set(str(m), {}, images=False)["id"].to_pylist() == ["a", "b"]


def test_a_manifest_on_s3_is_streamed_like_a_local_one(tmp_path, s3_server, bucket):
    """The streamed listing and train.parquet's rows read a manifest on S3 (moto) as they read the
    same files on disk: the same ids, hashes and rows."""
    import s3fs

    from memex.ingest import IMAGE_SHA256, iter_train_rows

    imgs = [encode_png(logo(i, 8)[0]) for i in range(6)]
    (tmp_path / "m").mkdir()
    for part in range(2):
        rows = range(3 * part, 3 * part + 3)
        pq.write_table(pa.table({"id": [f"{i}" for i in rows][::-1], "image": [imgs[i] for i in rows][::-1],
                                 "caption": [f"c{i}" for i in rows][::-1]}), tmp_path / "m" / f"p{part}.parquet")
    s3fs.S3FileSystem(**s3_server).put(str(tmp_path / "m"), f"{bucket}/m", recursive=True)
    local = list_training_set(str(tmp_path / "m"), {}, images=False)
    remote = list_training_set(f"s3://{bucket}/m", s3_server, images=False)
    assert remote["id"].to_pylist() == ["2", "1", "0", "5", "4", "3"]  # the manifest's order
    assert remote.select(["id", "caption", IMAGE_SHA256]).equals(local.select(["id", "caption", IMAGE_SHA256]))
    got = pa.concat_tables(iter_train_rows(f"s3://{bucket}/m", s3_server, remote, batch_rows=2))
    want = pa.concat_tables(iter_train_rows(str(tmp_path / "m"), {}, local, batch_rows=2))
    assert got.select(["gid", "id", "image", "caption"]).equals(want.select(["gid", "id", "image", "caption"]))
    assert got["image"].to_pylist() == [imgs[i] for i in (2, 1, 0, 5, 4, 3)]


def test_a_store_that_fails_a_read_fails_the_unit_instead_of_quarantining_the_image(monkeypatch):
    """Credentials that expire mid-build, throttling after the client's retries, a connection reset:
    each read error became a quarantine row, the shard was marked complete, and every later audit
    reused an index without those images (the key does not change). A store's failed read now raises
    FetchError naming the uri and the fix (the unit stays unmarked and is retried); a missing file is
    still a bad row, and so is an http(s) uri's failure (the open web: dead links are the images' own)."""
    from botocore.exceptions import NoCredentialsError, ParamValidationError

    import memex.ingest as ingest
    from memex.ingest import FetchError

    png = encode_png(_img(0))

    def read(uri, opts, version=None, listings=None):
        if "reset" in uri:
            raise ConnectionResetError("Connection reset by peer")
        if "nocreds" in uri:  # botocore's, which s3fs lets through: not an OSError
            raise NoCredentialsError()
        if "bad bucket" in uri:  # a malformed uri botocore refuses to send: the row's own fault
            raise ParamValidationError(report="Invalid bucket name")
        if "gone" in uri or uri.startswith("https://"):
            raise FileNotFoundError(uri) if "gone" in uri else ConnectionError("timed out")
        return png

    monkeypatch.setattr(ingest, "read_uri", read)
    rows = pa.table({"id": ["ok", "gone", "web", "reset"],
                     "uri": ["s3://b/ok.png", "s3://b/gone.png", "https://example.org/x.png", "s3://b/reset.png"]})
    for workers in (1, 4):
        with pytest.raises(FetchError, match=r"s3://b/reset.png: ConnectionResetError.*rerun to retry"):
            decode_rows(rows, 16, workers=workers)
        with pytest.raises(FetchError, match="s3://b/reset.png"):
            fetch_bytes(rows, workers=workers)
    dec = decode_rows(rows.slice(0, 3), 16)
    assert dec.ids == ["ok"] and dec.quarantine["id"].to_pylist() == ["gone", "web"]
    with pytest.raises(FetchError, match=r"s3://b/nocreds.png: NoCredentialsError.*rerun to retry"):
        decode_rows(pa.table({"id": ["n"], "uri": ["s3://b/nocreds.png"]}), 16)
    bad = decode_rows(pa.table({"id": ["m"], "uri": ["s3://bad bucket!/x.png"]}), 16)  # quarantined, as before
    assert bad.ids == [] and bad.quarantine["reason"][0].as_py().startswith("ParamValidationError")


def test_an_empty_tar_member_is_no_range_read(tmp_path, monkeypatch):
    """A 0-byte member asked for the byte range [o, o), which s3fs sends as `bytes=o-(o-1)`: S3 answers
    an unsatisfiable range with the whole object, the shard (GBs, per empty member, on 8 threads)."""
    import tarfile

    from fsspec.implementations.local import LocalFileSystem

    from memex.shards import member_uri, read_uri

    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in (("a.png", encode_png(_img(0))), ("b.png", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    real = LocalFileSystem.cat_file

    def cat_file(self, path, start=None, end=None, **kw):
        assert start is None or end is None or end > start, f"a range of nothing: [{start}, {end})"
        return real(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(LocalFileSystem, "cat_file", cat_file)
    assert read_uri(member_uri("b.png", str(tar)), {}) == b""
    assert read_uri(member_uri("a.png", str(tar)), {}) == encode_png(_img(0))


def test_a_manifest_of_tar_member_uris_is_stamped_with_each_shard_s_version(tmp_path):
    """Manifest rows whose uri is a member of a tar shard (tar://<member>::<shard>): fsspec's tar
    filesystem, made for the first shard, stamped every row None, so a shard overwritten in place kept
    the index key and a stale index was reused. Each row now carries its shard's stamp (read once per
    shard), and rewriting one shard changes only its own rows' stamps."""
    import tarfile
    import time

    from memex.shards import member_uri

    def write_shard(path, seed):
        with tarfile.open(path, "w") as tf:
            for k in range(3):
                data = encode_png(_img(seed + k))
                info = tarfile.TarInfo(f"{k}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

    shards = [tmp_path / "a.tar", tmp_path / "b.tar"]
    for n, s in enumerate(shards):
        write_shard(s, 10 * n)
    rows = [(f"{s.stem}{k}", member_uri(f"{k}.png", str(s))) for s in shards for k in range(3)]
    pq.write_table(pa.table({"id": [i for i, _ in rows], "uri": [u for _, u in rows]}), tmp_path / "m.parquet")
    before = dict(zip(*(list_training_set(str(tmp_path / "m.parquet"))[c].to_pylist() for c in ("id", "stamp"))))
    assert all(before.values()) and before["a0"] == before["a2"] != before["b0"]
    time.sleep(0.01)
    write_shard(shards[1], 50)  # b.tar rewritten in place with other images
    os.utime(shards[1], (time.time() + 5, time.time() + 5))
    after = dict(zip(*(list_training_set(str(tmp_path / "m.parquet"))[c].to_pylist() for c in ("id", "stamp"))))
    assert {i for i in after if after[i] != before[i]} == {"b0", "b1", "b2"}


def test_webdataset_shards_are_read_whole_once_per_version(tmp_path, monkeypatch):
    """Listing a tar shard reads all of it (its captions lie between the images), and the index listed
    the training set on every audit before it could find its finished index: a 200 GB set on S3 was
    downloaded once per audit, once per checkpoint a night. Each shard's listing is kept under the
    index root by the shard's URI and version: a second listing reads no shard, a shard rewritten in
    place is read again (alone), and a damaged kept listing is made again. The listing is the same."""
    import tarfile
    import time

    import memex.ingest as ingest
    from memex.storage import Store

    def write_shard(path, seed, n=3):
        with tarfile.open(path, "w") as tf:
            for k in range(n):
                for name, data in ((f"{k:04d}.png", encode_png(_img(seed + k))),
                                   (f"{k:04d}.txt", f"cap {seed + k}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))

    shards = tmp_path / "shards"
    shards.mkdir()
    for n in range(3):
        write_shard(shards / f"{n:05d}.tar", 10 * n)
    read = []
    real = ingest.shard_samples
    monkeypatch.setattr(ingest, "shard_samples", lambda fs, tar, suffixes: read.append(tar) or real(fs, tar, suffixes))
    cache = Store(str(tmp_path / "_index" / "_shard_listings"))
    plain = list_training_set(str(shards))
    read.clear()
    first = list_training_set(str(shards), shard_cache=cache)
    assert len(read) == 3 and first.equals(plain)
    read.clear()
    assert list_training_set(str(shards), shard_cache=cache).equals(plain) and read == []
    time.sleep(0.01)
    write_shard(shards / "00001.tar", 50, n=4)  # rewritten in place: another version
    os.utime(shards / "00001.tar", (time.time() + 5, time.time() + 5))
    again = list_training_set(str(shards), shard_cache=cache)
    assert [os.path.basename(t) for t in read] == ["00001.tar"] and again.num_rows == 10
    assert again.equals(list_training_set(str(shards)))
    for kept in (tmp_path / "_index" / "_shard_listings").glob("*.parquet"):
        kept.write_bytes(b"not parquet")  # damaged kept listings: made again, not trusted
    read.clear()
    assert list_training_set(str(shards), shard_cache=cache).equals(again) and len(read) == 3


def test_an_index_is_read_from_where_it_was_found_after_a_move(tmp_path, in_process_units, monkeypatch):
    """A reused index was read at the root recorded when it was built: one built with the relative
    default (runs/, from one folder) and found later under an absolute storage.root from another folder
    (cron from $HOME), or copied to another bucket, read its dups/ at a path that was not there (an empty
    table: "the training set has no captions"). The root is now made absolute on the driver, and a reused
    index is read where it was found."""
    import shutil

    from memex.membership import read_duplicates
    from memex.stages import index

    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(6):
        (pics / f"p{i}.png").write_bytes(encode_png(_img(i)))
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    info = index.run(_audit_cfg(str(pics), "runs"))
    assert info.root == str(tmp_path / "a" / "runs" / "_index")  # absolute: Ray's workers may run elsewhere
    shutil.move(tmp_path / "a" / "runs", tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    in_process_units.clear()
    found = index.run(_audit_cfg(str(pics), str(tmp_path / "moved")))
    assert in_process_units == [] and found.key == info.key  # reused, not rebuilt
    assert found.root == str(tmp_path / "moved" / "_index")
    assert read_duplicates(found, {}).num_rows == 6


def test_a_tar_shard_rewritten_in_place_is_read_at_its_new_offsets(tmp_path):
    """The offsets of a shard's members were cached by its uri alone for the process's life: a shard
    rewritten in place (a new key, a new index) gave its old offsets in a long-lived process (a whole-night
    nightly), i.e. another member's bytes, without error. They are kept per version of the shard (the
    listing's stamp, which every row of it carries)."""
    import tarfile
    import time

    from memex.shards import member_uri

    tar = tmp_path / "s.tar"

    def write_shard(names):
        with tarfile.open(tar, "w") as tf:
            for name, seed in names:
                data = encode_png(_img(seed))
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

    write_shard([("1.png", 1)])
    pq.write_table(pa.table({"id": ["one"], "uri": [member_uri("1.png", str(tar))]}), tmp_path / "m.parquet")
    first = list_training_set(str(tmp_path / "m.parquet"))
    assert row_bytes(first.to_pylist()[0], {}) == encode_png(_img(1))
    write_shard([("0.png", 7), ("1.png", 2)])  # 1.png now further in, after another member
    os.utime(tar, (time.time() + 5, time.time() + 5))
    again = list_training_set(str(tmp_path / "m.parquet"))
    assert again["stamp"][0].as_py() != first["stamp"][0].as_py()
    assert row_bytes(again.to_pylist()[0], {}) == encode_png(_img(2))
    # ... and through what reads them: decode_rows kept only id, image and uri, and the index's own rows
    # (train.parquet) have no stamp, so both read at the offsets first cached (the other member's pixels)
    assert np.array_equal(decode_rows(again, None).images[0], _img(2))
    write_shard([("0.png", 7), ("9.png", 8), ("1.png", 3)])
    os.utime(tar, (time.time() + 10, time.time() + 10))
    third = list_training_set(str(tmp_path / "m.parquet"))
    assert np.array_equal(decode_rows(third, None).images[0], _img(3))
    no_stamp = third.select(["id", "uri"])  # as train.parquet's rows: the index's URI keys the offsets
    assert fetch_bytes(no_stamp, version="index-a")[0]["one"] == encode_png(_img(3))
    write_shard([("1.png", 4)])
    assert fetch_bytes(no_stamp, version="index-b")[0]["one"] == encode_png(_img(4))


def test_a_lost_copy_of_a_manifest_rewritten_in_another_order_is_refused_not_misaligned(tmp_path, in_process_units):
    """A streamed manifest's gids are its row numbers, but the index key hashes its rows in id order: the same
    rows written again in another order have the same key. With train_rows.parquet in place that is harmless
    (the copy decides the gids); but a lost copy (train.pack) was written again in the new order beside the
    shards built with the old one, pairing every vector with another row's image and caption. It is refused,
    naming the folder to delete, and nothing is changed; restored, the index is reused as it was."""
    from memex.membership import fetch_train_rows
    from memex.stages import index
    from memex.storage import StorageError

    imgs = [encode_png(_img(i)) for i in range(6)]
    path = tmp_path / "m.parquet"
    ids = [f"{i:02d}" for i in range(6)]
    pq.write_table(pa.table({"id": ids, "image": imgs, "caption": [f"c{i}" for i in range(6)]}), path)
    cfg = _audit_cfg(str(path), tmp_path / "runs")
    info = index.run(cfg)
    root = tmp_path / "runs" / "_index" / info.key
    pack, table = (root / "train.pack").read_bytes(), (root / "train_rows.parquet").read_bytes()

    order = [3, 0, 5, 1, 4, 2]  # the same rows, exported again in another order: the same index
    pq.write_table(pa.table({"id": [ids[i] for i in order], "image": [imgs[i] for i in order],
                             "caption": [f"c{i}" for i in order]}), path)
    assert index.run(cfg) == info  # the copy in place decides the gids
    (root / "train.pack").unlink()
    with pytest.raises(StorageError, match=rf"index .*{info.key} lost train.pack, and trainset.path lists its rows "
                                           r"in another order .* Delete .* to rebuild it, or restore the lost file"):
        index.run(cfg)
    assert (root / "train_rows.parquet").read_bytes() == table and not (root / "train.pack").exists()
    (root / "train.pack").write_bytes(pack)
    assert index.run(cfg) == info
    assert fetch_train_rows(info.layout({}), [3])["image"].to_pylist() == [imgs[3]]  # gid 3 is still row "03"
