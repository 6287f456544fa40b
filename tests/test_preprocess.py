"""Training images prepared the way the model was trained before any distance (trainset.preprocess).

A LAION-style training image is 512x768 (portrait) or any other shape; Stable Diffusion trained
on the shorter side resized to 512 and the centre cropped. The generation that copies it is that
centre crop. Expected by construction: the crop scores ~0 against its training image (extracted at
the paper's 0.15), while squashing the training image to 512x512 scores far above 0.15.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from memex.config import DistanceKind
from memex.images import decode, encode_png, fit, to_aspect
from memex.stages.match import pixel_distances


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photo-like image: a coarse random colour field, bilinearly upsampled (smooth at the pixel level)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (max(2, h // 64), max(2, w // 64), 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))


def test_to_aspect_shapes():
    img = np.zeros((768, 512, 3), np.uint8)
    assert to_aspect(img, 512, 512, "center_crop").shape == (512, 512, 3)
    assert to_aspect(img, 512, 512, "pad").shape == (768, 768, 3)
    assert to_aspect(img, 512, 512, "resize") is img
    assert to_aspect(np.zeros((300, 900, 1), np.uint8), 1, 1, "center_crop").shape == (300, 300, 1)
    assert to_aspect(img, 768, 512, "center_crop") is img  # already the generation's aspect
    with pytest.raises(ValueError, match="trainset.preprocess"):
        to_aspect(img, 1, 1, "stretch")


def test_center_crop_keeps_the_middle_and_pad_centres_the_image():
    img = np.arange(6 * 4 * 1, dtype=np.uint8).reshape(6, 4, 1)
    assert np.array_equal(to_aspect(img, 1, 1, "center_crop"), img[1:5])
    padded = to_aspect(img, 1, 1, "pad")
    # white borders, as img2dataset's resize_mode=border (cv2.BORDER_CONSTANT, 255) letterboxes LAION images
    assert padded.shape == (6, 6, 1) and np.array_equal(padded[:, 1:5], img) and (padded[:, [0, 5]] == 255).all()


def test_centre_crop_of_a_portrait_training_image_is_extracted():
    train = _smooth(768, 512)
    gen = train[128:640]  # what SD learned: shorter side 512 already, centre 512x512
    d = pixel_distances(gen, [train], DistanceKind.tiled_l2, "center_crop")[0]
    assert d < 1e-6
    squashed = pixel_distances(gen, [train], DistanceKind.tiled_l2, "resize")[0]
    assert squashed > 0.15  # the old behaviour: height and width resized separately, never extracted


def test_one_pixel_shifted_crop_is_near_and_a_wrong_picture_is_far():
    train = _smooth(768, 512, seed=1)
    shifted = train[129:641]
    assert pixel_distances(shifted, [train], DistanceKind.tiled_l2, "center_crop")[0] < 0.05
    other = _smooth(512, 512, seed=2)
    assert pixel_distances(other, [train], DistanceKind.tiled_l2, "center_crop")[0] > 0.15


def test_upsampled_copy_of_a_small_training_image_scores_near_zero():
    small = _smooth(64, 96, seed=3)  # a 64x96 training image, generated back at 512x512
    crop = small[:, 16:80]
    gen = np.asarray(Image.fromarray(crop).resize((512, 512), Image.BICUBIC))
    assert pixel_distances(gen, [small], DistanceKind.tiled_l2, "center_crop")[0] < 0.02
    assert pixel_distances(gen, [small], DistanceKind.relative_l2, "center_crop")[0] < 0.02  # plain l2 too


def test_padded_training_image_matches_a_letterboxed_generation():
    """A model trained on img2dataset's resize_mode=border images (white bars: cv2.BORDER_CONSTANT,
    value 255) draws white bars; memex padded the training image with black, and an exact copy
    measured 0.82 tiled l2 (never extracted)."""
    train = _smooth(256, 512, seed=4)  # landscape, letterboxed to a square as img2dataset does
    gen = np.full((512, 512, 3), 255, np.uint8)
    gen[128:384] = train
    assert pixel_distances(gen, [train], DistanceKind.tiled_l2, "pad")[0] < 1e-6
    assert pixel_distances(gen, [train], DistanceKind.tiled_l2, "center_crop")[0] > 0.15


def test_index_embeds_the_same_square_crop():
    """The index fits training images to the embedder's square input with the same preprocess,
    so the crop a generation shows and its training image embed alike."""
    train = _smooth(768, 512, seed=5)
    assert np.array_equal(fit(train, 32, "center_crop"), fit(train[128:640], 32, "center_crop"))
    assert fit(decode(encode_png(train)), 32).shape == (32, 32, 3)


def test_relative_l2_counts_a_picture_stored_33_times_once():
    """The reference set S is the n nearest *distinct pictures*: a generation copying an image stored
    once or 33 times (LAION-style duplicate rows, one picture id) gets the same relative distance."""
    from memex.distances import relative_ratios
    from memex.stages.match import relative_distance

    rng = np.random.default_rng(0)
    picture = _smooth(32, 32, seed=10)
    others = [_smooth(32, 32, seed=20 + i) for i in range(60)]
    gen = np.clip(picture.astype(int) + rng.integers(-3, 4, picture.shape), 0, 255).astype(np.uint8)

    def distance(copies: int) -> tuple[float, int]:
        rows = [picture] * copies + others
        pictures = [0] * copies + list(range(1, 61))
        l2 = pixel_distances(gen, rows, DistanceKind.relative_l2, "center_crop")
        return relative_distance(l2, pictures, n=50, alpha=0.5), l2

    (once, best_once), _ = distance(1)
    (dup, best_dup), l2 = distance(33)
    assert once == pytest.approx(dup, rel=1e-12) and once < 0.5 and best_once == best_dup == 0
    import torch

    naive = float(relative_ratios(torch.tensor(np.sort(l2)[:50])[None], 0.5)[0].min())  # rows, not pictures
    assert naive > 2 * once  # 33 copies in S shrink the mean: the old, stricter test


def test_relative_l2_over_fewer_pictures_than_asked_says_so(caplog):
    """An index of fewer distinct pictures than match.n_neighbors (a small training set), or
    neighbours that could not be read: relative l2 divided by the mean of fewer pictures than the
    setting says, without a word. It still does (nothing else to compare with), and warns once."""
    from memex.stages import match
    from memex.stages.match import relative_distance

    match._WARNED.clear()
    l2 = np.linspace(0.1, 0.5, 12)
    with caplog.at_level("WARNING", logger="memex.match"):
        relative_distance(l2, list(range(12)), n=50, alpha=0.5)
        relative_distance(l2, list(range(12)), n=50, alpha=0.5)
    assert caplog.text.count("mean of 12 distinct pictures, fewer than match.n_neighbors=50") == 1
    caplog.clear()
    match._WARNED.clear()
    with caplog.at_level("WARNING", logger="memex.match"):
        relative_distance(l2, list(range(12)), n=10, alpha=0.5)
    assert "fewer than" not in caplog.text
