"""The match stage's and the report's driver memory at scale, and what must not change with it:

  * match.run summarizes matches/'s extracted rows, read a few hundred units at a time (`extracted_matches`), not
    matches/ whole (every row's prompt, ids and captions: ~43 GB at candidates=all and the paper's 175M rows);
    summary.json is the same as summarized from the whole table;
  * report.histogram_svg counts its values a chunk at a time (no float64 copy of 175M distances); the same SVG;
  * count_pictures compares a copy's margin with match.max_margin at float32, as matches/ stores it;
  * a huge training image is decoded and cut no larger than its comparison with a generation needs
    (TrainPixels.for_shape, as_compared); images up to COMPARE_FULL_PIXELS are compared exactly as before.

In-process (resources.executor=local): no Ray.
"""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from memex.config import MatchConfig
from memex.distances import at_size, common_size, tiled_l2, to_unit
from memex.images import decode, encode_png, to_aspect
from memex.layout import MATCHES_SCHEMA, RunLayout
from memex.report import esc, histogram_svg
from memex.stages import index, match
from memex.storage import StageFolder, Store

from conftest import attach_index, blocky, compose, plant_run

N_SAMPLES = 8  # a prompt's, in shards of 4: 6 matches/ units


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """12 blocky pictures and a flat one (low complexity). Prompt A's 8 generations copy t03 (+-2/255); B's
    are t05 under heavy noise (some within the threshold, some not); C's first copies the flat t12 (one
    generation of a low-complexity picture: not counted), the rest are new pictures."""
    tmp = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    train = [blocky(rng) for _ in range(12)] + [np.full((32, 32, 3), 120, np.uint8)]
    ids = [f"t{i:02d}" for i in range(len(train))]
    manifest = tmp / "train.parquet"
    pq.write_table(pa.table({"id": ids, "image": [encode_png(t) for t in train],
                             "caption": [f"caption {i}" for i in range(len(train))]}), manifest)

    def noisy(t, amp):
        return np.clip(t.astype(int) + rng.integers(-amp, amp + 1, t.shape), 0, 255).astype(np.uint8)

    samples = {"prompt A": [noisy(train[3], 2) for _ in range(N_SAMPLES)],
               "prompt B": [noisy(train[5], 40 + 5 * j) for j in range(N_SAMPLES)],
               "prompt C": [noisy(train[12], 1)] + [blocky(rng) for _ in range(N_SAMPLES - 1)]}
    plant_run(tmp / "runs", "r", samples, shard_size=4)
    cfg = compose([f"trainset.path={manifest}", f"storage.root={tmp / 'runs'}", "model.path=/planted",
                   f"sampling.samples_per_prompt={N_SAMPLES}", "sampling.shard_size=4", "index.shards=1",
                   "match.k=13", "resources.executor=local", "run.name=r"], config_name="audit")
    info = index.run(cfg)
    attach_index(RunLayout(cfg.storage.root, "r"), info)
    return cfg, info


# ---- 1. the summary reads matches/'s extracted rows, a few units at a time ------------------------------------
def test_run_summarizes_the_extracted_rows_read_a_unit_batch_at_a_time(world, monkeypatch):
    """Fails on the code before: it read matches/ whole (StageFolder.read(), every column) and summarized that."""
    cfg, info = world
    layout = RunLayout(cfg.storage.root, "r")
    # matches/ first, then the summary alone is what is spied on (written again: an earlier test's run left one)
    match.match_shards(cfg, "r")
    if layout.matches.success() is not None:
        layout.store.delete(layout.matches.success_path)
    units = len(layout.matches.complete())
    assert units == 6
    monkeypatch.setattr(match, "UNITS_PER_READ", 1, raising=False)
    whole, batches, given = [], [], []
    real_read, real_table, real_summarize = StageFolder.read, Store.read_table, match.summarize

    def read(self, columns=None, filters=None):
        if self.name == "matches" and columns is None and filters is None:
            whole.append(True)
        return real_read(self, columns, filters)

    def read_table(self, path, *a, **kw):
        paths = path if isinstance(path, list) else [path]
        if any("/matches/" in p for p in paths):
            batches.append((len(paths), kw.get("columns"), kw.get("filters")))
        return real_table(self, path, *a, **kw)

    def summarize(cfg, layout, info, matches, *a, **kw):
        given.append((matches, a, kw))
        return real_summarize(cfg, layout, info, matches, *a, **kw)

    monkeypatch.setattr(StageFolder, "read", read)
    monkeypatch.setattr(Store, "read_table", read_table)
    monkeypatch.setattr(match, "summarize", summarize)
    s = match.run(cfg, "r")
    assert not whole, "matches/ was read whole"
    full_reads = [b for b in batches if b[1] is None and b[2] is None]
    assert full_reads and max(n for n, _, _ in full_reads) <= 1  # every column: one unit at a time here
    (table, a, kw), = given
    assert table.num_rows == s["extracted_generations"] > 0 and all(table["extracted"].to_pylist())
    assert s["candidates_verified"] == 3 * N_SAMPLES == (a or (kw.get("verified"),))[0]


