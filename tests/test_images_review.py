"""Review fixes of image decoding and training-set reading: cut emojis in an imagefolder's metadata.jsonl,
preprocess=pad's canvases in the decode budget, takes whose output passes 2 GiB, manifest parts of other
column types, phone JPEGs read as MPO, and 16-bit RGB PNGs with a tRNS key."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memex import images, ingest, manifest
from memex.images import decode, decode_fit, encode_png, fit, thumbnail_png


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- 1. a lone surrogate escape in an imagefolder's metadata.jsonl ------------------------------------

def test_a_cut_emoji_in_folder_metadata_is_replaced_not_a_bare_unicode_error(tmp_path):
    """A scraped caption cut mid-emoji ("a cat \\ud83d") parses as JSON to a lone surrogate, which Arrow
    refused: list_training_set raised a bare UnicodeEncodeError naming no file or row. It reads as
    U+FFFD, as in a prompt .jsonl file, in a list caption too; the other rows are as they were."""
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(encode_png(_noise(8, 8)))
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "a cat \\ud83d"}\n'
        '{"file_name": "b.png", "text": ["\\ude00 a dog", "a hound"]}\n'
        '{"file_name": "c.png", "text": "a bird \\ud83d\\ude00"}\n')  # a whole pair: the emoji itself
    t = ingest.list_training_set(str(tmp_path), caption_column="text")
    assert dict(zip(t["id"].to_pylist(), t["caption"].to_pylist())) == {
        "a.png": "a cat \ufffd", "b.png": "\ufffd a dog", "c.png": "a bird \U0001f600"}


# ---- 2. preprocess=pad: the padded canvas counts in the decode budget -------------------------------

@pytest.mark.parametrize("shape, aspect", [((50, 400), None), ((400, 50), None), ((50, 400), (3, 2)),
                                           ((300, 200), (2, 3)), ((120, 120), (3, 2)), ((99, 100), None)])
def test_pad_decodes_count_their_padded_canvases_in_the_pixel_budget(monkeypatch, shape, aspect):
    """preprocess=pad pads the whole decoded image to the generations' aspect, then to a square of its long
    side, before the resize: a 16000x2000 PNG held a 16000^2 RGB canvas (+1951 MB against +292 MB cut),
    while the budget shared by decode_rows' threads counted its header's 32 Mpx, so eight such decodes
    ran at once. Now the budget is charged the image and the canvases fit builds (their sizes are
    to_aspect's), so concurrent pad decodes stay within it. The pixels are those of fit(decode()), as
    before: the index key's pixels are unchanged."""
    held: list[int] = []
    real = ingest.PixelBudget.hold
    monkeypatch.setattr(ingest.PixelBudget, "hold", lambda self, n: held.append(n) or real(self, n))
    h, w = shape
    data = encode_png(_noise(h, w))
    once = images.to_aspect(_noise(h, w), *aspect, "pad") if aspect else _noise(h, w)
    square = images.to_aspect(once, 1, 1, "pad")
    canvases = (once.size // 3 if once.shape != (h, w, 3) else 0) + (square.size // 3 if square is not once else 0)
    rows = pa.table({"id": ["x"], "image": [data]})
    for mode in ("pad", "center_crop"):
        held.clear()
        dec = ingest.decode_rows(rows, 16, preprocess=mode, aspect=aspect)
        assert held == [h * w + (canvases if mode == "pad" else 0)], (mode, held)
        assert np.array_equal(dec.images[0], fit(decode(data), 16, mode, aspect))
    held.clear()
    ingest.decode_rows(rows, None, preprocess="pad")  # decoded as stored: no canvas
    assert held == [h * w]


def test_concurrent_pad_decodes_stay_within_the_pixel_budget(monkeypatch):
    """Eight 40x320 panoramas (12,800 px each) under a budget of 110,000 px: counted by their headers, all
    eight decoded at once, each padding to a 320^2 canvas (102,400 px): ~9x the budget. Charged their
    canvases, they are decoded one at a time (each alone is over the budget, as a huge image is)."""
    live = {"now": 0, "peak": 0}
    real = images.fit

    def counted(img, size, mode="center_crop", aspect=None):  # the padded canvases exist inside fit
        side = max(img.shape[:2])
        live["now"] += side * side
        live["peak"] = max(live["peak"], live["now"])
        try:
            time.sleep(0.02)  # let the other threads in, if the budget would
            return real(img, size, mode, aspect)
        finally:
            live["now"] -= side * side

    monkeypatch.setattr(images, "fit", counted)
    pngs = [encode_png(_noise(40, 320, seed=i)) for i in range(8)]
    rows = pa.table({"id": [f"p{i}" for i in range(8)], "image": pngs})
    dec = ingest.decode_rows(rows, 16, workers=8, preprocess="pad", pixel_budget=110_000)
    assert dec.ids == rows["id"].to_pylist() and dec.quarantine.num_rows == 0
    assert live["peak"] <= 320 * 320, f"{live['peak'] // (320 * 320)} padded canvases held at once"


# ---- 3. take_rows decides on the output's size ------------------------------------------------------

def test_a_duplication_schedule_past_2_gib_of_output_takes_the_large_offset_path(monkeypatch):
    """The take path was chosen by the input's size, but duplication grows the output: a 1 GiB manifest
    with 40 images x 32 copies is 2.2 GiB taken, and Arrow's take failed "Take operation overflowed
    binary array capacity" (reproduced at that size). The limits are lowered here so that a small
    table's output is over them while its input is under: the output is cut into chunks under the
    chunk limit (Arrow's take made one), with the same rows as Arrow's take."""
    from memex.config import DuplicationGroup

    rng = np.random.default_rng(0)
    blobs = [rng.bytes(60) for _ in range(10)]
    table = pa.table({"id": [f"r{i}" for i in range(10)], "image": pa.array(blobs[:9] + [None], pa.binary())})
    monkeypatch.setattr(manifest, "ARROW_OFFSET_LIMIT", 1000)
    monkeypatch.setattr(manifest, "TAKE_CHUNK_BYTES", 400)
    assert table.nbytes < 1000
    out = manifest.expand_duplicates(table, [DuplicationGroup(copies=32, count=3)])
    assert out.num_rows == 3 * 32 + 7 and out.schema.field("image").type == pa.binary()
    src = dict(zip(table["id"].to_pylist(), table["image"].to_pylist()))
    assert out["image"].to_pylist() == [src[s] for s in out["source_id"].to_pylist()]
    assert out["image"].num_chunks > 1
    assert all(sum(len(v or b"") for v in c.to_pylist()) <= 400 for c in out["image"].chunks)


def test_taken_pieces_past_2_gib_hold_their_own_offsets(monkeypatch):
    """Each chunk the large path cuts was cast from a slice of the 64-bit array: its offsets kept their
    place in the whole, so a piece past the first 2 GiB failed to cast ("Failed casting from large_binary
    to binary: input array too large": 32 copies of 40 1 MiB images, reproduced). Each piece's offsets
    now start at 0 over its own bytes (shared, not copied), nulls kept."""
    rng = np.random.default_rng(1)
    values = [rng.bytes(int(n)) if n % 5 else None for n in rng.integers(1, 200, 30)]
    table = pa.table({"id": [str(i) for i in range(30)], "image": pa.array(values, pa.binary()),
                      "caption": pa.array([f"c{i}" * (i % 4) for i in range(30)], pa.string())})
    order = rng.permutation(30).tolist() * 2
    monkeypatch.setattr(manifest, "ARROW_OFFSET_LIMIT", 0)
    monkeypatch.setattr(manifest, "TAKE_CHUNK_BYTES", 500)
    got = manifest.take_rows(table, order)
    assert got.schema == table.schema and got.equals(table.take(order))
    for col in ("image", "caption"):
        for chunk in got[col].chunks:
            chunk.validate(full=True)
            offsets = np.frombuffer(chunk.buffers()[1], np.int32, len(chunk) + 1, chunk.offset * 4)
            assert offsets[0] == 0 and chunk.buffers()[2].size == offsets[-1], (col, offsets[:3])
    assert got["image"].num_chunks > 1


# ---- 4. manifest parts whose column types differ -----------------------------------------------------

def _parts(root, *tables) -> str:
    root.mkdir()
    for i, t in enumerate(tables):
        pq.write_table(t, root / f"part-{i}.parquet")
    return str(root)


def test_manifest_parts_with_a_null_typed_column_read_as_one_table(tmp_path):
    """pandas writes an all-None caption column as type null; pyarrow read a folder's parts with the first
    one's schema, so with that part first every reader failed: "not readable Parquet:
    ArrowNotImplementedError: Unsupported cast from string to null" (read_manifest, the training set's
    listing, prompts.source=captions). The parts are read with one schema unified over them. Two types no
    cast joins (int ids in one part, string ids in another: cast to int, "007" became "7") are refused
    naming the column and both parts."""
    from memex.config import PromptsConfig, PromptSource
    from memex.prompts import PromptError, load_prompts

    png = encode_png(_noise(8, 8))
    root = _parts(tmp_path / "m",
                  pa.table({"id": ["a", "b"], "image": [png, png], "caption": pa.array([None, None], pa.null())}),
                  pa.table({"id": ["c", "d"], "image": [png, png], "caption": ["a cat", "a dog"]}))
    want = [None, None, "a cat", "a dog"]
    assert manifest.read_manifest(root)["caption"].to_pylist() == want
    assert ingest.list_training_set(root)["caption"].to_pylist() == want
    assert ingest.list_training_set(root, images=False)["caption"].to_pylist() == want
    prompts = load_prompts(PromptsConfig(source=PromptSource.captions, path=root))["prompt"].to_pylist()
    assert sorted(prompts) == ["a cat", "a dog"]

    root = _parts(tmp_path / "ids", pa.table({"id": [1, 2], "image": [png, png]}),
                  pa.table({"id": ["007", "4"], "image": [png, png]}))
    with pytest.raises(manifest.ManifestError, match=r"column 'id' as different types: int64 in part-0\.parquet, "
                                                     r"string in part-1\.parquet.*same type"):
        manifest.read_manifest(root)
    with pytest.raises(PromptError, match=r"column 'id' as different types.*part-1\.parquet"):
        load_prompts(PromptsConfig(source=PromptSource.file, path=root, column="id"))
    # widths and units a cast joins are read as the wider
    root = _parts(tmp_path / "wide", pa.table({"id": ["a"], "image": [png], "n": pa.array([1], pa.int32())}),
                  pa.table({"id": ["b"], "image": [png], "n": pa.array([2**40], pa.int64())}))
    assert manifest.read_manifest(root)["n"].to_pylist() == [1, 2**40]


# ---- 5. phone JPEGs (MPO) decode at the JPEG's DCT scale ---------------------------------------------

def test_an_mpo_phone_jpeg_decodes_at_a_reduced_dct_scale_as_a_jpeg_does():
    """A phone JPEG with an MPF segment (a second picture: a preview, a depth map) opens in Pillow as
    format MPO and was decoded whole for the index (a 4000x3000 one: 12 Mpx, 859 ms, against 0.75 Mpx and
    190 ms as a JPEG). Its first picture is a plain JPEG: decoded at the same DCT scale, to the same
    pixels as the same picture saved as a JPEG; decoded whole (no min_side), as it was."""
    img = Image.fromarray(np.asarray(Image.fromarray(_noise(60, 80)).resize((1600, 1200), Image.BICUBIC)))
    jpg, mpo = io.BytesIO(), io.BytesIO()
    img.save(jpg, "JPEG", quality=90)
    img.save(mpo, "MPO", save_all=True, append_images=[img.resize((160, 120))], quality=90)
    jpg, mpo = jpg.getvalue(), mpo.getvalue()
    with Image.open(io.BytesIO(mpo)) as opened:
        assert opened.format == "MPO"
    assert images.decoded_pixels(mpo, 448) == images.decoded_pixels(jpg, 448) == 800 * 600
    assert np.array_equal(decode(mpo, min_side=448), decode(jpg, min_side=448))
    assert np.array_equal(decode_fit(mpo, 224, min_side=448), decode_fit(jpg, 224, min_side=448))
    assert np.array_equal(decode(mpo), decode(jpg)) and decode(mpo).shape == (1200, 1600, 3)
    with Image.open(io.BytesIO(jpg)) as im:  # the JPEG's own pixels, as they were: PIL's draft, then convert
        im.draft("RGB", (448, 448))
        assert np.array_equal(decode(jpg, min_side=448), np.asarray(im.convert("RGB")))


# ---- 6. a 16-bit RGB PNG's tRNS key ------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png16(rgb: np.ndarray, key: tuple[int, int, int] | None) -> bytes:
    """A 16-bit RGB PNG (Pillow writes none), its rows Sub-filtered (each byte minus the one a pixel, 6
    bytes, before it): the second decode must unfilter with the same pixel width."""
    h, w = rgb.shape[:2]
    raw = np.frombuffer(rgb.astype(">u2").tobytes(), np.uint8).reshape(h, w * 6).astype(np.int16)
    sub = raw.copy()
    sub[:, 6:] -= raw[:, :-6]
    rows = b"".join(b"\x01" + (r % 256).astype(np.uint8).tobytes() for r in sub)
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
    if key is not None:
        out += _chunk(b"tRNS", struct.pack(">HHH", *key))
    return out + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def test_a_16_bit_rgb_pngs_transparency_key_matches_all_16_bits():
    """Pillow decodes a 16-bit RGB PNG to 8-bit RGB (the high bytes) and compared its 16-bit tRNS key with
    those: a key over 255 (0x1234) matched no pixel, and a key of black matched every pixel under 256 (a
    dark red 0x00ff). The key is matched on all 48 bits, as the module docstring promises: those pixels
    composited onto white, the others as their high bytes; alpha=drop and an image without a key as
    before; decode_fit and the report's thumbnail see the same pixels."""
    rgb = np.zeros((3, 4, 3), np.uint16)
    rgb[0, 0] = rgb[2, 3] = (0x1234, 0x1234, 0x1234)  # the key
    rgb[0, 1] = (0x1200, 0x1234, 0x1234)  # its high bytes, another low byte
    rgb[1, 1] = (0x00FF, 0, 0)  # high bytes of black
    rgb[1, 2] = (0xFFFF, 0x8000, 0x0101)
    hi = (rgb >> 8).astype(np.uint8)
    keyed = hi.copy()
    keyed[0, 0] = keyed[2, 3] = 255
    got = decode(_png16(rgb, (0x1234, 0x1234, 0x1234)))
    assert np.array_equal(got, keyed), got[:2, :3].tolist()
    black = hi.copy()
    black[(rgb == 0).all(axis=2)] = 255
    assert np.array_equal(decode(_png16(rgb, (0, 0, 0))), black)
    assert decode(_png16(rgb, (0, 0, 0)))[1, 1].tolist() == [0, 0, 0], "0x00ff is not black's key"
    assert np.array_equal(decode(_png16(rgb, (0x1234,) * 3), alpha="drop"), hi)
    assert np.array_equal(decode(_png16(rgb, None)), hi)
    data = _png16(rgb, (0x1234,) * 3)
    assert np.array_equal(decode_fit(data, 2, "pad", (3, 2)), fit(keyed, 2, "pad", (3, 2)))
    thumb = Image.fromarray(keyed)
    thumb.thumbnail((2, 2), Image.Resampling.BICUBIC)
    assert np.array_equal(decode(thumbnail_png(data, 2)), np.asarray(thumb))
    # the keys that matched right before are matched as they were: an 8-bit RGB PNG's, a 16-bit gray PNG's
    rgb8 = _noise(30, 40)
    buf = io.BytesIO()
    Image.fromarray(rgb8).save(buf, "PNG", transparency=tuple(int(v) for v in rgb8[3, 4]))
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        rgba = np.asarray(im.convert("RGBA"))
    assert np.array_equal(decode(buf.getvalue()), np.where(rgba[..., 3:] == 0, 255, rgba[..., :3]))
    g16 = _noise(20, 30)[..., 0].astype(np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(g16).save(buf, "PNG", transparency=int(g16[1, 1]))
    gray = np.repeat((g16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
    gray[g16 == g16[1, 1]] = 255
    assert np.array_equal(decode(buf.getvalue()), gray)
