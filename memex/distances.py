"""Image distances of the extraction attack (definitions: docs/method.md#distances).

tiled l2: images in [0, 1], split into a 4 x 4 grid of non-overlapping tiles; per tile the
root-mean-square difference over its pixels and channels; the distance is the max over the 16
tiles (every region must match, not just the background). At 32 px a tile is 8 x 8 pixels, at
512 px 128 x 128. Images of different sizes are first resized to the smaller common size with
bilinear interpolation (antialiased), so a 64 px generation compares with a 32 px training image.

plain l2 (`l2_pairwise`, `relative_l2`): the root-mean-square difference over all channels and
pixels, sqrt(mean over C, H, W), so it lies in [0, 1] for images in [0, 1] whatever their size
(the paper's l2 normalised by the dimension). The CIFAR-10 relative distance is
d = l2(gen, nearest) / (alpha * mean l2(gen, z) over its n nearest training images z).

Every function runs on the device its inputs are on (CPU or GPU) and returns tensors there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from memex.config import MemexError

GRID = 4


class DistanceError(MemexError, ValueError):
    """Inputs of the wrong shape or a bad parameter; the message names the expected shape or range."""


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [0, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float() / 255.0


def common_size(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) at which two images are compared: the smaller of each, cut to the grid."""
    h, w = min(a[0], b[0]), min(a[1], b[1])
    return h - h % GRID, w - w % GRID


def at_size(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) at `size` (antialiased bilinear, as every comparison resizes); as it is if already."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)


def _common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    size = common_size(a.shape[-2:], b.shape[-2:])
    return at_size(a, size), at_size(b, size)


