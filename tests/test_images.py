"""memex.images: PNG round trips, decoding of every mode to RGB, resizing and report thumbnails."""

import io

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from memex.images import UnsupportedImageError, decode, encode_png, resize, thumbnail_png
from memex.synth import logo


def _noisy(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _saved(img: Image.Image, fmt: str = "PNG") -> bytes:
    # deliberately not encode_png: these are inputs memex did not write (other modes and formats)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("level", [1, 6, 9])
def test_png_round_trip_is_lossless_and_deterministic(level):
    img = _noisy(24, 40)  # not square: height and width must not be swapped
    data = encode_png(img, level)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert data == encode_png(img.copy(), level)  # same pixels, same bytes
    out = decode(data)
    assert out.dtype == np.uint8 and out.shape == (24, 40, 3) and np.array_equal(out, img)
    assert out.flags.writeable  # torch.from_numpy warns on read-only arrays


@pytest.mark.parametrize("shape", [(24, 40, 1), (24, 40)])
def test_grayscale_is_stored_as_an_l_png_and_decodes_to_rgb(shape):
    gray = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(gray)
    assert Image.open(io.BytesIO(data)).mode == "L"
    assert data == encode_png(gray.reshape(24, 40, 1))  # (H, W) and (H, W, 1): the same bytes
    rgb = decode(data)  # every caller gets (H, W, 3): the gray value in all three channels
    assert rgb.shape == (24, 40, 3) and np.array_equal(rgb, np.repeat(gray.reshape(24, 40, 1), 3, axis=2))
    assert np.array_equal(decode(data, channels=1), gray.reshape(24, 40, 1))


def test_decode_to_one_channel_is_pil_luma_for_colour():
    data = encode_png(_noisy(8, 8))
    assert np.array_equal(decode(data, channels=1)[:, :, 0], np.asarray(Image.open(io.BytesIO(data)).convert("L")))
    with pytest.raises(ValueError, match="channels must be 1 .* or 3"):
        decode(data, channels=4)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 2), np.uint8),
                                 np.zeros((4, 4, 3), np.float32)])
def test_encode_refuses_other_channel_counts_and_dtypes(bad):
    with pytest.raises(ValueError, match=r"encode_png takes uint8 \(H, W, 3\) RGB or \(H, W, 1\) grayscale"):
        encode_png(bad)


def test_compress_level_changes_bytes_not_pixels():
    img = logo(3, 64)[0]
    fast, small = encode_png(img, 1), encode_png(img, 9)
    assert fast != small and len(small) < len(fast)
    assert np.array_equal(decode(fast), decode(small))
    assert encode_png(img) == fast  # level 1 is the default


