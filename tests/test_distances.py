import math

import pytest
import torch

from memex.distances import DistanceError, l2_pairwise, relative_l2, tiled_l2, tiled_l2_pairwise


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


def test_l2_pairwise_is_the_rms_over_all_pixels_and_channels():
    zero = torch.zeros(1, 3, 8, 8)
    tile = zero.clone()
    tile[0, :, 0:2, 0:2] = 0.4  # 12 of 192 values off by 0.4: RMS sqrt(12 * 0.16 / 192) = 0.1
    half = torch.full((1, 3, 8, 8), 0.5)
    p = l2_pairwise(torch.cat([zero, tile, half]), torch.cat([zero, half]), chunk=2)
    assert p.shape == (3, 2)
    expected = [[0.0, 0.5], [0.1, math.sqrt((12 * 0.1**2 + 180 * 0.5**2) / 192)], [0.5, 0.0]]
    assert torch.allclose(p, torch.tensor(expected), atol=1e-6)
    assert math.isclose(tiled_l2(zero, tile).item(), 0.4, rel_tol=1e-6)  # the max over tiles sees the 0.4


def test_l2_pairwise_matches_a_brute_force_rms():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(5, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g)
    brute = torch.tensor([[((x - y) ** 2).mean().sqrt().item() for y in b] for x in a])
    assert torch.allclose(l2_pairwise(a, b, chunk=3), brute, atol=1e-6)
    assert l2_pairwise(a, a).diagonal().abs().max() < 1e-6  # no cancellation error at 0


def test_l2_pairwise_resizes_to_the_smaller_image():
    a = torch.full((2, 3, 16, 16), 0.3)
    a[1] = 0.9
    b = torch.full((1, 3, 8, 8), 0.6)
    assert torch.allclose(l2_pairwise(a, b), torch.tensor([[0.3], [0.3]]), atol=1e-5)


def neighbours(*levels: float) -> torch.Tensor:
    """(1, n, 3, 8, 8) constant images; each has l2 = level to an all-zero generation."""
    return torch.stack([torch.full((3, 8, 8), v) for v in levels]).unsqueeze(0)


def test_relative_l2_by_hand_with_three_neighbours():
    gen = torch.zeros(2, 3, 8, 8)
    train = torch.cat([neighbours(0.2, 0.3, 0.1), neighbours(0.6, 0.1, 0.5)])
    d, nearest = relative_l2(gen, train)  # alpha = 0.5
    # row 0: 0.1 / (0.5 * 0.2) = 1.0 (on the extraction boundary); row 1: 0.1 / (0.5 * 0.4) = 0.5
    assert torch.allclose(d, torch.tensor([1.0, 0.5]), atol=1e-5)
    assert nearest.tolist() == [2, 1]
    d1, _ = relative_l2(gen, train, alpha=1.0)
    assert torch.allclose(d1, torch.tensor([0.5, 0.25]), atol=1e-5)


def test_relative_l2_one_differing_tile_and_resize():
    gen = torch.zeros(1, 3, 16, 16)
    copy = torch.zeros(3, 8, 8)
    near = copy.clone()
    near[:, 0:2, 0:2] = 0.4  # l2 0.1 as above
    far = torch.full((3, 8, 8), 0.3)
    d, nearest = relative_l2(gen, torch.stack([far, near, far]).unsqueeze(0))
    assert math.isclose(d.item(), 0.1 / (0.5 * (0.3 + 0.1 + 0.3) / 3), rel_tol=1e-4)
    assert nearest.item() == 1
    d, nearest = relative_l2(gen, torch.stack([far, copy, near]).unsqueeze(0))
    assert d.item() == 0 and nearest.item() == 1


def test_relative_l2_zero_denominator_and_identical_neighbours():
    gen = torch.full((1, 3, 8, 8), 0.25)
    d, nearest = relative_l2(gen, gen.unsqueeze(1).expand(1, 3, 3, 8, 8))  # every neighbour is the generation
    assert d.item() == 0 and not torch.isnan(d).any() and nearest.item() == 0
    d, _ = relative_l2(torch.zeros(1, 3, 8, 8), neighbours(0.2, 0.2, 0.2))  # min == mean -> 1 / alpha
    assert math.isclose(d.item(), 2.0, rel_tol=1e-5)


def test_relative_l2_rejects_bad_inputs():
    gen = torch.zeros(2, 3, 8, 8)
    with pytest.raises(DistanceError, match="same N"):
        relative_l2(gen, neighbours(0.1, 0.2))
    with pytest.raises(DistanceError, match="alpha"):
        relative_l2(gen[:1], neighbours(0.1, 0.2), alpha=0)
    with pytest.raises(DistanceError, match="n >= 1"):
        relative_l2(gen, torch.zeros(2, 0, 3, 8, 8))