def test_summary_json_is_the_one_summarized_from_matches_whole(world):
    """Equivalence (passes on the code before too): the summary.json match.run writes from the extracted rows
    and the row count is byte for byte the one summarize writes from matches/ read whole, as before."""
    cfg, info = world
    layout = RunLayout(cfg.storage.root, "r")
    s = match.run(cfg, "r")
    assert s["extracted_unique_train_images"] >= 2 and s["uncounted_pictures"]  # counted and uncounted pictures
    assert 0 < s["extracted_generations"] < s["candidates_verified"]
    written = layout.store.read_bytes(layout.summary_path)
    layout.store.write_json(layout.summary_path + ".whole", match.summarize(cfg, layout, info, layout.matches.read()))
    assert layout.store.read_bytes(layout.summary_path + ".whole") == written


def test_extracted_matches_are_matches_whole_filtered_in_any_batches(world):
    cfg, _ = world
    layout = RunLayout(cfg.storage.root, "r")
    match.match_shards(cfg, "r")
    whole = layout.matches.read()
    for step in (1, 4, 256):
        ext, rows = match.extracted_matches(layout, step)
        assert rows == whole.num_rows and ext.equals(whole.filter(whole["extracted"]))


def test_extracted_matches_of_an_empty_folder(tmp_path):
    ext, rows = match.extracted_matches(RunLayout(str(tmp_path), "none"))
    assert rows == 0 and ext.num_rows == 0 and ext.schema.equals(MATCHES_SCHEMA)


# ---- 2. the histogram, a chunk at a time --------------------------------------------------------------------
def _histogram_before(values, threshold, label, bins=30, width=520, height=180, x_max=None):
    """report.histogram_svg as it was (a float64 copy of every value): the reference the chunked one must equal.
    Its drawing is report.histogram_drawn, which the chunked one calls too: the counts and the scale are compared."""
    from memex.report import _finite, histogram_drawn

    vals = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return f'<p class="muted">no {esc(label)} to plot</p>'
    hi = x_max if _finite(x_max) and x_max > 0 else max(float(vals.max()), threshold or 0.0) * 1.05 or 1.0
    counts = np.bincount(np.minimum((vals / hi * bins).astype(np.int64), bins - 1), minlength=bins).tolist()
    return histogram_drawn(counts, hi, vals.size, threshold, label, width, height)


def _histogram_inputs():
    rng = np.random.default_rng(1)
    v = rng.random(10_007).astype(np.float32) * 0.4
    v[::97], v[5::101], v[7::103] = np.nan, np.inf, -np.inf
    hi = float(np.nanmax(v[np.isfinite(v)])) * 1.05
    edges = (np.arange(31) / 30 * hi).astype(np.float32)  # values on every bin boundary, and hi itself
    v = np.concatenate([v, edges, np.float32([hi, 0.0, 0.15, 1e-30])])
    yield v  # float32, as the report hands over matches/' distances
    yield v.astype(np.float64)
    yield list(v[:500].tolist())  # a list, as the triage sections pass
    yield (np.arange(31) / 30 * 0.3)  # float64 values exactly at x_max=0.3's boundaries
    yield np.float32([np.nan, np.inf])  # nothing finite
    yield []
    yield np.full(5, 0.0, np.float32)  # all zero: hi = threshold x 1.05, or 1.0
    yield np.float32([2.0, 5.0, 0.1])  # beyond x_max: the last bar


