"""Which verified generations make a picture count as extracted (memex/stages/match.py count_pictures)."""

import pyarrow as pa
import pytest

from memex.config import MatchConfig
from memex.images import encode_png
from memex.layout import MATCHES_SCHEMA
from memex.stages.match import count_pictures


def _ext(rows):
    base = {"prompt_id": "p", "prompt": "x", "train_caption": "c", "distance": 0.1, "embed_distance": 0.1,
            "neighbor_rank": 0, "extracted": True}
    return pa.Table.from_pylist([{**base, **r} for r in rows], schema=MATCHES_SCHEMA)


ROWS = [  # picture 1: detailed, one generation; picture 5 (rows 5 and 6): low complexity, two; picture 9: low, one
    {"sample_id": "a/0", "train_gid": 1, "train_id": "t1", "train_detail": 0.3},
    {"sample_id": "b/0", "train_gid": 5, "train_id": "t5", "train_detail": 0.1},
    {"sample_id": "b/1", "train_gid": 6, "train_id": "t6", "train_detail": 0.1},
    {"sample_id": "c/0", "train_gid": 9, "train_id": "t9", "train_detail": 0.05},
]


def test_low_complexity_pictures_need_more_generations_or_a_clique():
    picture = {6: 5}  # rows 5 and 6 are one picture stored twice
    got = count_pictures(_ext(ROWS), picture, set(), MatchConfig())
    assert set(got) == {1, 5, 9}
    assert got[1]["counted"] and not got[1]["low_complexity"]
    assert got[5]["generations"] == 2 and got[5]["low_complexity"] and got[5]["counted"]
    assert got[9]["low_complexity"] and not got[9]["counted"]  # one close generation of a flat picture
    # the same generation inside a flagged clique is evidence enough
    assert count_pictures(_ext(ROWS), picture, {"c/0"}, MatchConfig())[9]["counted"]
    # so is one closer to the picture than the picture's own tile mosaic (0.04 < detail 0.05): an
    # exact copy of a flat picture reproduces its detail, not only its tile colours
    exact = [dict(r, distance=0.04) if r["train_gid"] == 9 else r for r in ROWS]
    assert count_pictures(_ext(exact), picture, set(), MatchConfig())[9]["counted"]
    # match.min_generations holds on those routes too: raised to cut false alarms, it let a flat picture
    # (the risky kind) count on one clique generation or one "closer" generation, a detailed one not
    strict = MatchConfig(min_generations=2)
    assert not count_pictures(_ext(ROWS), picture, {"c/0"}, strict)[9]["counted"]
    assert not count_pictures(_ext(exact), picture, set(), strict)[9]["counted"]
    assert count_pictures(_ext(ROWS), picture, set(), strict)[5]["counted"]  # two generations: counts


def test_closer_than_its_own_mosaic_is_judged_row_by_row():
    """A picture stored as two rows (a re-encoding) whose details differ: a generation 0.08 from the
    row of detail 0.1 is closer than that row's mosaic, and counts with match.low_detail_min_generations
    above 1. The test took the picture's least detail (0.05, the other row's) against its best
    distance (0.08), and it did not count; nor does a generation no closer than its own row's mosaic."""
    rows = [{"sample_id": "d/0", "train_gid": 20, "train_id": "t20", "train_detail": 0.05, "distance": 0.12},
            {"sample_id": "d/1", "train_gid": 21, "train_id": "t21", "train_detail": 0.1, "distance": 0.08}]
    m = MatchConfig(low_detail_min_generations=3)
    got = count_pictures(_ext(rows), {21: 20}, set(), m)[20]
    assert got["low_complexity"] and got["counted"] and "closer" not in got
    far = [rows[0], dict(rows[1], distance=0.11)]
    assert not count_pictures(_ext(far), {21: 20}, set(), m)[20]["counted"]


