"""Training images far above LAION's size (a 12000x8000 PNG: 96 MP, 288 MB as RGB) in the index's decode.

decode_rows decoded every row of a batch on 8 threads at once, each image whole, with ~16 bytes a
pixel of copies on the way (PIL's image, convert's copy, tobytes' chunks and join, np.array's): a
shard with a few such images took several GB and its worker was OOM-killed. Now the threads share a
budget of decoded pixels (ingest.DECODE_PIXEL_BUDGET: an image over it is decoded alone), only the
pixels the centre cut keeps are converted, a strip at a time (images.decode_fit), and the pixels that
come out are the same. A decompression bomb is quarantined before any pixel is decoded, its reason
naming the way to have it read.
"""

from __future__ import annotations

import io
import threading
import time
import tracemalloc
import weakref

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageFile, ImageOps

from memex import images
from memex.images import encode_png, fit
from memex.ingest import decode_rows


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth picture with grain: every pixel differs, so a wrong cut or resize shows."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.int16)
    return np.clip(base + rng.integers(-6, 7, (h, w, 3)), 0, 255).astype(np.uint8)


def _save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _plain(data: bytes, size: int | None, mode: str = "center_crop", aspect=None, alpha: str = "white") -> np.ndarray:
    """What decode_rows gave before: the whole image decoded (a JPEG at its DCT scale for the index)
    and converted at once (images._rgb), then images.fit."""
    with Image.open(io.BytesIO(data)) as img:
        if size is not None and img.format == "JPEG":
            side = max(2 * size, 448)  # ingest.DRAFT_MIN_SIDE
            img.draft(img.mode, (side, side))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        rgb = images._rgb(img, alpha)
    return rgb if size is None else fit(rgb, size, mode, aspect)


class _Live:
    """Decoded pixels alive at once: an image counts from its load until PIL's image is freed."""

    def __init__(self, monkeypatch, hold_s: float = 0.05):
        self.lock, self.now, self.peak, self.alone = threading.Lock(), 0, 0, {}
        load = ImageFile.ImageFile.load

        def counted_load(img):
            first = not getattr(img, "_live_counted", False)
            out = load(img)
            if first:
                img._live_counted = True
                n = img.width * img.height
                with self.lock:
                    self.now += n
                    self.peak = max(self.peak, self.now)
                    self.alone[n] = self.alone.get(n, True) and self.now == n
                weakref.finalize(img, self._freed, n)
                time.sleep(hold_s)  # keep it alive a while: decodes that may overlap do
            return out

        monkeypatch.setattr(ImageFile.ImageFile, "load", counted_load)

    def _freed(self, n: int) -> None:
        with self.lock:
            self.now -= n


def test_concurrent_decodes_stay_within_the_pixel_budget(monkeypatch):
    """8 threads, 8 images of 60k pixels and a budget of 150k: at most 2 decoded at a time (they held
    all 8 at once), and an image over the budget is decoded alone, not refused; the same pixels."""
    from memex import ingest

    small = [encode_png(_noise(200, 300, seed=i)) for i in range(8)]
    big = encode_png(_noise(400, 500, seed=9))  # 200k pixels > the budget
    rows = pa.table({"id": [f"s{i}" for i in range(8)] + ["big"], "image": small + [big]})
    monkeypatch.setattr(ingest, "DECODE_PIXEL_BUDGET", 150_000, raising=False)
    live = _Live(monkeypatch)
    dec = decode_rows(rows, 32, workers=8)
    assert dec.quarantine.num_rows == 0 and dec.ids == rows["id"].to_pylist()
    assert live.peak <= 200_000 and live.alone[200_000], "the image over the budget is decoded alone"
    assert live.peak >= 120_000, "decodes under the budget still overlap"
    live.peak = 0
    decode_rows(rows.slice(0, 8), 32, workers=8)
    assert live.peak <= 150_000, f"{live.peak} decoded pixels held at once, over the budget of 150000"
    for got, data in zip(dec.images, small + [big]):
        assert np.array_equal(got, _plain(data, 32))
    assert np.array_equal(dec.images, decode_rows(rows, 32, workers=1, pixel_budget=10**9).images)


