import math

import pytest
import torch

import memex.distances as distances
from memex.distances import GRID, DistanceError, _common, l2_pairwise, relative_l2, tiled_l2, tiled_l2_pairwise, to_unit


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


def reference_tiled_l2_pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The specification: the implementation before bounded memory (materialises chunk x M x C x H x W)."""
    a, b = _common(a, b)
    n, c, h, w = a.shape
    tb = b.reshape(b.shape[0], c, GRID, h // GRID, GRID, w // GRID)
    out = []
    for i in range(0, n, chunk):
        ta = a[i : i + chunk].reshape(-1, 1, c, GRID, h // GRID, GRID, w // GRID)
        d = (ta - tb.unsqueeze(0)).pow(2).mean(dim=(2, 4, 6)).sqrt()  # (chunk, M, 4, 4)
        out.append(d.flatten(2).max(dim=2).values)
    return torch.cat(out)


SHAPES = [  # n, m, channels, size of a, size of b
    (5, 7, 3, 16, 16),
    (6, 6, 1, 32, 32),
    (7, 3, 3, 12, 12),
    (4, 9, 3, 32, 20),  # b smaller: a resized
    (3, 5, 1, 18, 30),  # both resized: 18 is no multiple of the grid, the common size is 16 x 16
]
BLOCKS = [{}, {"chunk": 2}, {"chunk": 3}, {"max_bytes": 1}, {"max_bytes": 20_000}]


@pytest.mark.parametrize("n, m, c, sa, sb", SHAPES)
@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: ",".join(f"{k}={v}" for k, v in b.items()) or "default")
def test_pairwise_equals_the_reference(n, m, c, sa, sb, blocks):
    g = torch.Generator().manual_seed(n * 100 + sa)
    a, b = torch.rand(n, c, sa, sa, generator=g), torch.rand(m, c, sb, sb, generator=g)
    got = tiled_l2_pairwise(a, b, **blocks)
    assert got.shape == (n, m) and got.dtype == torch.float32
    assert (got - reference_tiled_l2_pairwise(a, b)).abs().max() < 1e-6
    self_pairs = tiled_l2_pairwise(a, a, **blocks)  # the filter's case: each pair once, mirrored
    assert (self_pairs - reference_tiled_l2_pairwise(a, a)).abs().max() < 1e-6
    assert torch.equal(self_pairs, self_pairs.T) and self_pairs.diagonal().max() < 1e-6


@pytest.mark.parametrize("n, m, c, sa, sb", SHAPES)
def test_uint8_input_in_either_layout_equals_the_reference_on_unit_floats(n, m, c, sa, sb):
    g = torch.Generator().manual_seed(7 * n + sb)
    ua = torch.randint(0, 256, (n, sa, sa, c), dtype=torch.uint8, generator=g)  # (N, H, W, C): decoded images
    ub = torch.randint(0, 256, (m, sb, sb, c), dtype=torch.uint8, generator=g)
    want = reference_tiled_l2_pairwise(to_unit(ua), to_unit(ub))
    for a, b in [(ua, ub), (ua.permute(0, 3, 1, 2).contiguous(), ub), (to_unit(ua), ub), (ua, to_unit(ub))]:
        for blocks in ({}, {"max_bytes": 1}):
            got = tiled_l2_pairwise(a, b, **blocks)
            assert got.dtype == torch.float32 and (got - want).abs().max() < 1e-6
    want = reference_tiled_l2_pairwise(to_unit(ua), to_unit(ua))
    assert (tiled_l2_pairwise(ua, ua, chunk=2) - want).abs().max() < 1e-6


def test_identical_images_give_zero_and_near_copies_keep_their_digits():
    """At 512 px a tile has 49,152 values: |a|^2 + |b|^2 - 2ab in float32 would be off by ~5e-4 here."""
    g = torch.Generator().manual_seed(3)
    u = torch.randint(0, 256, (2, 512, 512, 3), dtype=torch.uint8, generator=g)
    near = u[:1].clone()
    near[0, 5, 5, 0] = int(near[0, 5, 5, 0]) ^ 128  # one value of one tile off by 128/255
    x = torch.cat([u, u[:1], near])  # 0 and 2 identical, 3 is 0 with one value changed
    d = tiled_l2_pairwise(x, x)
    assert d[0, 2] == 0 and d[2, 0] == 0 and (d.diagonal() == 0).all()  # uint8: integer sums, exact
    assert tiled_l2_pairwise(x, x.clone())[0, 2] == 0
    one = math.sqrt((128 / 255) ** 2 / (3 * 128 * 128))  # 2.3e-3
    assert abs(d[0, 3].item() - one) < 1e-7 and abs(d[2, 3].item() - one) < 1e-7
    f = to_unit(x)  # float input: float64 products, identical images within ~1e-8 of 0
    df = tiled_l2_pairwise(f, f.clone())
    assert df[0, 2] < 1e-6 and df.diagonal().max() < 1e-6 and abs(df[0, 3].item() - one) < 1e-6
    assert tiled_l2_pairwise(f, f).diagonal().max() < 1e-6


def test_the_budget_bounds_the_blocks(monkeypatch):
    """Every block the loop fills fits in max_bytes (a 16 px RGB tile is 4 x 4 x 3 float64 = 384 B)."""
    sizes = []
    fill = distances._fill

    def spy(buf, *args, **kwargs):
        sizes.append(buf.shape[1])
        return fill(buf, *args, **kwargs)

    monkeypatch.setattr(distances, "_fill", spy)
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(23, 3, 16, 16, generator=g), torch.rand(17, 3, 16, 16, generator=g)
    want = reference_tiled_l2_pairwise(a, b)
    per_image = (48 + 1) * 8  # one tile and its squared norm
    for budget in (10 * per_image, 4 * per_image, 1):
        sizes.clear()
        assert (tiled_l2_pairwise(a, b, max_bytes=budget) - want).abs().max() < 1e-6
        assert max(sizes) <= max(1, budget // per_image) and len(sizes) > 16
    sizes.clear()
    tiled_l2_pairwise(a, b)  # default budget: everything in one block per tile, each image converted once
    assert sizes == [17, 23] * 16
    sizes.clear()
    tiled_l2_pairwise(a, a)  # a is b: one shared block per tile
    assert sizes == [23] * 16


def test_pairwise_rejects_bad_inputs_and_takes_empty_ones():
    with pytest.raises(DistanceError, match="same channels"):
        tiled_l2_pairwise(torch.rand(2, 1, 8, 8), torch.rand(2, 3, 8, 8))
    with pytest.raises(DistanceError, match="at least 4 x 4"):
        tiled_l2_pairwise(torch.rand(2, 3, 3, 8), torch.rand(2, 3, 8, 8))
    with pytest.raises(DistanceError, match="4-d"):
        tiled_l2_pairwise(torch.rand(3, 8, 8), torch.rand(2, 3, 8, 8))
    with pytest.raises(DistanceError, match="uint8"):
        tiled_l2_pairwise(torch.zeros(2, 3, 8, 8, dtype=torch.int64), torch.rand(2, 3, 8, 8))
    assert tiled_l2_pairwise(torch.rand(0, 3, 8, 8), torch.rand(4, 3, 8, 8)).shape == (0, 4)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    assert tiled_l2_pairwise(x, x).dtype == torch.float64


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


@pytest.mark.gpu
def test_pairwise_tiled_l2_on_the_gpu_equals_the_cpu():
    """The filter runs the bounded pairwise tiled l2 on whatever device its images are on: on a GPU
    it must give the CPU's numbers (float64 dot products on both), for uint8 and float input."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (40, 64, 64, 3), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (25, 64, 64, 3), generator=g, dtype=torch.uint8)
    cpu = tiled_l2_pairwise(a, b, max_bytes=1 << 20)
    gpu = tiled_l2_pairwise(a.cuda(), b.cuda(), max_bytes=1 << 20)
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-6)
    same = tiled_l2_pairwise(a.cuda(), a.cuda())
    assert torch.all(same.diagonal() == 0)
    fl = tiled_l2_pairwise(to_unit(a).cuda(), to_unit(b).cuda())
    assert torch.allclose(fl.cpu(), cpu, atol=1e-5)


