"""Image distances of the extraction attack (definitions: ../shared/METHOD.md, section 1).

tiled l2: images in [0, 1], split into a 4 x 4 grid of non-overlapping tiles; per tile the
root-mean-square difference over its pixels and channels; the distance is the max over the 16
tiles (every region must match, not just the background). At 32 px a tile is 8 x 8 pixels, at
512 px 128 x 128. Images of different sizes are first resized to the smaller common size with
bilinear interpolation (antialiased), so a 64 px generation compares with a 32 px training image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRID = 4


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