# ---- every mode PIL opens, against a reference built with numpy from the raw samples ---------
def _white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference compositing onto white, in float64."""
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)


def _rep(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2).astype(np.uint8)


def _png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour): 0 gray, 2 RGB, 4 gray + alpha."""
    import struct
    import zlib

    h, w = samples.shape[:2]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = samples.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))  # filter type 0 on every row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _case(name: str) -> tuple[bytes, str, np.ndarray, bool]:
    """(encoded bytes, the mode PIL opens them in, the RGB a viewer shows, whether that is gray)."""
    rng = np.random.default_rng(7)
    h, w = 12, 20  # not square: a transposed result fails
    u8 = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    u16 = rng.integers(0, 65536, (h, w, 3), dtype=np.uint16)
    u16[0, :4, 0] = [0, 255, 256, 65535]  # the ends and the first step of the scale
    alpha = u8[..., 3].copy()
    alpha[0, :3] = [0, 128, 255]
    pal = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = u8[..., 0]
    if name == "1":
        bits = u8[..., 0] > 127
        return _saved(Image.fromarray(bits)), "1", _rep(bits * 255), True
    if name in ("L", "L+tRNS"):
        gray = u8[..., 0]
        if name == "L":
            return _saved(Image.fromarray(gray)), "L", _rep(gray), True
        buf = io.BytesIO()
        Image.fromarray(gray).save(buf, format="PNG", transparency=int(gray[0, 0]))
        return buf.getvalue(), "L", _white(_rep(gray), np.where(gray == gray[0, 0], 0, 255)), True
    if name == "LA":
        return _saved(Image.fromarray(np.stack([u8[..., 0], alpha], -1))), "LA", _white(_rep(u8[..., 0]), alpha), True
    if name in ("P", "P+tRNS"):
        img = Image.fromarray(idx, "P")
        img.putpalette(pal.tobytes())
        if name == "P":
            return _saved(img), "P", pal[idx], False
        pal_alpha = rng.integers(0, 256, 256, dtype=np.uint8)
        buf = io.BytesIO()
        img.save(buf, format="PNG", transparency=pal_alpha.tobytes())
        return buf.getvalue(), "P", _white(pal[idx], pal_alpha[idx]), False
    if name == "PA":  # TIFF is the format that opens as PA
        img = Image.frombytes("PA", (w, h), np.stack([idx, alpha], -1).tobytes())
        img.putpalette(pal.tobytes())
        return _saved(img, "TIFF"), "PA", _white(pal[idx], alpha), False
    if name in ("RGB", "RGB+tRNS"):
        rgb = u8[..., :3]
        if name == "RGB":
            return _saved(Image.fromarray(rgb)), "RGB", rgb, False
        rgb[3] = rgb[0, 0]  # a whole row in the key colour
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG", transparency=tuple(int(v) for v in rgb[0, 0]))
        return buf.getvalue(), "RGB", _white(rgb, np.where((rgb == rgb[0, 0]).all(-1), 0, 255)), False
    if name == "RGBA":
        return _saved(Image.fromarray(np.dstack([u8[..., :3], alpha]))), "RGBA", _white(u8[..., :3], alpha), False
    if name == "CMYK":  # (1 - C)(1 - K), PIL's naive (profile-free) rule
        c, k = u8[..., :3].astype(np.float64), u8[..., 3:].astype(np.float64)
        return (_saved(Image.frombytes("CMYK", (w, h), u8.tobytes()), "TIFF"), "CMYK",
                np.rint((255 - c) * (255 - k) / 255).astype(np.uint8), False)
    if name == "YCbCr":  # JPEG's full-range BT.601
        y, cb, cr = (u8[..., i].astype(np.float64) for i in range(3))
        rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                        y + 1.772 * (cb - 128)], -1)
        return (_saved(Image.frombytes("YCbCr", (w, h), u8[..., :3].tobytes()), "TIFF"), "YCbCr",
                np.clip(np.rint(rgb), 0, 255).astype(np.uint8), False)
    gray16 = u16[..., 0]
    if name in ("I;16", "I;16+tRNS"):
        if name == "I;16":
            return _saved(Image.fromarray(gray16)), "I;16", _rep(gray16 >> 8), True
        buf = io.BytesIO()
        Image.fromarray(gray16).save(buf, format="PNG", transparency=int(gray16[1, 1]))
        return buf.getvalue(), "I;16", _white(_rep(gray16 >> 8), np.where(gray16 == gray16[1, 1], 0, 255)), True
    if name == "I;16B":
        return _saved(Image.frombytes("I;16B", (w, h), gray16.astype(">u2").tobytes()), "TIFF"), "I;16B", \
            _rep(gray16 >> 8), True
    if name == "I;16L":  # PIL's own IM format keeps this mode (deprecated: Pillow 15 drops IM)
        if "IM" not in Image.SAVE:
            pytest.skip("this Pillow has no IM format, the one that opens as I;16L")
        data = _saved(Image.frombytes("I;16L", (w, h), gray16.astype("<u2").tobytes()), "IM")
        return data, "I;16L", _rep(gray16 >> 8), True
    if name == "I":
        return _saved(Image.fromarray(gray16.astype(np.int32)), "TIFF"), "I", _rep(gray16 >> 8), True
    if name == "PGM16":  # how 16-bit PGM (maxval 65535) opens: mode I
        return f"P5\n{w} {h}\n65535\n".encode() + gray16.astype(">u2").tobytes(), "I", _rep(gray16 >> 8), True
    if name == "F":
        f = rng.random((h, w), dtype=np.float32)
        f[0, :2] = [0, 1]
        return _saved(Image.fromarray(f), "TIFF"), "F", _rep(np.rint(f.astype(np.float64) * 255)), True
    if name == "PNG16-gray":
        return _png16(gray16, 0), "I;16", _rep(gray16 >> 8), True
    if name == "PNG16-RGB":  # PIL's decoder keeps the high byte: the rule decode applies to I;16 too
        return _png16(u16, 2), "RGB", (u16 >> 8).astype(np.uint8), False
    if name == "PNG16-LA":  # PIL opens 16-bit gray + alpha as RGBA (high bytes)
        a16 = u16[..., 1]
        return _png16(np.stack([gray16, a16], -1), 4), "RGBA", _white(_rep(gray16 >> 8), a16 >> 8), True
    raise AssertionError(name)


