import math

import torch

from memex.distances import tiled_l2, tiled_l2_pairwise


def test_one_differing_tile_sets_the_distance():
    a = torch.zeros(1, 3, 8, 8)
    b = a.clone()
    b[0, :, 0:2, 0:2] = 0.5  # one 2x2 tile entirely off by 0.5 -> RMS 0.5
    b[0, 0, 7, 7] = 0.2  # one pixel, one channel of another tile: RMS sqrt(0.04 / 12)
    assert math.isclose(tiled_l2(a, b).item(), 0.5, rel_tol=1e-6)
    b[0, :, 0:2, 0:2] = 0
    assert math.isclose(tiled_l2(a, b).item(), math.sqrt(0.04 / 12), rel_tol=1e-5)
    assert tiled_l2(a, a).item() == 0


def test_different_sizes_are_resized_to_the_smaller():
    a = torch.full((1, 3, 8, 8), 0.3)
    b = torch.full((1, 3, 16, 16), 0.3)  # a constant image is unchanged by resizing
    assert tiled_l2(a, b).item() < 1e-6
    b[..., :8, :8] = 0.7  # top-left quarter (4 tiles at 16 px, 4 tiles at 8 px) differs by 0.4
    assert math.isclose(tiled_l2(a, b).item(), 0.4, rel_tol=1e-4)


def test_pairwise_matches_rowwise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 3, 16, 16, generator=g), torch.rand(7, 3, 16, 16, generator=g)
    p = tiled_l2_pairwise(a, b, chunk=2)
    assert p.shape == (5, 7)
    for i in range(5):
        assert torch.allclose(p[i], tiled_l2(a[i : i + 1].expand(7, -1, -1, -1), b), atol=1e-6)