@pytest.mark.parametrize("min_generations,counted", [(1, {1, 5}), (2, {5}), (3, set())])
def test_min_generations_applies_to_every_picture(min_generations, counted):
    m = MatchConfig(min_generations=min_generations, low_detail_min_generations=2)
    got = count_pictures(_ext(ROWS), {6: 5}, set(), m)
    assert {p for p, e in got.items() if e["counted"]} == counted


def test_relative_l2_has_no_low_complexity_rule():
    """Relative l2 already divides by the distances to the picture's neighbours: a flat picture
    close to everything gets a large denominator, so no second rule applies."""
    got = count_pictures(_ext(ROWS), {}, set(), MatchConfig(distance="relative_l2", threshold=1.0))
    assert not any(e["low_complexity"] for e in got.values()) and all(e["counted"] for e in got.values())


def test_triage_keep_takes_the_top_scores_in_prompt_order(tmp_path):
    from memex.layout import TRIAGE_SCHEMA, RunLayout
    from memex.stages.audit import top_by_triage
    from memex.stages.triage import robust_z

    layout = RunLayout(str(tmp_path), "r")
    ids = [f"p{i}" for i in range(6)]
    layout.store.write_table(layout.prompts_path, pa.table({"prompt_id": ids, "prompt": ids}))
    scores = [0.1, 0.9, 0.3, 0.9, 0.05, 0.5]
    layout.triage.write_shard(0, pa.table({"prompt_id": ids, "prompt": ids, "score": scores,
                                           "unet_evaluations": [8] * 6, "distance": [None] * 6,
                                           "train_gid": [None] * 6}, schema=TRIAGE_SCHEMA))
    assert top_by_triage(layout, 3) == [1, 3, 5]  # 0.9, 0.9 (tie: earlier first), 0.5; returned in row order
    assert top_by_triage(layout, 10) == list(range(6))
    # triage=preview: a prompt whose previews found no readable neighbour has no score, and ranks last
    layout.triage.write_shard(1, pa.table({"prompt_id": ["p6"], "prompt": ["p6"], "score": [None],
                                           "unet_evaluations": [8], "distance": [None], "train_gid": [None]},
                                          schema=TRIAGE_SCHEMA))
    layout.store.write_table(layout.prompts_path, pa.table({"prompt_id": ids + ["p6"], "prompt": ids + ["p6"]}))
    assert top_by_triage(layout, 6) == list(range(6)) and top_by_triage(layout, 7) == list(range(7))
    # a NaN score (an fp16 UNet output that overflowed) ranks last too: as a sort key it left the order
    # arbitrary, and keep=2 of {1, NaN, 3, 2} kept the lowest score and the NaN, dropping the highest
    layout.triage.write_shard(2, pa.table({"prompt_id": ["p7"], "prompt": ["p7"], "score": [float("nan")],
                                           "unet_evaluations": [8], "distance": [None], "train_gid": [None]},
                                          schema=TRIAGE_SCHEMA))
    layout.store.write_table(layout.prompts_path, pa.table({"prompt_id": ["p7"] + ids, "prompt": ["p7"] + ids}))
    assert top_by_triage(layout, 3) == [2, 4, 6] and top_by_triage(layout, 6) == list(range(1, 7))
    z = robust_z(pa.array(scores).to_numpy())
    assert z[1] == z[3] and z[1] > z[5] > z[0] and abs(sorted(z)[2] + sorted(z)[3]) < 1e-9  # centred on the median


def test_a_picture_counts_only_with_a_distinct_copy():
    """match.max_margin: a picture whose closest copying generation is nearly as close to another
    training picture (a generic look-alike) does not count; a missing margin (no other picture among
    the k neighbours, or relative l2) does not block."""
    rows = [dict(ROWS[0], margin=0.65), dict(ROWS[0], sample_id="a/1", margin=0.7),  # picture 1: generic
            {"sample_id": "d/0", "train_gid": 2, "train_id": "t2", "train_detail": 0.3, "margin": 0.3},
            {"sample_id": "e/0", "train_gid": 3, "train_id": "t3", "train_detail": 0.3, "margin": None}]
    got = count_pictures(_ext(rows), {}, set(), MatchConfig())
    assert got[1]["margin"] == pytest.approx(0.65) and not got[1]["distinct"] and not got[1]["counted"]
    assert got[2]["counted"] and got[3]["counted"]
    assert count_pictures(_ext(rows), {}, set(), MatchConfig(max_margin=0.7))[1]["counted"]  # the closest, 0.65
    assert count_pictures(_ext(rows), {}, set(), MatchConfig(max_margin=None))[1]["counted"]
    # a copy of picture 1 with no other picture among its neighbours cannot be judged: it does not block
    assert count_pictures(_ext([*rows, dict(ROWS[0], sample_id="a/2", margin=None)]), {}, set(),
                          MatchConfig())[1]["counted"]