MODE_CASES = ["1", "L", "L+tRNS", "LA", "P", "P+tRNS", "PA", "RGB", "RGB+tRNS", "RGBA", "CMYK", "YCbCr",
              "I;16", "I;16+tRNS", "I;16B", "I;16L", "I", "PGM16", "F", "PNG16-gray", "PNG16-RGB", "PNG16-LA"]


@pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", MODE_CASES)
def test_decode_every_mode_to_the_rgb_a_viewer_shows(name):
    data, mode, want, gray = _case(name)
    assert Image.open(io.BytesIO(data)).mode == mode  # the case really exercises that mode
    got = decode(data)
    assert got.dtype == np.uint8 and got.shape == want.shape and got.flags.writeable
    # YCbCr: PIL's fixed-point tables are within 1 level of the exact formula
    assert np.abs(got.astype(int) - want).max() <= (1 if mode == "YCbCr" else 0)
    luma = decode(data, channels=1)
    assert luma.shape == (*want.shape[:2], 1)
    if gray:  # a grayscale image's luminance is its (scaled, composited) gray value, exactly
        assert np.array_equal(luma[..., 0], want[..., 0])
    else:  # ITU-R 601 luma of the viewer's RGB (PIL's fixed point: within 1 level)
        ref = np.rint(want.astype(np.float64) @ [0.299, 0.587, 0.114])
        assert np.abs(luma[..., 0].astype(int) - ref).max() <= 1


def test_16_bit_grayscale_is_scaled_not_clipped_to_white():
    ramp = np.linspace(0, 65535, 64 * 48).astype(np.uint16).reshape(48, 64)  # a 16-bit picture
    got = decode(_saved(Image.fromarray(ramp)))
    assert got.min() == 0 and got.max() == 255 and (got == 255).mean() < 0.01  # was all 255 (PIL's clip)
    # the picture exported at 8 bits decodes to the same pixels, so either copy matches the other
    assert np.array_equal(got, decode(_saved(Image.fromarray((ramp >> 8).astype(np.uint8)))))
    assert np.abs(got[..., 0].astype(int) - np.round(ramp / 257)).max() <= 1  # v >> 8 is within 1 of v / 257
    # report thumbnails go through the same conversion
    eight = encode_png((ramp >> 8).astype(np.uint8))
    assert np.array_equal(decode(thumbnail_png(_saved(Image.fromarray(ramp)), 16)), decode(thumbnail_png(eight, 16)))


def test_transparent_pixels_show_the_white_background_not_their_hidden_colour():
    rgba = np.zeros((4, 6, 4), np.uint8)  # black everywhere, alpha 0 on the left half
    rgba[:, 3:, 3] = 255
    got = decode(_saved(Image.fromarray(rgba)))
    assert (got[:, :3] == 255).all() and (got[:, 3:] == 0).all()


# EXIF orientation -> how to store the upright picture A so that a viewer shows A (the inverse of
# the tag's display transform, from the EXIF 2.3 table)
_STORED = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, 1),
           7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, -1)}


@pytest.mark.parametrize("orientation", sorted(_STORED))
def test_exif_orientation_is_applied(orientation):
    upright = _noisy(10, 16, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(_STORED[orientation](upright))).save(buf, format="PNG", exif=exif)
    assert np.array_equal(decode(buf.getvalue()), upright)
    assert np.array_equal(decode(buf.getvalue(), channels=1)[..., 0],
                          np.asarray(Image.fromarray(upright).convert("L")))