@pytest.mark.parametrize("chunk", [7, 1 << 21])
def test_histogram_is_the_same_svg_counted_a_chunk_at_a_time(monkeypatch, chunk):
    """Equivalence (passes on the code before too): NaN and inf dropped, values on bin boundaries and at hi,
    past x_max, float32, float64 and lists, chunk boundaries anywhere (chunk=7)."""
    monkeypatch.setattr("memex.report.HIST_CHUNK", chunk, raising=False)
    for values in _histogram_inputs():
        for threshold, x_max in ((0.15, None), (None, None), (0.15, 0.3), (None, 0.3), (0.0, None), (0.15, np.nan)):
            old = _histogram_before(values, threshold, "d", x_max=x_max)
            assert histogram_svg(values, threshold, "d", x_max=x_max) == old
            assert histogram_svg(values, threshold, "d", bins=7, x_max=x_max) == \
                _histogram_before(values, threshold, "d", bins=7, x_max=x_max)


def test_histogram_holds_a_chunk_not_a_float64_copy_of_every_value(monkeypatch):
    """Fails on the code before: its float64 copy, mask and bin indices were ~24 bytes a value (3.9 GB more at
    175M distances); counted 2^16 values at a time, a few MB whatever the input's length."""
    monkeypatch.setattr("memex.report.HIST_CHUNK", 1 << 16, raising=False)
    v = np.random.default_rng(2).random(2_000_000).astype(np.float32)
    tracemalloc.start()
    try:
        svg = histogram_svg(v, 0.15, "d")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "n = 2000000" in svg
    assert peak < 0.5 * v.nbytes, f"{peak / v.size:.1f} bytes a value"  # ~1.3 MB here, against ~48 MB before


# ---- 3. the margin at float32 -------------------------------------------------------------------------------
def test_a_margin_at_max_margin_is_distinct_at_float32():
    """Fails on the code before: matches/ stores a margin of 0.6 as float32 0.6000000238, which max_margin=0.6
    refused in float64 (as the threshold was, before distances.within)."""
    row = {"sample_id": "a/0", "prompt_id": "p", "prompt": "x", "train_gid": 1, "train_id": "t1",
           "train_caption": "c", "distance": 0.1, "embed_distance": 0.1, "neighbor_rank": 0, "extracted": True,
           "train_detail": 0.3, "margin": 0.6}
    ext = pa.Table.from_pylist([row], schema=MATCHES_SCHEMA)  # as stored: float32
    assert ext["margin"][0].as_py() == float(np.float32(0.6)) > 0.6
    got = match.count_pictures(ext, {}, set(), MatchConfig(max_margin=0.6))[1]
    assert got["distinct"] and got["counted"]
    above = pa.Table.from_pylist([dict(row, margin=float(np.nextafter(np.float32(0.6), np.float32(1))))],
                                 schema=MATCHES_SCHEMA)
    assert not match.count_pictures(above, {}, set(), MatchConfig(max_margin=0.6))[1]["distinct"]