def test_tile_detail_is_the_distance_to_the_own_tile_mosaic():
    from memex.distances import tile_detail, tiled_l2

    flat = torch.zeros(1, 3, 32, 32)
    flat[..., :16, :] = 0.2  # two flat colours, aligned with the 4x4 tiles: no detail at all
    assert float(tile_detail(flat)[0]) < 1e-6
    logo = flat.clone()
    logo[..., 2:6, 2:6] = 1.0  # a small bright mark inside one 8x8 tile
    d = float(tile_detail(logo)[0])
    mosaic = logo.reshape(1, 3, 4, 8, 4, 8).mean(dim=(3, 5), keepdim=True).expand(1, 3, 4, 8, 4, 8).reshape(logo.shape)
    assert abs(d - float(tiled_l2(logo, mosaic)[0])) < 1e-6  # the definition
    assert d > 0.15  # the mark makes it a picture a generation must reproduce, not just match in colour
    gradient = torch.linspace(0, 0.3, 32).expand(1, 3, 32, 32)  # a soft sky: low complexity
    assert float(tile_detail(gradient)[0]) < 0.05


def test_empty_batches_and_four_channel_images():
    """l2_pairwise of an empty first batch was an IndexError (its empty branch unreachable); uint8 RGBA
    (N, H, W, 4) was read as (N, C=H, ...) and gave plausible, wrong tiled l2 (0.57 for two images
    differing in alpha only). It is refused, naming the fix."""
    assert l2_pairwise(torch.zeros(0, 3, 8, 8), torch.rand(2, 3, 8, 8)).shape == (0, 2)
    rgba = torch.zeros(2, 16, 16, 4, dtype=torch.uint8)
    with pytest.raises(DistanceError, match=r"needs 1 or 3 channels; a has shape \(2, 16, 16, 4\).*decode to RGB"):
        tiled_l2_pairwise(rgba, rgba)
    with pytest.raises(DistanceError, match=r"needs 1 or 3 channels"):
        tiled_l2_pairwise(torch.rand(2, 4, 16, 16), torch.rand(2, 4, 16, 16))
    gray = torch.rand(2, 1, 16, 16)
    assert tiled_l2_pairwise(gray, gray).shape == (2, 2)