def test_distinct_margin_skips_the_same_picture_and_its_near_duplicates():
    import numpy as np

    from memex.stages.match import distinct_margin, pixel_distances

    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3))
    a2 = np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8)  # a near-duplicate of a the index did not group
    gen = np.clip(a.astype(int) + rng.integers(-10, 11, a.shape), 0, 255).astype(np.uint8)  # a copy of a
    pixels = {0: a, 1: a, 2: a2, 3: b, 4: c}
    gids = [0, 1, 2, 3, 4]
    m = MatchConfig()
    d = pixel_distances(gen, [pixels[g] for g in gids], m.distance, "center_crop")
    same = {}
    got = distinct_margin(d, gids, 0, pixels, {1: 0}, gen.shape[:2], m, "center_crop", same)
    # rows 1 (the same picture) and 2 (within the threshold of a) are skipped: the ratio is to b or c
    assert got == pytest.approx(d[0] / min(d[3], d[4]))
    assert got < 0.3 and same[0, 2, (32, 32)] and not same[0, 3, (32, 32)]  # the pair tests, cached
    # a generation halfway between two pictures is not a distinct copy of either
    mid = ((a.astype(int) + b.astype(int)) // 2).astype(np.uint8)
    d = pixel_distances(mid, [a, b], m.distance, "center_crop")
    assert distinct_margin(d, [0, 3], int(np.argmin(d)), pixels, {}, mid.shape[:2], m, "center_crop", {}) > 0.9
    # nothing else among the neighbours: no margin
    assert distinct_margin(d[:1], [0], 0, pixels, {}, mid.shape[:2], m, "center_crop", {}) is None


def test_detail_and_the_same_picture_test_are_measured_at_the_compared_size():
    """A 256 px training photo against 32 px generations: the tiled l2 compares them at 32 px, where
    its grain averages away. Its tile detail and the test that two stored rows are one picture were
    measured at 256 px: a flat picture (16 tile colours + grain) was not low complexity (detail 0.19,
    over the 0.15 threshold) and counted after one generation, and two copies of one photo with
    their own grain were "another picture" (a real copy then failed the distinct-copy test)."""
    import numpy as np

    from memex.stages.match import distinct_margin, pixel_distances, verify_all

    rng = np.random.default_rng(0)
    tiles = rng.integers(40, 215, (4, 4, 3))
    flat = np.kron(tiles, np.ones((64, 64, 1))).astype(np.int64)  # 256 x 256, 16 flat tiles
    photo = [np.clip(flat + rng.normal(0, 50, flat.shape), 0, 255).astype(np.uint8) for _ in range(2)]
    gen = np.kron(tiles, np.ones((8, 8, 1))).astype(np.uint8)  # 32 x 32: the tile colours
    m = MatchConfig()
    samples = pa.table({"sample_id": ["p/0"], "prompt_id": ["p"], "prompt": ["x"], "image": [encode_png(gen)]})
    row = verify_all(samples, np.array([[0.0, 0.1]]), np.array([[0, 1]]), {0: photo[0], 1: photo[1]},
                     {0: ("a", "c"), 1: ("b", "c")}, m, "l2", "center_crop", {})[0]
    assert row["extracted"] and row["distance"] < 0.15
    assert row["train_detail"] < 0.06  # measured at 32 px (it was 0.19 at 256)
    got = count_pictures(_ext([{"sample_id": "p/0", "train_gid": row["train_gid"], "train_id": "a",
                                "train_detail": row["train_detail"], "distance": row["distance"]}]), {}, set(), m)
    assert got[row["train_gid"]]["low_complexity"] and not got[row["train_gid"]]["counted"]
    # the two grains of one photo: one picture at the compared size, so no margin against "another"
    d = pixel_distances(gen, photo, m.distance, "center_crop")
    assert distinct_margin(d, [0, 1], int(np.argmin(d)), dict(enumerate(photo)), {}, gen.shape[:2], m,
                           "center_crop", {}) is None


def test_a_grayscale_generation_is_compared_with_the_luma_of_colour_training_images():
    """A 1-channel model trained on the luma of colour pictures reproduces their luma. Its "L" PNG
    was decoded to gray in 3 channels and compared with the colour picture: ~0.4 tiled l2 for an
    exact luma copy, never a copy. Now with the picture's luma (decode(channels=1)'s gray); an RGB
    generation in the same shard is still compared with the colour picture."""
    import numpy as np

    from memex.images import decode, luma_rgb
    from memex.stages.match import verify_all

    rng = np.random.default_rng(1)
    colour = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((4, 4, 1))).astype(np.uint8)  # 32 px, blocky
    gray = decode(encode_png(colour), channels=1)  # (32, 32, 1): the model's own channel
    samples = pa.table({"sample_id": ["g/0", "c/0"], "prompt_id": ["g", "c"], "prompt": ["x", "x"],
                        "image": [encode_png(gray), encode_png(colour)]})
    rows = verify_all(samples, np.zeros((2, 1)), np.zeros((2, 1), np.int64), {0: colour}, {0: ("a", "c")},
                      MatchConfig(), "l2", "center_crop", {})
    assert [r["distance"] for r in rows] == [0.0, 0.0] and all(r["extracted"] for r in rows)
    assert np.array_equal(luma_rgb(colour)[..., :1], gray)