# ---- 4. a huge training image, decoded and cut no larger than its comparison needs ----------------------------
def _photo(rng, h: int, w: int) -> np.ndarray:
    from PIL import Image

    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.int16)
    return np.clip(base + rng.integers(-6, 7, (h, w, 3)), 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _before(img: np.ndarray, shape, preprocess="center_crop"):
    """as_compared as it was: the whole cut converted to float32, then resized."""
    fitted = to_unit(torch.tensor(to_aspect(img, shape[0], shape[1], preprocess)[None]))
    return at_size(fitted, common_size(tuple(shape), fitted.shape[-2:]))


@pytest.mark.parametrize("size, shape, fmt, preprocess", [
    ((1024, 1536), (512, 512), "jpeg", "center_crop"),  # LAION's: 1.5 MP against a 512 px generation
    ((1024, 1536), (64, 64), "jpeg", "center_crop"),  # 16x the generation's side: still below the budget
    ((2048, 2048), (512, 768), "png", "center_crop"),  # the budget itself
    ((300, 200), (512, 512), "png", "pad"),
    ((700, 900), (256, 256), "jpeg", "resize"),
])
def test_images_up_to_the_budget_are_compared_exactly_as_before(size, shape, fmt, preprocess):
    """Equivalence (passes on the code before too): decoded whole and cut as before, to the bit."""
    img = _photo(np.random.default_rng(3), *size)
    data = _jpeg(img) if fmt == "jpeg" else encode_png(img)
    px = match.TrainPixels({0: data}, {0: "t0"})
    pixels_for = getattr(match, "pixels_for", lambda p, g, _: p[g])  # (the code before: p[g], decoded whole)
    got = match.as_compared(pixels_for(px, 0, shape), shape, preprocess)
    assert torch.equal(got, _before(decode(data), shape, preprocess))
    luma = match.Luma(px)
    assert torch.equal(match.as_compared(pixels_for(luma, 0, shape), shape, preprocess),
                       _before(luma[0], shape, preprocess))


def test_a_huge_jpeg_neighbour_is_decoded_at_the_scale_its_comparison_needs(monkeypatch):
    """Fails on the code before: every neighbour was decoded whole (an 8000x12000 JPEG: 288 MB, then ~1.5 GB of
    float32 copies of its cut). Here a 2600x3900 JPEG (10 MP, over COMPARE_FULL_PIXELS) against 512 px
    generations: decoded at 1/2 scale (both sides >= 2 x 512), and its distances within 5e-3 of the exact ones."""
    rng = np.random.default_rng(4)
    img = _photo(rng, 2600, 3900)
    data = _jpeg(img)
    decoded = []
    real = match.decode

    def spy(b, *a, **kw):
        out = real(b, *a, **kw)
        decoded.append(out.shape[:2])
        return out

    monkeypatch.setattr(match, "decode", spy)
    exact = _before(decode(data), (512, 512))
    gen = np.clip(exact[0].permute(1, 2, 0).numpy() * 255 + rng.normal(0, 4, (512, 512, 3)), 0, 255).astype(np.uint8)
    other = _photo(rng, 512, 512)
    pixels = match.TrainPixels({0: data, 1: encode_png(other)}, {0: "t0", 1: "t1"})
    samples = pa.table({"sample_id": ["p/0"], "prompt_id": ["p"], "prompt": ["x"],
                        "image": pa.array([encode_png(gen)], pa.binary())})
    rows = match.verify_all(samples, np.zeros((1, 2), np.float32), np.array([[0, 1]]), pixels,
                            {0: ("t0", ""), 1: ("t1", "")}, MatchConfig(), "l2", "center_crop", {})
    assert (1300, 1950) in decoded and (2600, 3900) not in decoded
    (row,) = rows
    assert row["train_gid"] == 0 and row["extracted"]
    want = float(tiled_l2(to_unit(torch.tensor(gen[None])), exact)[0])
    assert abs(row["distance"] - want) < 5e-3


def test_a_huge_image_is_averaged_in_blocks_before_its_float32_cut(monkeypatch):
    """An image over COMPARE_FULL_PIXELS that decodes whole (a PNG) is averaged over r x r blocks in uint8 strips
    down to >= HEADROOM x the comparison's size, then resized: within 1e-2 tiled l2 of the exact cut (5e-3 but for
    pad, whose one-row white border here the full-size cut rounds to and the averaged one does not), at the same
    size, for every trainset.preprocess. (The budget is lowered here: a 1200x1800 image stands for 8000x12000;
    at 512 px an 8000x12000 one is ~1e-3 off.)"""
    monkeypatch.setattr(match, "COMPARE_FULL_PIXELS", 1 << 16)
    img = _photo(np.random.default_rng(5), 1201, 1803)  # rows and columns left over a block
    for shape in ((128, 128), (128, 192), (96, 64)):
        for preprocess in ("center_crop", "pad", "resize"):
            assert match._reduction(img.shape[:2], img.shape[:2], shape) >= 2
            got, want = match.as_compared(img, shape, preprocess), _before(img, shape, preprocess)
            assert got.shape == want.shape and got.dtype == torch.float32
            assert float(tiled_l2(got, want)[0]) < (1e-2 if preprocess == "pad" else 5e-3)
    # the block means themselves: exact
    small = np.random.default_rng(6).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    box = match._box_reduced(small, 2)
    assert box.shape == (3, 4, 3)
    want = small[0:6, 0:8].astype(np.float64).reshape(3, 2, 4, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(box, want, rtol=1e-6)

