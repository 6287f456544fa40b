"""Which files of a training set are its images: WebDataset samples' image fields, the image formats
Pillow reads, and the hidden and tool files beside the images (memex/ingest.py, memex/shards.py)."""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, features

from memex.images import decode, encode_png
from memex.ingest import IngestError, decode_rows, list_training_set
from memex.storage import Store
from memex.synth import logo


def _img(i: int, size: int = 32) -> np.ndarray:
    return logo(i, size)[0]


def _encoded(img: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **kw)
    return buf.getvalue()


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    """A tar of `members` (name, bytes), in that order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _shards(tmp_path, members: list[tuple[str, bytes]], name: str = "00000.tar"):
    root = tmp_path / "shards"
    root.mkdir(exist_ok=True)
    _tar(root / name, members)
    return root


def test_a_webdataset_sample_s_image_is_its_image_field_not_a_dotted_one(tmp_path, caplog):
    """WebDataset's rule: key = a member's basename up to its first dot, field = the rest. A member was the
    sample's image when its name ended in an image suffix, the first one kept: `0001.depth.png` (field
    depth.png) before `0001.jpg` made the depth map the indexed training image, paired with 0001.txt's
    caption. The image is the member whose whole field is an image suffix; a sample whose one image member
    has a dotted field (0003.image.png) keeps it, with its caption; several dotted ones are a row each."""
    depth = np.repeat(np.arange(32, dtype=np.uint8)[None, :, None] * 8, 32, axis=0).repeat(3, axis=2)
    root = _shards(tmp_path, [("0001.depth.png", encode_png(depth)), ("0001.jpg", _encoded(_img(1), "JPEG")),
                              ("0001.txt", b"a red logo"), ("0002.png", encode_png(_img(2))),
                              ("0002.seg.png", encode_png(depth)), ("0002.txt", b"a blue logo"),
                              ("0003.image.png", encode_png(_img(3))), ("0003.txt", b"a green logo"),
                              ("0004.rgb.png", encode_png(_img(4))), ("0004.depth.png", encode_png(depth))])
    with caplog.at_level(logging.WARNING, logger="memex"):
        t = list_training_set(str(root))
    assert t["id"].to_pylist() == ["00000.tar/0001.jpg", "00000.tar/0002.png", "00000.tar/0003.image.png",
                                   "00000.tar/0004.depth.png", "00000.tar/0004.rgb.png"]
    assert t["caption"].to_pylist() == ["a red logo", "a blue logo", "a green logo", None, None]
    dec = decode_rows(t, None)
    assert np.array_equal(dec.images[1], _img(2)) and np.array_equal(dec.images[2], _img(3))
    assert np.abs(dec.images[0].astype(int) - _img(1)).mean() < 8  # the JPEG of logo 1, not the depth ramp
    assert "0004 (depth.png, rgb.png)" in caplog.text  # the sample split in rows is named


def test_a_webdataset_sample_with_two_image_fields_is_refused_naming_shard_and_key(tmp_path):
    """`0001.jpg` and `0001.png` in one sample: which one a trainer read is its own choice
    (img2dataset writes one of jpg/png/webp a sample); one of them was kept without a word."""
    root = _shards(tmp_path, [("0000.jpg", _encoded(_img(0), "JPEG")), ("0001.jpg", _encoded(_img(1), "JPEG")),
                              ("0001.png", encode_png(_img(1))), ("0001.txt", b"x")])
    with pytest.raises(IngestError, match=r"shard .*00000\.tar: sample 0001 has several images \(jpg, png\)"):
        list_training_set(str(root))


def test_a_plain_tar_of_dotted_file_names_lists_each_image(tmp_path):
    """A tar of plain files whose names hold dots (photo.2021.01.jpg, photo.2021.02.jpg) is one WebDataset
    key (photo) with fields 2021.01.jpg, ...: it listed one row for them all. A tar with no image field
    at all is no WebDataset shard: each image file is a row, captioned by its <name>.txt, as in a folder."""
    root = _shards(tmp_path, [("photo.2021.01.jpg", _encoded(_img(1), "JPEG")), ("photo.2021.01.txt", b"january"),
                              ("photo.2021.02.jpg", _encoded(_img(2), "JPEG")),
                              ("photo.2021.03.png", encode_png(_img(3)))])
    t = list_training_set(str(root))
    assert t["id"].to_pylist() == ["00000.tar/photo.2021.01.jpg", "00000.tar/photo.2021.02.jpg",
                                   "00000.tar/photo.2021.03.png"]
    assert t["caption"].to_pylist() == ["january", None, None]
    assert decode_rows(t, None).quarantine.num_rows == 0


def test_a_shard_listing_kept_under_earlier_rules_is_not_reused(tmp_path):
    """Shard listings are kept by the shard's URI and version (`shard_cache`): one kept under the earlier
    rules (a depth map as the sample's image) would have been served as it was, the shard unchanged."""
    root = _shards(tmp_path, [("0001.depth.png", encode_png(_img(9))), ("0001.jpg", _encoded(_img(1), "JPEG"))])
    tar = str(root / "00000.tar")
    import fsspec

    from memex.ingest import SHARD_LISTING_SCHEMA, _stamp

    fs = fsspec.filesystem("file")
    cache = Store(str(tmp_path / "_index" / "_shard_listings"))
    old = hashlib.sha256(f"{fs.unstrip_protocol(tar)}\x1f{_stamp(fs.info(tar))}".encode()).hexdigest()[:32]
    cache.write_table(cache.join(f"{old}.parquet"),
                      pa.table({"member": ["0001.depth.png"], "caption": [None]}, schema=SHARD_LISTING_SCHEMA))
    assert list_training_set(str(root), shard_cache=cache)["id"].to_pylist() == ["00000.tar/0001.jpg"]


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow reads no AVIF")
def test_avif_pnm_apng_and_jpe_images_are_training_images(tmp_path):
    """Pillow reads AVIF, PGM/PPM/PNM/PBM, APNG and .jpe (JPEG), and images.decode decodes them: an image
    folder's or a shard's such files were left out of the listing without a word."""
    made = {"a.avif": ("AVIF", "RGB"), "b.pgm": ("PPM", "L"), "c.ppm": ("PPM", "RGB"), "d.pnm": ("PPM", "RGB"),
            "e.pbm": ("PPM", "1"), "f.apng": ("PNG", "RGB"), "g.jpe": ("JPEG", "RGB")}
    folder = tmp_path / "imgs"
    folder.mkdir()
    members = []
    for i, (name, (fmt, mode)) in enumerate(made.items()):
        pic = Image.fromarray(_img(i)).convert(mode)
        buf = io.BytesIO()
        pic.save(buf, fmt)
        (folder / name).write_bytes(buf.getvalue())
        members.append((f"{i:04d}.{name.split('.')[1]}", buf.getvalue()))
        ref, got = np.asarray(pic.convert("RGB")), decode(buf.getvalue())
        lossless = fmt in ("PPM", "PNG")
        assert np.array_equal(got, ref) if lossless else np.abs(got.astype(int) - ref).mean() < 8, name
    t = list_training_set(str(folder))
    assert t["id"].to_pylist() == sorted(made)
    assert decode_rows(t, None).quarantine.num_rows == 0
    s = list_training_set(str(_shards(tmp_path, members)))
    assert s["id"].to_pylist() == [f"00000.tar/{m}" for m, _ in members]
    assert decode_rows(s, None).quarantine.num_rows == 0


def test_hidden_and_tool_files_are_not_training_images(tmp_path):
    """Jupyter's `.ipynb_checkpoints/a-checkpoint.jpg` (a spurious near-duplicate of a.jpg), macOS's
    AppleDouble `._a.jpg` and `__MACOSX/._a.jpg` (quarantined as unreadable images) and other hidden files
    were training images. A path with a part (below the folder given) starting with "." or named __MACOSX
    is skipped, as the Parquet reader skips _/. parts; the folder given may itself be hidden (~/.cache)."""
    folder = tmp_path / ".cache" / "imgs"
    for sub in (".ipynb_checkpoints", "__MACOSX", "sub/.thumbs", "sub"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    apple_double = b"\x00\x05\x16\x07" + b"\x00" * 60
    for name, data in (("a.jpg", _encoded(_img(1), "JPEG")), ("sub/b.png", encode_png(_img(2))),
                       (".ipynb_checkpoints/a-checkpoint.jpg", _encoded(_img(1), "JPEG")),
                       ("__MACOSX/._a.jpg", apple_double), ("._a.jpg", apple_double),
                       ("sub/.thumbs/b.png", encode_png(_img(2))), (".hidden.png", encode_png(_img(3))),
                       (".DS_Store", b"\x00\x00\x00\x01Bud1")):
        (folder / name).write_bytes(data)
    t = list_training_set(str(folder))
    assert t["id"].to_pylist() == ["a.jpg", "sub/b.png"]
    assert decode_rows(t, None).quarantine.num_rows == 0
    # a shard's members: a tar made on macOS holds ._ files; a folder tarred whole holds a checkpoint folder;
    # and the AppleDouble file of a shard beside it was read as a damaged shard
    root = _shards(tmp_path, [("./0001.jpg", _encoded(_img(1), "JPEG")), ("./._0001.jpg", apple_double),
                              ("./0001.txt", b"cap"), ("./.ipynb_checkpoints/0001-checkpoint.jpg",
                                                       _encoded(_img(1), "JPEG"))])
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._00000.tar").write_bytes(apple_double)
    (root / "._00000.tar").write_bytes(apple_double)
    s = list_training_set(str(root))
    assert s["id"].to_pylist() == ["00000.tar/./0001.jpg"] and s["caption"].to_pylist() == ["cap"]
    assert list_training_set(str(root / "*.tar"))["id"].to_pylist() == ["00000.tar/./0001.jpg"]
    # the audit's preflight walks the folder as the listing does: hidden images are not its "first image"
    from memex.config import ConfigError
    from memex.stages.audit import check_trainset

    only_hidden = tmp_path / "only-hidden"
    (only_hidden / ".ipynb_checkpoints").mkdir(parents=True)
    (only_hidden / ".ipynb_checkpoints" / "a-checkpoint.jpg").write_bytes(_encoded(_img(1), "JPEG"))
    (only_hidden / "._a.jpg").write_bytes(apple_double)
    with pytest.raises(ConfigError, match="the folder holds no images"):
        check_trainset(str(only_hidden), {})
    check_trainset(str(folder), {})


def test_a_shard_cut_at_a_member_boundary_is_refused_not_listed_in_part(tmp_path):
    """tarfile reads a missing header as the end of the archive: a shard cut at a 512-byte boundary between
    members (a writer killed between samples, a sync stopped on a block) listed its first samples with no
    error. Cut anywhere, it is now named as not a readable tar; whole, all its samples are listed."""
    members = []
    for i in range(5):
        members += [(f"{i:04d}.jpg", _encoded(_img(i), "JPEG")), (f"{i:04d}.txt", f"caption {i}".encode())]
    root = _shards(tmp_path, members)
    assert len(list_training_set(str(root))) == 5
    raw = (root / "00000.tar").read_bytes()
    with tarfile.open(root / "00000.tar") as tf:
        tf.getmembers()
        end = tf.offset  # where the end-of-archive blocks begin (then zeros to 10,240 bytes)
    cuts = list(range(512, end + 1, 512))  # every block boundary up to the end-of-archive blocks
    boundary = 0
    for n, cut in enumerate(cuts):
        part = tmp_path / f"cut{n}"
        part.mkdir()
        (part / "00000.tar").write_bytes(raw[:cut])
        try:
            t = list_training_set(str(part))
        except IngestError as e:
            assert "is not a readable tar" in str(e) and "download it again" in str(e)
            boundary += "end-of-archive" in str(e)
        else:
            raise AssertionError(f"a shard cut at byte {cut} of {len(raw)} listed {t.num_rows} samples, no error")
    assert boundary >= 10  # the cuts between members, and the one just before the end-of-archive blocks
    (tmp_path / "padding-cut").mkdir()  # cut within the zero padding after those blocks: whole, listed
    (tmp_path / "padding-cut" / "00000.tar").write_bytes(raw[:end + 1024])
    assert len(list_training_set(str(tmp_path / "padding-cut"))) == 5


def test_a_folder_of_symlinks_lists_linked_folders_and_stamps_the_files_linked_to(tmp_path):
    """fsspec's local listing gives a linked folder as one entry and does not descend (its images were left out,
    silently), and a linked file with the link's mtime (its target written over with other pixels of the same
    size kept the stamp, so the old index was reused). DVC's and git-annex's caches and shared image pools are
    folders of links. Linked folders outside it are now listed under the link's path (a cycle once; a link to a
    folder inside it skipped, as before: its files are listed by their own paths), and a linked file is stamped
    by the later of the link and the file it points at (a link made after its target keeps its stamp)."""
    import os

    real = tmp_path / "pool" / "sub"
    real.mkdir(parents=True)
    for i in range(3):
        (real / f"b{i}.png").write_bytes(encode_png(_img(i)))
    os.symlink(tmp_path / "pool", real / "up")  # a link to an ancestor: a cycle
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode_png(_img(5)))
    os.symlink(real, folder / "linked")
    os.symlink(real / "b0.png", folder / "c.png")
    (folder / "v3").mkdir()
    (folder / "v3" / "d.png").write_bytes(encode_png(_img(6)))
    os.symlink(folder / "v3", folder / "latest")  # links inside the folder: its files are listed once, by their
    os.symlink(folder, folder / "v3" / "parent")  # own paths (a link to an ancestor too)
    t = list_training_set(str(folder))
    assert t["id"].to_pylist() == ["a.png", "c.png", "linked/b0.png", "linked/b1.png", "linked/b2.png", "v3/d.png"]
    assert decode_rows(t, None).quarantine.num_rows == 0
    stamp = dict(zip(t["id"].to_pylist(), t["stamp"].to_pylist()))["c.png"]
    # made after its target: the stamp it had before links were followed (the link's mtime), so its index key
    assert stamp == f"{os.stat(real / 'b0.png').st_size} mtime={os.lstat(folder / 'c.png').st_mtime}"
    st = os.stat(real / "b0.png")
    (real / "b0.png").write_bytes(encode_png(_img(0))[::-1])  # other bytes, the same size, a second later
    os.utime(real / "b0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = list_training_set(str(folder))
    assert dict(zip(again["id"].to_pylist(), again["stamp"].to_pylist()))["c.png"] != stamp


def test_sidecar_captions_are_read_once_a_folder_while_none_changes(tmp_path, monkeypatch):
    """An image folder's <stem>.txt captions were read one request a file on every audit (the listing runs for
    each, and each checkpoint of a nightly): ~1M GETs for a 1M-image S3 folder. With the index's cache they are
    kept a file per folder under their names and versions: a second listing reads none, and a folder whose
    sidecar changed is read again, whole, with its new text."""
    import os

    from fsspec.implementations.local import LocalFileSystem

    import memex.ingest

    monkeypatch.setattr(memex.ingest, "_KEEP_MIN_SIDECARS", 3)  # (64: a few captions gain nothing from a kept file)
    folder = tmp_path / "imgs"
    for d, n in (("a", 3), ("b", 3), ("c", 2)):
        (folder / d).mkdir(parents=True)
        for i in range(n):
            (folder / d / f"{i}.png").write_bytes(encode_png(_img(i)))
            (folder / d / f"{i}.txt").write_text(f"caption {d}{i}")
    read = []
    real = LocalFileSystem.cat_file
    monkeypatch.setattr(LocalFileSystem, "cat_file", lambda self, p, *a, **k: read.append(p) or real(self, p, *a, **k))
    cache = Store(str(tmp_path / "cache"))
    first = list_training_set(str(folder), shard_cache=cache)
    assert first["caption"].to_pylist() == [f"caption {d}{i}" for d in "ab" for i in range(3)] + \
        ["caption c0", "caption c1"] and len(read) == 8
    read.clear()
    assert list_training_set(str(folder), shard_cache=cache).equals(first)
    assert sorted(read) == [str(folder / "c" / "0.txt"), str(folder / "c" / "1.txt")]  # below the minimum: read
    read.clear()
    st = os.stat(folder / "b" / "1.txt")
    (folder / "b" / "1.txt").write_text("a new caption")
    os.utime(folder / "b" / "1.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = list_training_set(str(folder), shard_cache=cache)
    assert sorted(os.path.basename(os.path.dirname(p)) for p in read) == ["b"] * 3 + ["c"] * 2  # b whole, c
    assert again["caption"].to_pylist()[4] == "a new caption"
    # a store that gives no version (size alone): never kept, an edit of the same length would be served stale
    kept = sorted(os.listdir(tmp_path / "cache"))
    names = [str(folder / "a" / f"{i}.txt") for i in range(3)]
    got = memex.ingest._sidecar_texts(LocalFileSystem(), names, {n: {"size": 9} for n in names}, cache)
    assert got == {n: f"caption a{i}".encode() for i, n in enumerate(names)}
    assert sorted(os.listdir(tmp_path / "cache")) == kept
    assert list_training_set(str(folder))["caption"].equals(again["caption"])  # without a cache: the same rows
