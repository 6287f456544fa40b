"""Image distances of the extraction attack (definitions: ../shared/METHOD.md, section 1).

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

import torch
import torch.nn.functional as F

from memex.config import MemexError

GRID = 4


class DistanceError(MemexError, ValueError):
    """Inputs of the wrong shape or a bad parameter; the message names the expected shape or range."""


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float() / 255.0


def _common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
    h, w = h - h % GRID, w - w % GRID
    fix = lambda x: x if x.shape[-2:] == (h, w) else F.interpolate(x, size=(h, w), mode="bilinear", antialias=True,  # noqa: E731
                                                                     align_corners=False)
    return fix(a), fix(b)


def tiled_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise distance of two (N, 3, H, W) batches in [0, 1] -> (N,)."""
    a, b = _common(a, b)
    n, c, h, w = a.shape
    d = (a - b).pow(2).reshape(n, c, GRID, h // GRID, GRID, w // GRID)
    return d.mean(dim=(1, 3, 5)).sqrt().flatten(1).max(dim=1).values


def tiled_l2_pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """All pairs: (N, 3, H, W) x (M, 3, H, W) -> (N, M). Memory ~ chunk x M x 16 floats per step."""
    a, b = _common(a, b)
    n, c, h, w = a.shape
    tb = b.reshape(b.shape[0], c, GRID, h // GRID, GRID, w // GRID)
    out = []
    for i in range(0, n, chunk):
        ta = a[i : i + chunk].reshape(-1, 1, c, GRID, h // GRID, GRID, w // GRID)
        d = (ta - tb.unsqueeze(0)).pow(2).mean(dim=(2, 4, 6)).sqrt()  # (chunk, M, 4, 4)
        out.append(d.flatten(2).max(dim=2).values)
    return torch.cat(out)


def l2_pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """All pairs of plain l2: (N, 3, H, W) x (M, 3, H, W) in [0, 1] -> (N, M) RMS differences in [0, 1].

    The RMS is sqrt(mean over C, H, W of the squared difference): the Euclidean distance divided
    by sqrt(C * H * W). It is computed from the differences themselves (cdist without the
    |a|^2 + |b|^2 - 2ab expansion), so near-identical pairs, the ones thresholds act on, do not
    lose their digits to cancellation. Memory: chunk x M floats of output per step.
    """
    a, b = _common(a, b)
    dim = a[0].numel()
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
