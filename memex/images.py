"""Image conversions: the one module that encodes, decodes, resizes and thumbnails pixels.

Every image in memex is a uint8 (H, W, 3) RGB numpy array in memory and PNG bytes at rest
(generations, matched training images, report thumbnails). The one exception: a grayscale model's
generations are (H, W, 1) and stored as 8-bit grayscale PNGs (mode "L"); `decode` reads them
back as RGB with the gray value in all three channels, so they compare with grayscale and RGB
training images alike. Training images arrive as any format PIL reads (ingest.IMAGE_SUFFIXES:
PNG/APNG/JPEG/WebP/AVIF/BMP/GIF/TIFF/Netpbm) and are decoded here, so the stages, training, ingestion
and the report all see the same pixels for the same bytes.

`decode` gives the RGB a viewer shows, whatever mode PIL opens the bytes in:
  * EXIF orientation applied (a phone JPEG stored sideways is shown upright);
  * alpha and transparency keys (PNG tRNS, GIF) composited onto white, as a browser shows a
    transparent PNG on a white page: the colour hidden under alpha 0 (often black) never counts;
  * 16-bit samples (I;16*, and mode I, which is how PGM and older Pillow open 16-bit data) scaled
    by the high byte (v >> 8: 65535 -> 255, 257 -> 1), the rule PIL's own decoder applies to
    16-bit RGB, RGBA and gray + alpha PNGs, so a 16-bit picture gives the same 8 bits in every
    colour type (within 1 level of round(v / 257)); clipping them, as PIL's convert does, shows
    white. An I image holding 8-bit values (0..255) therefore shows near black: I is not assumed 8-bit;
  * F (32-bit float) read as [0, 1] -> round(v * 255);
  * 1, L, P, RGB, RGBX, CMYK ((1 - C)(1 - K)) and YCbCr (JPEG's full-range BT.601) by PIL's convert.
Anything else raises UnsupportedImageError naming the mode (LAB: PIL copies its bytes as if RGB;
premultiplied La/RGBa, HSV: no file opens them), as do I samples outside 0..65535 and F samples
outside [0, 1] (0..255 floats would show white): ingestion quarantines those with that reason.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["BACKGROUND", "PREPROCESS", "UnsupportedImageError", "decode", "decode_fit", "decoded_pixels", "encode_png",
           "fit", "fit_pixels", "resize", "thumbnail_png", "to_aspect"]


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 (H, W, 3) -> RGB PNG bytes; (H, W, 1) or (H, W) -> 8-bit grayscale ("L") PNG bytes.
    zlib is deterministic: same pixels and level, same bytes.

    Level 1 by default: a noisy 512 px generation is ~420 kB in ~55 ms on one CPU core, against
    ~360 kB in ~190 ms at PIL's default level 6 (-15% bytes for 3.5x the time).
    """
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
        raise ValueError(f"encode_png takes uint8 (H, W, 3) RGB or (H, W, 1) grayscale, got {image.dtype} "
                         f"{image.shape}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]  # PIL takes 2-D arrays as mode "L", not (H, W, 1)
    return _save_png(Image.fromarray(image), compress_level)


def _save_png(img: Image.Image, compress_level: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _open(data: bytes) -> Image.Image:
    # Image.open raises DecompressionBombError past 2 x Image.MAX_IMAGE_PIXELS (~179 Mpx by default)
    # before allocating the pixels; it only reads the header, so load() is where truncation shows.
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # PIL's message holds the BytesIO's address: keep messages reproducible
        raise UnidentifiedImageError(f"cannot identify image file ({len(data)} bytes starting {data[:8]!r})") from None


BACKGROUND = 255  # white: what transparent pixels are composited onto (the module docstring says why)

# Modes PIL's convert() renders as a viewer does; those with alpha or a transparency key go
# through RGBA and are composited. The others are read from their raw samples (_gray).
_PIL_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}
_ALPHA_MODES = {"LA", "PA", "RGBA"}
_SAMPLE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


class UnsupportedImageError(ValueError):
    """An image mode with no display conversion, or samples outside the range its mode is read as."""


def _gray(img: Image.Image) -> np.ndarray:
    """uint8 (H, W) from a 16-bit, 32-bit integer (I) or float (F) image, scaled as the module says."""
    raw = np.asarray(img)  # uint16 of either byte order, int32 or float32
    lo, hi = (raw.min(), raw.max()) if raw.size else (0, 0)
    if img.mode == "F":
        if not (np.isfinite(raw).all() and 0 <= lo and hi <= 1):
            raise UnsupportedImageError(f"mode 'F' samples span [{lo:g}, {hi:g}]; F is read as [0, 1]")
        return np.rint(raw * 255).astype(np.uint8)
    if lo < 0 or hi > 65535:
        raise UnsupportedImageError(f"mode {img.mode!r} samples span [{lo}, {hi}]; {img.mode} is read as "
                                    "16-bit (0..65535)")
    return (raw >> 8).astype(np.uint8)


def _rgb(img: Image.Image, alpha: str = "white") -> np.ndarray:
    """A loaded PIL image in any supported mode -> uint8 (H, W, 3), alpha composited onto BACKGROUND;
    alpha="drop": the alpha channel (or transparency key) ignored, as PIL's convert("RGB") does."""
    mode, key = img.mode, img.info.get("transparency")
    if mode in _PIL_MODES:
        if alpha == "drop" or (mode not in _ALPHA_MODES and key is None):
            return np.array(img.convert("RGB"))
        rgba = np.array(img.convert("RGBA"))  # applies a tRNS key / palette alpha of 1, L, P, RGB
        rgb, alpha = rgba[..., :3], rgba[..., 3]
    elif mode in _SAMPLE_MODES:
        gray = _gray(img)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        if alpha == "drop" or not isinstance(key, int):  # a 16-bit PNG's tRNS key: its one transparent gray sample
            return rgb
        alpha = np.where(np.asarray(img) == key, 0, 255).astype(np.uint8)
    else:
        raise UnsupportedImageError(f"mode {mode!r} has no display conversion (supported: "
                                    f"{', '.join(sorted(_PIL_MODES | _SAMPLE_MODES))})")
    # c * a + BACKGROUND * (255 - a) <= 255 * 255: uint16 holds it (half the memory of uint32 at
    # PIL's ~179 Mpx limit); + 127 rounds to nearest (255 is odd: no ties)
    a = alpha[..., None].astype(np.uint16)
    return ((rgb * a + BACKGROUND * (255 - a) + 127) // 255).astype(np.uint8)


# Above this many pixels an image is converted a strip of rows (about this many pixels) at a time, into
# the one array it ends in. The whole image at once held, beside PIL's loaded image (4 bytes a pixel),
# convert's copy (4 more), tobytes' chunks and their join (3 + 3) before np.array's copy (3): ~16 bytes
# a pixel in all (a 12000x8000 PNG: 1.5 GB), against ~7 now. Per-pixel conversions (convert, the alpha
# composite): the same pixels either way (tests/test_huge_images.py).
_STRIP_PIXELS = 1 << 20


def _rgb_box(img: Image.Image, box: tuple[int, int, int, int], alpha: str = "white") -> np.ndarray:
    """_rgb(img, alpha)[top:bottom, left:right] for box (left, top, right, bottom), the pixels outside
    it never converted; an image over _STRIP_PIXELS is converted a strip of rows at a time. Sample
    modes (16-bit, I, F) are converted whole: their range is checked over the whole image, as ever."""
    left, top, right, bottom = box
    if img.mode in _SAMPLE_MODES or img.width * img.height <= _STRIP_PIXELS:
        rgb = _rgb(img, alpha)
        return rgb if box == (0, 0, img.width, img.height) else rgb[top:bottom, left:right]
    out = np.empty((bottom - top, right - left, 3), np.uint8)
    rows = max(1, _STRIP_PIXELS // max(1, right - left))
    for y in range(top, bottom, rows):  # crop keeps the mode, palette and transparency key (info)
        out[y - top: y - top + rows] = _rgb(img.crop((left, y, right, min(bottom, y + rows))), alpha)
    return out


def _rgb16_keyed(img: Image.Image, data: bytes | None) -> Image.Image | None:
    """A 16-bit RGB PNG with a tRNS key (not yet loaded) as an RGBA image whose alpha is 0 exactly where
    all 48 bits equal the key; None for any other image. PIL decodes such a PNG to 8-bit RGB (each
    sample's high byte) and compares the 16-bit key with those 8 bits: a key over 255 matched no pixel,
    and a key under 256 matched every pixel whose high bytes were 0. The low bytes come from a second
    decode of the same rows with the little-endian unpacker (RGB;16L takes each sample's second byte,
    which in PNG's big-endian order is the low one); the rows' filters, interlace included, are the
    same. A rare image: it costs a second decode."""
    key = img.info.get("transparency")
    if data is None or img.format != "PNG" or img.mode != "RGB" or not isinstance(key, tuple) or len(key) != 3 \
            or [t.args for t in img.tile] != ["RGB;16B"]:
        return None
    with _open(data) as low:
        low.tile = [t._replace(args="RGB;16L") for t in low.tile]
        low.load()
        lo = np.asarray(low)
    img.load()
    hi = np.asarray(img)
    k = np.array(key, np.uint16)
    transparent = ((hi == (k >> 8)) & (lo == (k & 255))).all(axis=2)
    out = Image.fromarray(np.dstack([hi, np.where(transparent, 0, 255).astype(np.uint8)]), "RGBA")
    out.info = {name: v for name, v in img.info.items() if name != "transparency"}  # EXIF orientation, ICC kept
    return out


def _loaded(img: Image.Image, data: bytes | None = None) -> Image.Image:
    """img loaded and turned upright; `data`, the bytes it was opened from: a 16-bit RGB PNG's tRNS key is
    applied exactly (_rgb16_keyed), to a new image that is returned."""
    img = _rgb16_keyed(img, data) or img
    img.load()  # Image.open read only the header: truncation shows here, as OSError
    ImageOps.exif_transpose(img, in_place=True)  # no-op without an orientation tag (or a broken EXIF)
    return img


def _pixels(img: Image.Image, alpha: str = "white", data: bytes | None = None) -> np.ndarray:
    img = _loaded(img, data)
    return _rgb_box(img, (0, 0, img.width, img.height), alpha)


def _opened(data: bytes, min_side: int | None = None) -> Image.Image:
    """_open, and a JPEG set to decode at the smallest DCT scale (1/2, 1/4, 1/8) keeping both sides >= min_side.
    MPO is a JPEG too: a phone's photo with an MPF segment (a depth map, a preview) opens as format "MPO",
    its first picture a plain baseline JPEG (a 4000x3000 one was decoded whole: 12 Mpx, not 0.75)."""
    img = _open(data)
    if min_side is not None and img.format in ("JPEG", "MPO"):
        img.draft(img.mode, (min_side, min_side))
    return img


def decoded_pixels(data: bytes, min_side: int | None = None) -> int:
    """Width x height of the image decode(data, min_side=min_side) loads (a JPEG at its DCT scale), from
    the header alone: what a caller bounding its decodes' memory counts. Raises as decode does on a
    header (UnidentifiedImageError, DecompressionBombError)."""
    with _opened(data, min_side) as img:
        return img.width * img.height


def _pad_canvases(h: int, w: int, aspect: tuple[int, int] | None) -> int:
    """Pixels of the white canvases fit(..., "pad", aspect) builds for an h x w image: one padded to
    `aspect`, then its square (to_aspect's sizes); 0 where the image already has that shape."""
    total = 0
    for height, width in ([aspect] if aspect is not None else []) + [(1, 1)]:
        if h * width == w * height:
            continue
        h, w = (h, round(h * width / height)) if h * width > w * height else (round(w * height / width), w)
        total += h * w
    return total


def fit_pixels(data: bytes, min_side: int | None = None, mode: str = "center_crop",
               aspect: tuple[int, int] | None = None) -> int:
    """What decode_fit(data, size, mode, aspect, min_side) holds at its peak, in decoded_pixels' units,
    from the header alone: the decoded image, and for mode pad the white canvases fit pads it onto
    as well (to `aspect`, then square), held with it and the square's copy for the resize. A 16000x2000
    panorama's square is 16000^2 px, 8x its own 32 Mpx: counted by their headers, eight 1000x8000 ones
    were decoded at once under ingest's budget and held 3.8 GB, against 0.7 GB counted so
    (bench/RESULTS.md). Both ways up, as an EXIF orientation may turn the image (PIL reads a PNG's
    only by loading it)."""
    with _opened(data, min_side) as img:
        h, w = img.height, img.width
    if mode != "pad":
        return h * w
    return h * w + max(_pad_canvases(h, w, aspect), _pad_canvases(w, h, aspect))


def decode(data: bytes, channels: int = 3, min_side: int | None = None, alpha: str = "white") -> np.ndarray:
    """Encoded image bytes (any format PIL reads) -> uint8 (H, W, 3) RGB, a writable copy (torch.from_numpy).

    The RGB a viewer shows (module docstring: orientation, alpha on white, 16-bit and float
    scaling), from the first frame of a GIF; an "L" PNG's gray value lands in all three channels.
    channels=1: (H, W, 1), the ITU-R 601 luma of that RGB (PIL's convert("L")), exactly the gray
    value for grayscale images. Raises UnidentifiedImageError (not an image), OSError (truncated
    or corrupt), DecompressionBombError (too many pixels), UnsupportedImageError (a mode or
    sample range with no display conversion); callers turn these into their own errors.

    min_side: the caller shrinks the image next (the index, to its embedder's input), so a JPEG may
    be decoded at 1/2, 1/4 or 1/8 scale (its DCT's own reduction, PIL's draft), the largest that
    keeps both sides >= min_side: a fraction of the work (memex/ingest.py picks min_side, and
    bench/RESULTS.md measures it). Other formats decode in full.

    alpha="drop" (trainset.alpha): transparency ignored, the colours under it kept, as a trainer that
    calls image.convert("RGB") saw the image; "white" (default) composites it onto white.
    """
    if channels not in (1, 3):
        raise ValueError(f"decode: channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if alpha not in ("white", "drop"):
        raise ValueError(f"decode: alpha must be 'white' or 'drop' (trainset.alpha), got {alpha!r}")
    with _opened(data, min_side) as img:
        rgb = _pixels(img, alpha, data)
    if channels == 1:
        return np.array(Image.fromarray(rgb).convert("L"))[..., None]
    return rgb


def is_grayscale(data: bytes) -> bool:
    """Whether encoded image bytes hold one channel (a grayscale model's "L" PNG); the header only."""
    with _open(data) as img:
        return img.mode in ("1", "L", "LA", "I", "I;16", "F")


def luma_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> its ITU-R 601 luma in all three channels (decode(channels=1)'s gray, as an
    RGB array): a colour training image as a grayscale model's generation can reproduce it."""
    return np.repeat(np.asarray(Image.fromarray(img).convert("L"))[..., None], 3, axis=2)


def resize(img: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3), bicubic; the same array when size is None or already matches."""
    if size is None or img.shape[:2] == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def thumbnail_png(png: bytes, max_side: int) -> bytes:
    """PNG bytes downscaled (bicubic, aspect kept) to at most max_side px on the long side.

    Images already small enough come back as the same bytes, not re-encoded. 512 -> 256 px is 4x
    fewer pixels to embed in a report; level 6 (PIL's default) because a report is written once.
    """
    with _open(png) as img:
        if max(img.size) <= max_side:
            return png
        rgb = Image.fromarray(_pixels(img, data=png))  # the pixels decode gives
        rgb.info["icc_profile"] = img.info.get("icc_profile")  # kept, as convert("RGB") did
    rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return _save_png(rgb, compress_level=6)


# ---- training images prepared the way a model was trained -----------------------------------
# Stable Diffusion's and most LAION trainers' recipe: resize the shorter side, centre-crop the
# rest. A 512x768 training image squashed to 512x512 instead scores tiled l2 ~0.46 against its own
# centre crop (never "extracted"); cropped first, ~0. img2dataset's resize modes, for reference:
# center_crop (the default here), no (resize: squash to the target shape) and border (pad).
PREPROCESS = ("center_crop", "resize", "pad")
PAD_VALUE = 255  # trainset.preprocess=pad's borders: img2dataset's (part of the index key: memex/stages/index.py)


def _centre_crop(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, rows, columns) of the centre cut of an h x w image to the aspect height:width."""
    if h * width > w * height:  # too tall: keep the full width
        ch, cw = max(1, round(w * height / width)), w
    else:  # too wide: keep the full height
        ch, cw = h, max(1, round(h * width / height))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def to_aspect(img: np.ndarray, height: int, width: int, mode: str = "center_crop") -> np.ndarray:
    """uint8 (H, W, C) -> the same pixels cut (center_crop) or padded (pad: white borders, centred)
    to the aspect ratio height:width, at their own resolution; resize: unchanged (the distance
    then resizes height and width separately). Sizes are matched by the distance afterwards
    (memex/distances.py: both images to their smaller common size), so a small training image is
    compared at its own resolution rather than upsampled."""
    if mode not in PREPROCESS:
        raise ValueError(f"trainset.preprocess={mode!r} is not one of {PREPROCESS}")
    h, w = img.shape[:2]
    if mode == "resize" or h * width == w * height:
        return img
    if mode == "center_crop":
        top, left, ch, cw = _centre_crop(h, w, height, width)
        return img[top: top + ch, left: left + cw]
    if h * width > w * height:  # pad: widen
        ph, pw = h, round(h * width / height)
    else:
        ph, pw = round(w * height / width), w
    # white, as img2dataset's resize_mode=border pads (cv2.BORDER_CONSTANT, value 255): black bars
    # against a model trained on its white ones measured 0.82 tiled l2 for an exact copy
    out = np.full((ph, pw, *img.shape[2:]), PAD_VALUE, img.dtype)
    top, left = (ph - h) // 2, (pw - w) // 2
    out[top: top + h, left: left + w] = img
    return out


def fit(img: np.ndarray, size: int, mode: str = "center_crop", aspect: tuple[int, int] | None = None) -> np.ndarray:
    """A training image as a square input of size x size (the index's embedder): to_aspect 1:1,
    then `resize` (bicubic). `aspect` (height, width): first to the generations' aspect, as the model
    was trained on it, so that the square holds what a generation's square holds. Without it, a 2:3
    generation's centre square is a 1.5x zoom into the training image's own centre square (an exact
    copy measured 0.22 RMS from its source in the pixels embedder, and fell out of the top k)."""
    if aspect is not None:
        img = to_aspect(img, aspect[0], aspect[1], mode)
    return resize(to_aspect(img, 1, 1, mode), size)


def _fit_box(h: int, w: int, mode: str, aspect: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the pixels of an h x w image that fit(..., mode, aspect) resizes:
    its to_aspect cuts (center_crop) one after the other; the whole image for resize."""
    top = left = 0
    for height, width in ([aspect] if aspect is not None else []) + [(1, 1)]:
        if mode == "center_crop" and h * width != w * height:
            t, u, h, w = _centre_crop(h, w, height, width)
            top, left = top + t, left + u
    return left, top, left + w, top + h


def _fit_part(data: bytes, mode: str, aspect: tuple[int, int] | None, min_side: int | None,
              alpha: str) -> tuple[np.ndarray, bool]:
    """(pixels, cut): the decoded pixels fit keeps (cut), or the whole image (pad). PIL's loaded image is
    freed when this returns, before the resize; the whole image's RGB is never made (fit after decode
    held it through the cut and the resize, beside a copy of the cut)."""
    with _opened(data, min_side) as opened:
        img = _loaded(opened, data)
        if mode == "pad":
            return _rgb_box(img, (0, 0, img.width, img.height), alpha), False
        return _rgb_box(img, _fit_box(img.height, img.width, mode, aspect), alpha), True


def decode_fit(data: bytes, size: int, mode: str = "center_crop", aspect: tuple[int, int] | None = None,
               min_side: int | None = None, alpha: str = "white") -> np.ndarray:
    """fit(decode(data, min_side=min_side, alpha=alpha), size, mode, aspect): the same pixels, with less
    held on the way: only the pixels the cut keeps are converted to RGB (a strip at a time on a large
    image, _rgb_box), and the loaded image is freed before the resize. Raises as decode does."""
    if mode not in PREPROCESS:
        raise ValueError(f"trainset.preprocess={mode!r} is not one of {PREPROCESS}")
    part, cut = _fit_part(data, mode, aspect, min_side, alpha)
    return resize(part, size) if cut else fit(part, size, mode, aspect)
