"""memex.images: PNG round trips, decoding of every mode to RGB, resizing and report thumbnails."""

import io

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from memex.images import decode, encode_png, resize, thumbnail_png
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


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "1"])
def test_decode_other_modes_matches_pil_convert_rgb(mode):
    src = Image.fromarray(_noisy(20, 30, seed=1)).convert(mode)
    if mode == "RGBA":  # an alpha channel that varies, so dropping it (not compositing) is visible
        src.putalpha(Image.fromarray(np.tile(np.arange(30, dtype=np.uint8) * 8, (20, 1))))
    data = _saved(src)
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    got = decode(data)
    assert got.dtype == np.uint8 and got.shape == (20, 30, 3)
    assert np.array_equal(got, want)


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