def test_training_images_are_cut_once_per_shape_and_luma_across_shards():
    """match.Compared keeps each training image as compared (cut to the generation's aspect, at the
    pair's size) across the stage's shards: the same rows as cutting it for every pair, each (image,
    shape, luma) cut once, the luma kept apart from the colour, and the least recently used dropped
    past its byte budget."""
    import numpy as np
    import torch

    from memex.images import decode, luma_rgb
    from memex.stages.match import Compared, verify_all

    rng = np.random.default_rng(2)
    train = {g: rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for g in range(4)}  # non-square: a cut
    meta = {g: (f"t{g}", "c") for g in train}
    gens = [np.clip(train[j % 4][8:40, 16:48].astype(int) + rng.integers(-3, 4, (32, 32, 3)), 0, 255).astype(np.uint8)
            for j in range(6)]
    shard = pa.table({"sample_id": [f"p/{j}" for j in range(6)], "prompt_id": ["p"] * 6, "prompt": ["x"] * 6,
                      "image": [encode_png(g) for g in gens]})
    I = np.array([[j % 4, (j + 1) % 4, (j + 2) % 4] for j in range(6)])
    D = np.zeros(I.shape)
    m = MatchConfig()
    plain = verify_all(shard, D, I, train, meta, m, "l2", "center_crop", {})
    kept = Compared("center_crop")
    assert verify_all(shard, D, I, train, meta, m, "l2", "center_crop", {}, kept) == plain
    assert kept.made == 4 and kept.hits > 0
    made = kept.made
    assert verify_all(shard, D, I, train, meta, m, "l2", "center_crop", {}, kept) == plain  # the next shard
    assert kept.made == made  # nothing cut again

    # a grayscale generation of the same training image, with the same cache: compared with its luma
    gray = pa.table({"sample_id": ["g/0"], "prompt_id": ["g"], "prompt": ["x"],
                     "image": [encode_png(decode(encode_png(gens[0]), channels=1))]})
    args = (np.zeros((1, 1)), np.zeros((1, 1), np.int64), train, meta, m, "l2", "center_crop", {})
    (want,) = verify_all(gray, *args)
    (colour,) = verify_all(shard.slice(0, 1), *args)
    assert want["distance"] != colour["distance"]  # the luma and the colour comparisons differ
    assert verify_all(gray, *args, kept) == [want] and kept.made == made + 1
    # the luma is kept in one channel (its three are equal): a third of a colour image's bytes, the same numbers
    before = kept.nbytes
    luma = kept.get(1, True, lambda: luma_rgb(train[1]), (32, 32))
    assert kept.nbytes - before == 32 * 32 * 4 and luma.shape == (1, 3, 32, 32)
    full = Compared("center_crop").get(1, False, lambda: luma_rgb(train[1]), (32, 32))
    assert torch.equal(luma, full)

    small = Compared("center_crop", max_bytes=2 * 3 * 32 * 32 * 4)  # room for two 32 px images
    assert verify_all(shard, D, I, train, meta, m, "l2", "center_crop", {}, small) == plain
    assert small.nbytes <= small.max_bytes and len(small._d) == 2 and small.made > 4