def _cases() -> dict[str, bytes]:
    """Every kind of image decode converts, odd sizes (centre cuts off by one show)."""
    rgb = _noise(61, 90)
    rgba = np.dstack([rgb, np.tile(np.arange(90, dtype=np.uint8) * 2, (61, 1))])
    pal = Image.fromarray(rgb).quantize(16)
    key = Image.fromarray(rgb)
    key.info["transparency"] = tuple(int(v) for v in rgb[30, 40])
    cmyk = Image.fromarray(rgb).convert("CMYK")
    sideways = Image.fromarray(_noise(1000, 960, seed=3))  # > 896: the index decodes it at 1/2
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "rgb": encode_png(rgb), "rgb_tall": encode_png(np.ascontiguousarray(rgb.transpose(1, 0, 2))),
        "rgba": _save(Image.fromarray(rgba)), "la": _save(Image.fromarray(rgba[..., ::3][..., :2].copy(), "LA")),
        "l": _save(Image.fromarray(rgb[..., 0])), "one": _save(Image.fromarray(rgb[..., 0] > 128)),
        "p_trns": _save(pal, transparency=3), "gif": _save(pal, "GIF", transparency=5),
        "rgb_key": _save(key, transparency=key.info["transparency"]),
        "cmyk_jpeg": _save(cmyk, "JPEG", quality=95),
        "i16": _save(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)),
        "jpeg_sideways": _save(sideways, "JPEG", quality=90, exif=exif),
        "big_png": encode_png(_noise(1100, 1500, seed=4)),  # 1.65 MP: over images._STRIP_PIXELS as shipped
    }


@pytest.mark.parametrize("strip", [None, 500])
def test_large_images_give_the_same_pixels_as_a_whole_decode(monkeypatch, strip):
    """The cut-and-strip conversion (strip=500 pixels: every case above goes through it) gives exactly
    the pixels of the whole-image decode then fit, for every mode, preprocess, aspect and alpha."""
    if strip is not None:
        monkeypatch.setattr(images, "_STRIP_PIXELS", strip, raising=False)
    cases = _cases()
    rows = pa.table({"id": list(cases), "image": list(cases.values())})
    for mode, aspect, alpha in [("center_crop", None, "white"), ("center_crop", (3, 2), "drop"),
                                ("center_crop", (2, 3), "white"), ("resize", None, "white"), ("pad", (3, 2), "white")]:
        dec = decode_rows(rows, 16, preprocess=mode, aspect=aspect, alpha=alpha)
        assert dec.quarantine.num_rows == 0 and dec.ids == list(cases)
        for name, got in zip(dec.ids, dec.images):
            assert np.array_equal(got, _plain(cases[name], 16, mode, aspect, alpha)), (name, mode, aspect, alpha)
    full = decode_rows(rows, None)  # as stored (memex mia, match's training pixels)
    for name, got in zip(full.ids, full.images):
        assert np.array_equal(got, _plain(cases[name], None)) and got.flags.writeable, name
    lab = _save(Image.fromarray(_noise(40, 50)).convert("LAB"), "TIFF")
    bad = decode_rows(pa.table({"id": ["lab"], "image": [lab]}), 16).quarantine["reason"][0].as_py()
    assert bad.startswith("UnsupportedImageError: mode 'LAB'")


def test_a_large_decode_holds_no_whole_image_copies():
    """A 12 MP PNG fitted to 32 px: the numpy arrays and Python bytes allocated on the way stay under 4
    bytes a pixel (3.4 measured: the centre square's RGB, 2.25, one strip's copies, the row's encoded
    bytes); the whole decode held 6.6 (tobytes' chunks and their join, np.array's copy, then fit's copy
    of the square), beside PIL's own image."""
    h, w = 3000, 4000
    png = encode_png(np.asarray(Image.fromarray(_noise(h // 10, w // 10)).resize((w, h), Image.BICUBIC)))
    rows = pa.table({"id": ["huge"], "image": [png]})
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        dec = decode_rows(rows, 32, workers=1)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert dec.ids == ["huge"]
    assert peak < 4 * h * w, f"{peak / (h * w):.1f} bytes a pixel held on the way"
    assert np.array_equal(dec.images[0], _plain(png, 32))


def test_a_decompression_bomb_is_quarantined_naming_the_fix(monkeypatch):
    """An image over PIL's limit (2 x Image.MAX_IMAGE_PIXELS, ~179 MP) is quarantined from its header,
    before any pixel is decoded and without holding the budget, with a reason that says what to do;
    the rest of the batch decodes, on threads and with a budget that lets one image through at a time.
    One between the limit and twice it (PIL warns) is decoded."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    ok = [encode_png(_noise(20, 20, seed=i)) for i in range(4)]
    rows = pa.table({"id": ["a", "bomb", "b", "c", "warned", "d"],
                     "image": [ok[0], encode_png(_noise(50, 50)), ok[1], ok[2], encode_png(_noise(40, 40)), ok[3]]})
    from memex import ingest

    monkeypatch.setattr(ingest, "DECODE_PIXEL_BUDGET", 400, raising=False)
    for size in (16, None):
        with pytest.warns(Image.DecompressionBombWarning):
            dec = decode_rows(rows, size, workers=8)
        assert dec.ids == ["a", "b", "c", "warned", "d"]
        (reason,) = dec.quarantine["reason"].to_pylist()
        assert dec.quarantine["id"].to_pylist() == ["bomb"]
        assert reason.startswith("DecompressionBombError: Image size (2500 pixels) exceeds limit of 2000 pixels")
        assert "left out" in reason and "downscaled" in reason, reason