def tiled_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise distance of two (N, 3, H, W) batches in [0, 1] -> (N,)."""
    a, b = _common(a, b)
    n, c, h, w = a.shape
    d = (a - b).pow(2).reshape(n, c, GRID, h // GRID, GRID, w // GRID)
    return d.mean(dim=(1, 3, 5)).sqrt().flatten(1).max(dim=1).values


def tile_detail(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N,): the tiled l2 between each image and its own 4 x 4 mosaic of
    tile means (every tile flattened to its mean colour). Below the match threshold, a picture is
    *low complexity*: any generation with roughly the right 16 tile colours (dark sky, a blank
    background) is within the threshold of it, so a pixel distance alone cannot call it a copy.
    The 256 demo logos (32 px): 0.10 to 0.43, median 0.27; 8 of them are below 0.15."""
    n, c, h, w = x.shape
    h, w = h - h % GRID, w - w % GRID
    t = x[..., :h, :w].reshape(n, c, GRID, h // GRID, GRID, w // GRID)
    dev = (t - t.mean(dim=(3, 5), keepdim=True)).pow(2).mean(dim=(1, 3, 5)).sqrt()  # (N, GRID, GRID)
    return dev.flatten(1).max(dim=1).values


# Pairwise tiled l2 in bounded memory. Per tile t, sum((a_t - b_t)^2) = |a_t|^2 + |b_t|^2 - 2 a_t.b_t:
# one matmul per tile over blocks of rows and columns, the max over tiles kept in an (N, M) accumulator,
# sqrt(max / D_t) at the end (sqrt is monotonic, every tile has D_t = C x H/4 x W/4 values).
#
# Why float64 for the products: the expansion cancels. At 512 px a tile has D_t = 49,152 values and
# |a_t|^2 ~ 16,400 (uniform noise; up to 49,152 for white), so float32 products carry an absolute error of
# ~2e-2 on the sum of squares (measured, random uint8 tiles, CPU): 5.6e-4 on the distance of identical
# images, 6e-5 at a distance of 1/255 and 2e-6 at 0.1-0.15, where the filter's thresholds act; a GPU's
# TF32 matmuls (10-bit mantissa, 2^13 x float32's rounding) would be far worse.
# In float64 the same sums are off by ~1e-9: 1.7e-8 on identical float images, < 1e-12 at >= 1/255.
# uint8 inputs compared at their own size are exact: the tiles hold the integers 0..255, every product
# and partial sum is an integer below 2^53 (D_t x 255^2 ~ 3.2e9), so identical images give exactly 0.
# The price: a float64 matmul is ~2.2x a float32 one on CPU (80 vs 180 GFLOP/s on 2 cores), so all pairs
# of 500 images at 512 px take ~3.7 s there instead of roughly half that; materialising the differences,
# as before, would take ~22 min (extrapolated, bench/RESULTS.md). The ~2.4e11 flops are a few ms on a GPU's fp64
# tensor cores (~60 TFLOP/s on an H100/H200; not measured here). The alternative, float32 plus
# an exact recomputation of the pairs under a margin, would need a margin that depends on the device
# (TF32) and work that grows with the number of near-copies, i.e. exactly for the prompts that matter.
_GRAM_ROWS = 128  # rows of a block per matmul: bounds the (tiles, rows, columns) float64 product


def _channels_last(x: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    """x as a (N, H, W, C) view (no copy) and whether it holds uint8 values 0..255."""
    if x.ndim != 4:
        raise DistanceError(f"tiled_l2_pairwise needs 4-d images, (N, C, H, W) float or (N, H, W, C) | "
                            f"(N, C, H, W) uint8; {name} has shape {tuple(x.shape)}")
    shape = tuple(x.shape)
    if x.dtype == torch.uint8:
        x, u8 = (x if x.shape[-1] in (1, 3) else x.permute(0, 2, 3, 1)), True
    elif not x.is_floating_point():
        raise DistanceError(f"tiled_l2_pairwise needs float images in [0, 1] or uint8; {name} is {x.dtype}")
    else:
        x, u8 = x.permute(0, 2, 3, 1), False
    if x.shape[-1] not in (1, 3):  # RGBA (N, H, W, 4) uint8 was read as 16 channels: plausible, wrong distances
        raise DistanceError(f"tiled_l2_pairwise needs 1 or 3 channels; {name} has shape {shape}, read as "
                            f"{x.shape[-1]} channels: decode to RGB or L first (memex.images.decode)")
    return x, u8


def _largest(limit: int, fits) -> int:
    """The largest k in [1, limit] with fits(k) (fits is monotone), or 1 when none fits."""
    lo, hi = 1, max(1, limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _fill(buf: torch.Tensor, x: torch.Tensor, i0: int, tiles: tuple[int, int], size: tuple[int, int],
          u8: bool, integer: bool, stage: int) -> None:
    """Tiles [t0, t1) of images x[i0 : i0 + buf.shape[1]] ((N, H, W, C) view) -> buf (t1 - t0, k, D_t) float64.

    Same size: one strided copy_ (dtype conversion included, no temporary). Other size: `stage` images
    at a time are converted to float32 in [0, 1], resized like `_common`, then cut into tiles. uint8
    values are divided by 255 unless `integer` (both sides uint8 at their own size: kept as integers).
    """
    (t0, t1), (h, w), k = tiles, size, buf.shape[1]
    resize = tuple(x.shape[1:3]) != size
    step = stage if resize else k
    for s0 in range(0, k, step):
        y = x[i0 + s0 : i0 + min(k, s0 + step)]
        if resize:
            y = y.permute(0, 3, 1, 2)
            y = y.float().div_(255) if u8 else y
            y = F.interpolate(y, size=size, mode="bilinear", antialias=True, align_corners=False).permute(0, 2, 3, 1)
        grid = y.unflatten(1, (GRID, h // GRID)).unflatten(3, (GRID, w // GRID))  # (k, 4, h/4, 4, w/4, C) view
        for t in range(t0, t1):
            tile = grid[:, t // GRID, :, t % GRID]
            buf[t - t0, s0 : s0 + y.shape[0]].unflatten(1, tile.shape[1:]).copy_(tile)
    if u8 and not integer and not resize:
        buf.div_(255)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, na: torch.Tensor, nb: torch.Tensor,
                upper: bool) -> None:
    """acc (k, l) = max(acc, max over tiles of |a|^2 + |b|^2 - 2 a.b) for a (g, k, D), b (g, l, D).
    upper: a is b, only the upper triangle (the caller mirrors it)."""
    for r0 in range(0, a.shape[1], _GRAM_ROWS):
        r1, c0 = min(a.shape[1], r0 + _GRAM_ROWS), r0 if upper else 0
        s = torch.matmul(a[:, r0:r1], b[:, c0:].mT).mul_(-2).add_(na[:, r0:r1, None]).add_(nb[:, None, c0:])
        view = acc[r0:r1, c0:]
        torch.maximum(view, s.amax(dim=0), out=view)


def tiled_l2_pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int | None = None,
                      max_bytes: int = 256 << 20) -> torch.Tensor:
    """All pairs of tiled l2: a (N, ...) x b (M, ...) images -> (N, M), in memory bounded by `max_bytes`.

    Inputs: float (N, C, H, W) in [0, 1], or uint8 0..255 either (N, H, W, C) (decoded images, as
    `to_unit` takes them; recognised by a last dimension of 1 or 3) or (N, C, H, W). C is 1 or 3 (the
    RMS is over the channels present) and the same on both sides; sides may mix dtypes and layouts.
    uint8 is converted block by block, so callers need not hold a float copy of all images. Images of
    different sizes are resized as in `_common` (to the smaller common size, a multiple of 4). The
    result is float32 (or the float inputs' dtype) on a's device, where all the work runs.
    `a is b` (all pairs of one set, the filter's case) computes each pair once and mirrors it.

    Memory: the work runs per tile (all 16 tiles per block when a side is resized), over blocks of
    rows and columns; each block holds its images' tile as float64 (C x H/4 x W/4 x 8 bytes per image,
    384 KiB at 512 px RGB) plus a (tiles, 128, columns) float64 product. Block sizes are the largest
    whose buffers, plus the float32 staging of resized images, fit in `max_bytes` (default 256 MiB;
    at least one image per block, so a budget under two images' tiles is exceeded by that floor);
    `chunk` further caps the images per block. Beyond the budget: the (N, M) float32 result and a
    float64 accumulator of the same shape (12 bytes per pair, 20 while `a is b` is mirrored at the
    end), independent of H and W. When a side's blocks
    all fit at once, every pixel is converted once; otherwise the column blocks stay and the rows are
    re-read once per column block.
    Example, the paper's filter, 500 generations of 512 x 512 RGB as uint8 (393 MB, the caller's):
    one block of 500 x 384 KiB = 188 MiB per tile, 16 float64 matmuls of 500 x 49,152 x 500, about
    191 MiB of buffers + 3 MB of result in all (float32 input would add 1.5 GiB for the copy alone).

    Precision (see the comment above `_GRAM_ROWS`): float64 products; uint8 at equal sizes is exact
    (identical images give 0), float inputs are within ~1e-8 of the direct RMS.
    """
    same = a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype and a.device == b.device)
    (xa, ua), (xb, ub) = _channels_last(a, "a"), _channels_last(b, "b")
    if xa.shape[-1] != xb.shape[-1]:
        raise DistanceError(f"tiled_l2_pairwise needs the same channels on both sides (1 or 3); got "
                            f"{xa.shape[-1]} and {xb.shape[-1]} (shapes {tuple(a.shape)}, {tuple(b.shape)})")
    n, m, c = xa.shape[0], xb.shape[0], xa.shape[-1]
    h, w = min(xa.shape[1], xb.shape[1]), min(xa.shape[2], xb.shape[2])
    h, w = h - h % GRID, w - w % GRID
    if h == 0 or w == 0:
        raise DistanceError(f"tiled_l2_pairwise needs images of at least {GRID} x {GRID} pixels; got "
                            f"{tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.promote_types(torch.float32 if ua else a.dtype, torch.float32 if ub else b.dtype)
    if n == 0 or m == 0:
        return torch.zeros(n, m, dtype=dtype, device=a.device)
    resized = [tuple(x.shape[1:3]) != (h, w) for x in (xa, xb)]
    integer = ua and ub and not any(resized)  # raw 0..255 values: exact sums, scaled once at the end
    g = GRID * GRID if any(resized) else 1  # tiles per pass: resize each image once per pass
    dt = c * (h // GRID) * (w // GRID)
    per = g * (dt + 1) * 8  # bytes per image of a block: its tiles and their squared norms
    stage, budget = 0, max_bytes
    if any(resized):  # float32 copy of the input and of the resized image, `stage` images at a time
        big = max(x.shape[1] * x.shape[2] for x, r in zip((xa, xb), resized) if r)
        img = c * (big + h * w) * 4
        stage = max(1, min(max(n, m), max_bytes // 4 // img))
        budget -= stage * img
    prod = lambda k, l: (g + 1) * min(k, _GRAM_ROWS) * l * 8  # noqa: E731  (g, rows, l) product + its max
    cap = lambda k: min(k, chunk) if chunk else k  # noqa: E731
    if same and n * per + prod(n, n) <= budget and cap(n) == n:
        bn = bm = n  # one block, shared by both sides
    elif same:
        bn = bm = _largest(cap(n), lambda k: 2 * k * per + prod(k, k) <= budget)
    else:
        bm = _largest(cap(m), lambda l: (min(n, _GRAM_ROWS) + l) * per + prod(min(n, _GRAM_ROWS), l) <= budget)
        bn = _largest(cap(n), lambda k: (k + bm) * per + prod(k, bm) <= budget)
    dev = a.device
    acc = torch.full((n, m), -torch.inf, dtype=torch.float64, device=dev)
    buf_b = torch.empty(g, bm, dt, dtype=torch.float64, device=dev)
    buf_a = buf_b if same and bn == n else torch.empty(g, bn, dt, dtype=torch.float64, device=dev)
    sq = lambda x: (x.unsqueeze(-2) @ x.unsqueeze(-1)).flatten(-3)  # noqa: E731  (g, k, D) -> (g, k)
    for t0 in range(0, GRID * GRID, g):
        tiles = (t0, t0 + g)
        for j0 in range(0, m, bm):
            tb = buf_b[:, : min(m, j0 + bm) - j0]
            _fill(tb, xb, j0, tiles, (h, w), ub, integer, stage)
            nb = sq(tb)
            for i0 in range(0, j0 + 1 if same else n, bn):  # same: blocks on and above the diagonal
                if same and i0 == j0:
                    _accumulate(acc[i0 : i0 + tb.shape[1], j0 : j0 + tb.shape[1]], tb, tb, nb, nb, upper=True)
                    continue
                ta = buf_a[:, : min(n, i0 + bn) - i0]
                _fill(ta, xa, i0, tiles, (h, w), ua, integer, stage)
                _accumulate(acc[i0 : i0 + ta.shape[1], j0 : j0 + tb.shape[1]], ta, tb, sq(ta), nb, upper=False)
    if same:
        acc = torch.maximum(acc, acc.mT)
    return acc.clamp_min_(0).div_(dt * (255**2 if integer else 1)).sqrt_().to(dtype)


def l2_pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """All pairs of plain l2: (N, 3, H, W) x (M, 3, H, W) in [0, 1] -> (N, M) RMS differences in [0, 1].

    The RMS is sqrt(mean over C, H, W of the squared difference): the Euclidean distance divided
    by sqrt(C * H * W). It is computed from the differences themselves (cdist without the
    |a|^2 + |b|^2 - 2ab expansion), so near-identical pairs, the ones thresholds act on, do not
    lose their digits to cancellation. Memory: chunk x M floats of output per step.
    """
    a, b = _common(a, b)
    dim = math.prod(a.shape[1:])  # a[0] of an empty batch was an IndexError
    fa, fb = a.reshape(a.shape[0], dim), b.reshape(b.shape[0], dim)
    out = [torch.cdist(fa[i : i + chunk], fb, compute_mode="donot_use_mm_for_euclid_dist")
           for i in range(0, fa.shape[0], chunk)]
    return torch.cat(out) / dim**0.5 if out else fa.new_zeros(0, fb.shape[0])


def relative_l2(gen: torch.Tensor, train_neighbors: torch.Tensor, alpha: float = 0.5
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 relative distance of each generation to its own n nearest training images.

    gen (N, 3, H, W) and train_neighbors (N, n, 3, H', W') in [0, 1]: row i holds the n nearest
    training images of generation i (n = 50 in the paper; the caller takes them from the index).
    Returns d (N,) = l2(gen, nearest) / (alpha * mean_z l2(gen, z)) and nearest (N,) int64, the
    position 0..n-1 of the minimum-l2 neighbour. A generation is extracted when d <= 1.

    Zero denominator: the mean is 0 only when all n neighbours equal the generation, so the
    minimum is 0 too; d is then defined as 0 (an exact copy of a training image is extracted),
    instead of the 0 / 0 = nan the formula gives.
    """
    if gen.ndim != 4 or train_neighbors.ndim != 5 or train_neighbors.shape[0] != gen.shape[0]:
        raise DistanceError(f"relative_l2 needs gen (N, 3, H, W) and train_neighbors (N, n, 3, H, W) with the "
                            f"same N; got {tuple(gen.shape)} and {tuple(train_neighbors.shape)}")
    if train_neighbors.shape[1] == 0:
        raise DistanceError("relative_l2 needs at least one neighbour per generation (n >= 1; the paper uses 50)")
    if not alpha > 0:
        raise DistanceError(f"alpha must be > 0 (the paper uses 0.5); got {alpha}")
    n_gen, n = train_neighbors.shape[:2]
    g, z = _common(gen, train_neighbors.flatten(0, 1))
    z = z.reshape(n_gen, n, *z.shape[1:])
    l2 = (g.unsqueeze(1) - z).pow(2).mean(dim=(2, 3, 4)).sqrt()  # (N, n)
    return relative_ratios(l2, alpha).min(dim=1)


def relative_ratios(l2: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """(N, n) plain l2 of each generation to each image of its reference set -> (N, n) ratios
    l2 / (alpha * the row's mean l2); the row minimum is the CIFAR-10 relative distance.

    Apart so that callers holding the l2 values already (the match stage compares images of mixed
    sizes one pair at a time) use the same definition. A zero mean (every reference image equals
    the generation) gives ratios of 0, not 0 / 0.
    """
    denom = alpha * l2.mean(dim=1, keepdim=True)
    return torch.where(denom > 0, l2 / denom.clamp_min(torch.finfo(l2.dtype).tiny), torch.zeros_like(l2))


def within(d: float, threshold: float) -> bool:
    """d <= threshold at the distances' float32 precision, as the filter's adjacency compares (NumPy casts the
    Python float threshold to the array's float32). A uint8 pair whose worst tile is exactly at 0.15 reads
    0.15000000596 in float32: an edge in the filter, and no copy where match compared in float64."""
    return bool(np.float32(d) <= np.float32(threshold))