def test_sideways_jpeg_is_shown_upright():
    upright = np.repeat(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], 3, axis=2).repeat(32, 0)  # 32x64
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated 90 degrees counter-clockwise, as a phone held upright writes it
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(buf, format="JPEG", quality=95, exif=exif)
    got = decode(buf.getvalue())
    assert got.shape == (32, 64, 3) and np.abs(got.astype(int) - upright).mean() < 2


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_sideways_jpeg_shrunk_for_the_index_is_upright_before_the_crop(orientation):
    """The index decodes a large JPEG at a reduced DCT scale (decode(min_side=...)), then fits it to the
    embedder's square: the rotation must come first, the right way round (90 and 270 degrees both
    tested: a gradient along the width turned the wrong way runs the other direction)."""
    from memex.images import fit

    x = np.linspace(0, 255, 1024)[None, :, None]
    y = np.linspace(0, 120, 512)[:, None, None]
    upright = np.clip(x * np.array([1.0, 0.5, 0.2]) + y, 0, 255).astype(np.uint8)  # 512x1024, no symmetry
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(_STORED[orientation](upright))).save(buf, format="JPEG", quality=95,
                                                                             exif=exif)
    got = fit(decode(buf.getvalue(), min_side=64), 64)
    assert got.shape == (64, 64, 3)
    assert np.abs(got.astype(int) - fit(upright, 64)).mean() < 2
    wrong = fit(np.ascontiguousarray(upright[::-1, ::-1]), 64)  # what turning the wrong way round shows
    assert np.abs(wrong.astype(int) - fit(upright, 64)).mean() > 20  # the test tells the two turns apart


