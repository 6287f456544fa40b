"""Image conversions: the one module that encodes, decodes, resizes and thumbnails pixels.

Every image in memex is a uint8 (H, W, 3) RGB numpy array in memory and PNG bytes at rest
(generations, matched training images, report thumbnails). The one exception: a grayscale model's
generations are (H, W, 1) and stored as 8-bit grayscale PNGs (mode "L"); `decode` reads them
back as RGB with the gray value in all three channels, so they compare with grayscale and RGB
training images alike. Training images arrive as any format
PIL reads (PNG/JPEG/WebP/BMP/GIF) and are decoded here, so the stages, training, ingestion and the
report all see the same pixels for the same bytes.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["PREPROCESS", "decode", "encode_png", "fit", "resize", "thumbnail_png", "to_aspect"]


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


def decode(data: bytes, channels: int = 3) -> np.ndarray:
    """Encoded image bytes (any format PIL reads) -> uint8 (H, W, 3) RGB, a writable copy (torch.from_numpy).

    PIL's convert("RGB"): the first frame of a GIF, alpha dropped (not composited), palette and
    greyscale expanded (an "L" PNG's gray value in all three channels). channels=1: (H, W, 1) via
    convert("L"), exact for grayscale images, ITU-R 601 luma for colour ones. Raises
    UnidentifiedImageError (not an image), OSError (truncated or corrupt), DecompressionBombError
    (too many pixels); callers turn these into their own errors.
    """
    if channels not in (1, 3):
        raise ValueError(f"decode: channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    with _open(data) as img:
        img.load()
        return np.array(img.convert("RGB" if channels == 3 else "L")).reshape(img.height, img.width, channels)


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
        rgb = img.convert("RGB")
    rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return _save_png(rgb, compress_level=6)  # keeps an ICC profile of the source, as report did


# ---- training images prepared the way a model was trained -----------------------------------
# Stable Diffusion's and most LAION trainers' recipe: resize the shorter side, centre-crop the
# rest. A 512x768 training image squashed to 512x512 instead scores tiled l2 ~0.46 against its own
# centre crop (never "extracted"); cropped first, ~0. img2dataset's resize modes, for reference:
# center_crop (the default here), no (resize: squash to the target shape) and border (pad).
PREPROCESS = ("center_crop", "resize", "pad")


def to_aspect(img: np.ndarray, height: int, width: int, mode: str = "center_crop") -> np.ndarray:
    """uint8 (H, W, C) -> the same pixels cut (center_crop) or padded (pad: black borders, centred)
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
        if h * width > w * height:  # too tall: keep the full width
            ch, cw = max(1, round(w * height / width)), w
        else:  # too wide: keep the full height
            ch, cw = h, max(1, round(h * width / height))
        top, left = (h - ch) // 2, (w - cw) // 2
        return img[top: top + ch, left: left + cw]
    if h * width > w * height:  # pad: widen
        ph, pw = h, round(h * width / height)
    else:
        ph, pw = round(w * height / width), w
    out = np.zeros((ph, pw, *img.shape[2:]), img.dtype)
    top, left = (ph - h) // 2, (pw - w) // 2
    out[top: top + h, left: left + w] = img
    return out


def fit(img: np.ndarray, size: int, mode: str = "center_crop") -> np.ndarray:
    """A training image as a square input of size x size (the index's embedder): to_aspect 1:1,
    then `resize` (bicubic)."""
    return resize(to_aspect(img, 1, 1, mode), size)