def test_a_distance_exactly_at_the_threshold_is_an_edge_and_a_copy_alike():
    """A uint8 pair whose worst tile is exactly at tiled l2 0.15 (51 in 84 of its 192 values) reads
    0.15000000596 in float32. The filter's adjacency compares in float32 (an edge: "within 0.15"); match
    compared its float64 copy and called it no copy. Both now compare at the distances' float32."""
    import numpy as np
    import torch

    from memex.cliques import adjacency
    from memex.distances import tiled_l2_pairwise
    from memex.stages.match import verify_all

    gen, train = np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)
    train[:8, :8] = np.array([0] * 84 + [51] * 108, np.uint8).reshape(8, 8, 3)  # 108 x 51^2 = 0.0225 x 192 x 255^2
    d = tiled_l2_pairwise(torch.tensor(np.stack([gen, train])), torch.tensor(np.stack([gen, train])))
    assert float(d[0, 1]) > 0.15 and adjacency(d, 0.15)[0, 1]
    samples = pa.table({"sample_id": ["p/0"], "prompt_id": ["p"], "prompt": ["x"], "image": [encode_png(gen)]})
    row = verify_all(samples, np.array([[0.0]]), np.array([[0]]), {0: train}, {0: ("a", "c")}, MatchConfig(), "l2",
                     "center_crop", {})[0]
    assert row["distance"] == float(d[0, 1]) and row["extracted"]


def test_a_training_image_too_small_to_compare_is_skipped_and_named(caplog):
    """A 1 px tracking GIF (or a 600x2 banner cut to a square) passes the index (upsampled to the embedder's
    input) and lands among a flat generation's neighbours; match then failed the stage with F.interpolate's
    "output (H: 0, W: 0)" on every rerun. It is skipped like an unreadable image, named in a warning."""
    import numpy as np

    from memex.stages import match
    from memex.stages.match import verify_all

    rng = np.random.default_rng(3)
    train = {0: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 1: np.zeros((1, 1, 3), np.uint8),
             2: np.zeros((2, 600, 3), np.uint8)}
    meta = {g: (f"t{g}", "c") for g in train}
    shard = pa.table({"sample_id": ["p/0"], "prompt_id": ["p"], "prompt": ["x"], "image": [encode_png(train[0])]})
    match._WARNED.clear()
    with caplog.at_level("WARNING", logger="memex.match"):
        (row,) = verify_all(shard, np.zeros((1, 3)), np.array([[1, 2, 0]]), train, meta, MatchConfig(), "l2",
                            "center_crop", {})
    assert (row["train_id"], row["distance"], row["neighbor_rank"]) == ("t0", 0.0, 2)
    assert ("training image t1 is 1x1 px once cut to the generations' aspect: too small to compare (the tiled l2 "
            "needs 4 px a side); it is skipped") in caplog.text
    assert "training image t2 is 2x2 px" in caplog.text and "rebuild the index" not in caplog.text