def test_a_jpeg_shrunk_for_the_index_is_decoded_at_its_dct_scale():
    """The index fits each training image to its embedder's input (32-224 px). A large JPEG is decoded
    at the reduced DCT scale that keeps both sides >= that input (3x faster at 2048 px, bench/RESULTS.md),
    within about a level of 255 of the full decode once fitted; orientation still applies, other formats
    decode in full, and the index's decode_rows takes this path."""
    import pyarrow as pa

    from memex.images import fit
    from memex.ingest import decode_rows

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 2048)[None, :, None] * np.linspace(0.2, 1, 1536)[:, None, None]
    photo = (ramp + rng.normal(0, 12, (1536, 2048, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    full = decode(jpeg)
    assert full.shape == (1536, 2048, 3)
    assert decode(jpeg, min_side=224).shape == (384, 512, 3)  # 1/4: 1/8 would give 192 < 224 rows
    assert decode(jpeg, min_side=32).shape == (192, 256, 3)  # 1/8, the smallest the DCT gives
    assert decode(jpeg, min_side=2000).shape == full.shape  # no reduction keeps 2000: a full decode
    for side in (32, 224):
        diff = np.abs(fit(decode(jpeg, min_side=side), side).astype(int) - fit(full, side))
        assert diff.mean() < 1.5 and diff.max() <= 12, (side, diff.mean(), diff.max())
    rows = pa.table({"id": ["a"], "image": [jpeg]})
    got = decode_rows(rows, 224).images[0]  # the index reduces no further than DRAFT_MIN_SIDE (448): 1/2 here
    assert np.array_equal(got, fit(decode(jpeg, min_side=448), 224)) and not np.array_equal(got, fit(full, 224))
    # the same logo stored at 1600 and 400 px: reduced to 32 px each, 1/8 and 1/4 put them 0.065 RMS
    # apart (past index.dup_threshold, 0.05); as decode_rows reduces them, as far apart as full decodes
    from memex.synth import logo

    def stored(side: int, quality: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(logo(1, 256)[0]).resize((side, side * 3 // 4), Image.BICUBIC).save(out, "JPEG",
                                                                                       quality=quality)
        return out.getvalue()

    pair = pa.table({"id": ["big", "small"], "image": [stored(1600, 90), stored(400, 75)]})
    rms = [np.sqrt((((a.astype(float) - b) / 255) ** 2).mean()) for a, b in
           [decode_rows(pair, 32).images, [fit(decode(x), 32) for x in pair["image"].to_pylist()]]]
    assert rms[0] <= rms[1] + 0.002, rms
    # a sideways phone JPEG is still turned upright, and a PNG decodes in full
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(photo, 1))).save(buf, format="JPEG", quality=90, exif=exif)
    assert decode(buf.getvalue(), min_side=224).shape == (384, 512, 3)
    png = encode_png(photo[:256, :512])
    assert np.array_equal(decode(png, min_side=32), decode(png))


def _tiff(img: Image.Image) -> bytes:
    return _saved(img, "TIFF")


@pytest.mark.parametrize("data, reason", [
    (_tiff(Image.frombytes("LAB", (4, 3), bytes(range(36)))), r"mode 'LAB' has no display conversion"),
    (_tiff(Image.fromarray(np.array([[0, 70000]], np.int32))), r"mode 'I' samples span \[0, 70000\]"),
    (_tiff(Image.fromarray(np.array([[-1, 5]], np.int32))), r"mode 'I' samples span \[-1, 5\]"),
    (_tiff(Image.fromarray(np.array([[0, 200]], np.float32))), r"mode 'F' samples span \[0, 200\]"),
    (_tiff(Image.fromarray(np.array([[0, np.nan]], np.float32))), r"mode 'F' samples span"),
])
def test_modes_and_ranges_without_a_display_conversion_raise_naming_the_mode(data, reason):
    with pytest.raises(UnsupportedImageError, match=reason):
        decode(data)
    with pytest.raises(ValueError):  # a ValueError: manifest.decode_image's except catches it too
        decode(data, channels=1)


def test_decode_other_formats_and_first_gif_frame():
    img = _noisy(16, 16, seed=2)
    assert np.array_equal(decode(_saved(Image.fromarray(img), "BMP")), img)  # lossless formats: exact
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert (decode(buf.getvalue()) == 0).all()  # first frame (black), not the last (white)


def test_resize_to_size_and_no_op_cases():
    img = logo(0, 32)[0]
    small = resize(img, 16)
    assert small.shape == (16, 16, 3) and small.dtype == np.uint8
    assert np.array_equal(small, np.asarray(Image.fromarray(img).resize((16, 16), Image.BICUBIC)))
    assert resize(img, None) is img and resize(img, 32) is img  # nothing to do: not even a copy
    assert resize(_noisy(24, 40), 24).shape == (24, 24, 3)  # a matching height alone is not enough


def test_thumbnail_bounds_the_long_side_and_keeps_small_images():
    wide = encode_png(_noisy(100, 300))
    thumb = thumbnail_png(wide, 64)
    assert decode(thumb).shape == (21, 64, 3)  # long side 64, aspect kept (100 * 64 / 300 = 21.3)
    assert thumbnail_png(thumb, 64) == thumb
    small = encode_png(logo(1, 32)[0])
    assert thumbnail_png(small, 32) is small and thumbnail_png(small, 256) is small  # not re-encoded
    tall_rgba = _saved(Image.fromarray(_noisy(80, 40)).convert("RGBA"))
    assert decode(thumbnail_png(tall_rgba, 20)).shape == (20, 10, 3)


@pytest.mark.parametrize("data", [b"definitely not an image", b"", b"\x89PNG garbage"])
def test_corrupt_bytes_raise_a_reproducible_message(data):
    with pytest.raises(UnidentifiedImageError) as first:
        decode(data)
    with pytest.raises(UnidentifiedImageError) as second:
        decode(bytes(data))  # another BytesIO at another address: PIL's own message would differ
    want = f"cannot identify image file ({len(data)} bytes starting {data[:8]!r})"
    assert str(first.value) == str(second.value) == want
    with pytest.raises(UnidentifiedImageError, match="cannot identify image file"):
        thumbnail_png(data, 8)


def test_truncated_png_raises_oserror():
    good = encode_png(_noisy(32, 32))
    with pytest.raises(OSError, match="truncated"):
        decode(good[: len(good) // 2])
