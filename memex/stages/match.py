"""Match stage: join generations with the training images they copy, and verify on pixels.

    match_shards(cfg, run_name) -> int   matches/ for every samples shard not yet matched
    run(cfg, run_name) -> summary        the above, then the report's training images and the summary

A unit is one samples shard: matches/shard-K holds the verified candidates of samples/shard-K, so
an adaptive audit matches each round's shards as they come (memex/stages/audit.py) and a rerun
skips matched shards. Units run in the driver through memex/runner.py `do_unit`; in each:
  1. `select_candidates`: the shard's samples in a flagged prompt's clique (match.candidates=
     cliques, the paper's filter), or every sample (=all: the paper's unconditional setting, and
     memex's audits of text models, where the training set is at hand and matching a generation
     costs far less than generating it);
  2. `propose`: their nearest training images by embedding (memex/stages/nearest.py: one resident
     worker holds the embedder and every index shard for the whole stage, GPU when resources ask;
     the same ids and order as one flat index over all vectors);
  3. `fetch_training_images`: the pixels of every training image in some top k (train.pack: a ranged
     read each, memex/train_rows.py);
  4. `verify`: each candidate against its k nearest training images with match.distance: tiled l2
     <= 0.15 (Stable Diffusion style), or relative l2 <= 0.9 (alpha = 0.5, n = 50; small
     unconditional models); the best (smallest) distance is the candidate's match, with the
     matched image's tile detail (low complexity below the threshold, memex/distances.py);
then `keep_for_report` copies the matched training images into <run>/matched_train_images.parquet
and `summarize` writes <run>/summary.json (outside matches/, which holds matches only), where a
picture counts as extracted only with enough copying generations (`extracted_pictures`).
Memory: one samples shard's candidates and their neighbours' encoded images at a time, and the stage's
`Compared` (resources.pixel_cache_mb of training images cut for comparison); a huge neighbour is decoded and cut
no larger than the comparison needs (COMPARE_FULL_PIXELS); the summary holds matches/'s extracted rows only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memex import runner
from memex.config import AuditConfig, CandidateSource, DistanceKind, MatchConfig, adaptive, plain
from memex.images import decode, decoded_pixels, encode_png, is_grayscale, luma_rgb, to_aspect
from memex.layout import MATCHED_TRAIN_SCHEMA, MATCHES_SCHEMA, RunLayout, StorageError
from memex.membership import IndexInfo, fetch_train_rows, picture_rows, read_info, read_pictures
from memex.prompts import read_run_prompts
from memex.redact import redact, redact_urls
from memex.stages.nearest import Neighbours

log = logging.getLogger("memex.match")


# 1. candidates ---------------------------------------------------------------------------------
def clique_members(layout: RunLayout) -> pa.Array:
    """Sample ids of every flagged prompt's clique (match.candidates=cliques)."""
    flagged = layout.candidates.read(columns=["flagged", "sample_ids"])
    flagged = flagged.filter(flagged["flagged"])
    return pa.array([s for ids in flagged["sample_ids"].to_pylist() for s in ids], pa.string())


def select_candidates(layout: RunLayout, shard: int, wanted: pa.Array | None) -> pa.Table:
    """sample_id, prompt_id, prompt, image of one samples shard's samples to verify: those in
    `wanted` (clique members), or all of them (None). One shard: the driver holds shard_size PNGs
    (~0.4 MB each at 512 px), never the run's (500 x 350,000 in the paper)."""
    t = layout.store.read_table(layout.samples.file(shard), columns=["sample_id", "prompt_id", "prompt", "image"])
    return t if wanted is None else t.filter(pc.is_in(t["sample_id"], wanted))


# 3. training pixels ---------------------------------------------------------------------------
class _Derived(Mapping):
    """gid -> an image made from another mapping's entry at each access (`_keys` holds the gids)."""

    _keys: Mapping

    def __contains__(self, gid) -> bool:
        return gid in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class TrainPixels(_Derived):
    """gid -> (H, W, 3) uint8 training image, decoded from its stored bytes at each access and not kept.

    The driver holds a shard's neighbours encoded: 64 generations x match.k = 10 are up to 640
    training images, ~0.1-0.5 MB each as LAION's JPEGs against ~4.5 MB each decoded at 1.5 MP, 2.9 GB
    a shard (bench/bench_match_memory.py). The stage's `Compared` keeps them cut, so an image is decoded
    again only when its cut one was dropped, and one over COMPARE_FULL_PIXELS no larger than the comparison
    needs (`for_shape`: an 8000x12000 JPEG at 1/4 scale). An image that no longer decodes (one read from its uri,
    changed since the index was built) leaves the mapping at its first access, with a warning naming
    it: its generations are compared with their other neighbours (`readable`)."""

    def __init__(self, encoded: dict[int, bytes], names: dict[int, str], alpha: str = "white"):
        self.encoded, self.names = encoded, names  # gid -> bytes, gid -> "id (uri)" for messages
        self.alpha = alpha  # as the index decoded them (IndexInfo.alpha: trainset.alpha)

    def __getitem__(self, gid: int) -> np.ndarray:
        return self._decode(gid)

    def for_shape(self, gid: int, shape: tuple[int, int]) -> np.ndarray:
        """The training image gid as a comparison with a generation of `shape` needs it (`pixels_for`): one over
        COMPARE_FULL_PIXELS decoded at the smallest JPEG DCT scale (1/2, 1/4, 1/8) keeping both its sides at least
        HEADROOM x the generation's longer side, which `as_compared` cuts and sizes to the generation's; others
        whole, as [gid] decodes them."""
        return self._decode(gid, shape)

    def _decode(self, gid: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        data = self.encoded[gid]  # KeyError: not fetched, or not readable
        try:
            # the header alone: ~0.1 ms, against ~1 s to decode an 8000x12000 JPEG whole
            side = HEADROOM * max(shape) if shape is not None and decoded_pixels(data) > COMPARE_FULL_PIXELS else None
            return decode(data, alpha=self.alpha, min_side=side)
        except Exception as e:  # noqa: BLE001 - one bad image leaves the mapping, named; the stage goes on
            del self.encoded[gid]
            unreadable(self.names.get(gid, f"gid {gid}"), f"{type(e).__name__}: {e}")
            raise KeyError(gid) from e

    @property
    def _keys(self) -> Mapping:
        return self.encoded

    def merge(self, other: TrainPixels) -> None:
        self.encoded.update(other.encoded)
        self.names.update(other.names)


_WARNED: set[str] = set()  # the images warned of in this stage run: each shard that fetches one again stays quiet


def _first_time(name: str) -> bool:
    """Whether `name` is warned of for the first time in this stage run (and mark it)."""
    if name in _WARNED:
        return False
    _WARNED.add(name)
    return True


def unreadable(name: str, reason: str) -> None:
    if not _first_time(name):
        return
    log.warning("match: training image %s could not be read (%s): its generations are compared with their other "
                "neighbours. Restore it, or rebuild the index without it (delete the index folder named in "
                "summary.json's index.uri).", name, reason)


def too_small(name: str, reason: str) -> None:
    """Warn once per stage run of a training image too small to compare (NotComparable): it decodes, and a
    rebuilt index would hold it again, so there is nothing to restore; it is skipped."""
    if not _first_time(name):
        return
    log.warning("match: training image %s is %s; it is skipped, and its generations are compared with their "
                "other neighbours", name, reason)


def fetch_training_images(info: IndexInfo, gids, storage_options: dict,
                          known: Mapping | None = None) -> tuple[TrainPixels, dict]:
    """(TrainPixels of the ids >= 0 in `gids` not in `known` (fetched by an earlier round), {gid: (id,
    caption)}). The bytes come from train.pack (or the rows' uris: read here, on threads)."""
    from memex.ingest import fetch_bytes

    want = [int(g) for g in np.unique(np.asarray(gids)) if g >= 0 and int(g) not in (known or {})]
    layout = info.layout(storage_options)
    train = fetch_train_rows(layout, want)
    by_id, bad = fetch_bytes(train, storage_options, version=layout.uri)  # tar offsets keyed by the index
    gid_of = dict(zip(train["id"].to_pylist(), train["gid"].to_pylist()))
    for b in bad.to_pylist():
        unreadable(f"{b['id']} ({redact_urls(b['uri'] or '')})", b["reason"])
    names = {g: f"{i} ({redact_urls(u)})" if u else str(i)
             for g, i, u in zip(*(train[c].to_pylist() for c in ("gid", "id", "uri")))}
    meta = {g: (i, c) for g, i, c in zip(*(train[c].to_pylist() for c in ("gid", "id", "caption")))}
    return TrainPixels({gid_of[i]: data for i, data in by_id.items()}, names, info.alpha or "white"), meta


def pixels_for(pixels: Mapping, gid: int, shape: tuple[int, int]) -> np.ndarray:
    """pixels[gid] as a comparison with a generation of `shape` needs it: a large one bounded in the decode
    (TrainPixels.for_shape, and Luma's over it), else pixels[gid] (a dict of arrays)."""
    sized = getattr(pixels, "for_shape", None)
    return sized(gid, shape) if sized is not None else pixels[gid]


def readable(gids, image: Callable[[int], object]) -> tuple[list[tuple[int, int]], list]:
    """([(rank, gid)], [image(gid)]) of the neighbours gids (a row of the search's I, -1 padded) whose
    image can be had: image raises KeyError for one not fetched or not decodable (TrainPixels)."""
    nb, got = [], []
    for rank, g in enumerate(gids):
        if g < 0:
            continue
        try:
            got.append(image(int(g)))
        except KeyError:
            continue
        nb.append((rank, int(g)))
    return nb, got


# 4. verification on pixels --------------------------------------------------------------------
def pixel_distances(gen: np.ndarray, neighbors: list, kind: DistanceKind, preprocess: str) -> np.ndarray:
    """(k,) float64 distances of one generation (H, W, C) uint8 to each training image: tiled l2
    (the paper's), or plain l2 (RMS, the input of relative l2). Each training image is first cut to
    the generation's aspect ratio (trainset.preprocess), then each pair is compared at their smaller
    common size. One pair at a time: training images keep their own sizes. A neighbour given as a
    tensor is taken as already cut and sized (`Compared`)."""
    import torch

    from memex.distances import l2_pairwise, tiled_l2, to_unit

    g = to_unit(torch.tensor(gen[None]))  # tensor(): copies read-only arrays
    fn = tiled_l2 if kind == DistanceKind.tiled_l2 else (lambda a, b: l2_pairwise(a, b)[:, 0])
    return np.array([float(fn(g, n if isinstance(n, torch.Tensor) else as_compared(n, gen.shape[:2], preprocess))[0])
                     for n in neighbors], dtype=np.float64)


class Compared:
    """Training images as the distances compare them with generations of one shape (`as_compared`), made
    once and kept across a stage's shards, the least recently used dropped past max_bytes. Cutting and
    resizing a 1024x768 training image for a 512 px generation takes ~25 ms, the pair's tiled l2 ~1.5 ms,
    and a prompt's generations share most of their k neighbours (bench/bench_verify.py: 3.5x at the demo's reuse).
    Keys: (gid, luma, shape): gids of one index."""

    def __init__(self, preprocess: str, max_bytes: int = 1 << 30):
        self.preprocess, self.max_bytes = preprocess, max_bytes
        self._d: OrderedDict = OrderedDict()
        self.nbytes = self.made = self.hits = 0

    def get(self, gid: int, luma: bool, image: Callable[[], np.ndarray], shape: tuple[int, int],
            name: str | None = None):
        """The (1, C, h, w) training image gid as compared with a generation of `shape`; image() gives its
        pixels (uint8, luma or not as the key says) when it is not kept. One too small to compare raises
        NotComparable (a KeyError: `readable` skips it), warned of once a stage run as `name` (else its gid)."""
        key = (gid, luma, tuple(shape))
        t = self._d.get(key)
        if t is not None:
            self._d.move_to_end(key)
            self.hits += 1
            return _as_rgb(t)
        try:
            t = as_compared(image(), shape, self.preprocess)  # (1, C, h, w) float32: 3 MB at 512 px
        except NotComparable as e:
            too_small(name or f"gid {gid}", e.args[0])
            raise
        if luma:  # its three channels are equal (luma_rgb, resized alike): one is kept, a third of the bytes
            t = t[:, :1].clone()
        self.made += 1
        self._d[key] = t
        self.nbytes += t.numel() * t.element_size()
        while self.nbytes > self.max_bytes and len(self._d) > 1:
            _, old = self._d.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()
        return _as_rgb(t)


def _as_rgb(t):
    """A kept one-channel luma (1, 1, h, w) as the (1, 3, h, w) the distances compare: a view, no copy."""
    return t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t


def as_compared(img: np.ndarray, shape: tuple[int, int], preprocess: str):
    """A training image (H, W, C) uint8 as the distance compares it with a generation of `shape`:
    cut to its aspect ratio (trainset.preprocess), at the pair's common size -> (1, C, h, w) in
    [0, 1]. Its tile detail and the same-picture test were measured at the training image's own
    size: a 256 px photo's grain, which a 32 px comparison averages away, made a low-complexity
    picture count after one generation (detail 0.19 at 256 px, 0.04 at 32), and two stored copies
    of one picture "another picture" (0.14-0.17 apart at 256 px, 0.01 at 32). An image over
    COMPARE_FULL_PIXELS is averaged over blocks first, to HEADROOM x the common size (`_reduction`)."""
    import torch

    from memex.distances import GRID, at_size, common_size, to_unit

    if preprocess == "pad":  # averaged before its white borders are added: their edges stay sharp where the
        # blocks would straddle them (0.05 off on the border's pixels), and no full-size padded copy is made
        r = _reduction(img.shape[:2], img.shape[:2], shape)
        cut = to_aspect(_box_reduced(img, r) if r > 1 else img, shape[0], shape[1], preprocess)
    else:
        cut = to_aspect(img, shape[0], shape[1], preprocess)
        r = _reduction(img.shape[:2], cut.shape[:2], shape)
        cut = _box_reduced(cut, r) if r > 1 else cut
    if r > 1:  # a large image, averaged a strip at a time: its float32 levels (an array of its own) to [0, 1]
        cut /= 255
        fitted = torch.from_numpy(cut).permute(2, 0, 1)[None]
    else:
        fitted = to_unit(torch.tensor(cut[None]))
    if min(fitted.shape[-2:]) < GRID:  # a 1 px tracking GIF, a 600x2 banner's cut: no 4x4 grid of tiles
        raise NotComparable(f"{fitted.shape[-2]}x{fitted.shape[-1]} px once cut to the generations' aspect: "
                            f"too small to compare (the tiled l2 needs {GRID} px a side)")
    return at_size(fitted, common_size(tuple(shape), fitted.shape[-2:]))


# A training image is compared at the generation's size (distances.common_size: the smaller of the two). One over
# COMPARE_FULL_PIXELS is first brought down to no less than HEADROOM x that size on each side: decoded at a JPEG's DCT
# scale (TrainPixels.for_shape), then averaged over r x r blocks a strip of rows at a time (`_box_reduced`), before
# the float32 copies the comparison makes of its cut (12 bytes a pixel, two while to_unit converts). Decoded whole
# and cut in float32, one 8000x12000 neighbour held ~1.7 GB in the driver for a 512 px comparison, against ~0.12 GB
# as a JPEG now, ~0.65 GB as a PNG (decoded whole; bench/bench_match_memory.py --driver). Images up to it (LAION's
# are ~0.3-1.5 MP) are compared exactly as before; a larger one's distances move by ~1e-3 tiled l2
# (tests/test_match_memory.py).
COMPARE_FULL_PIXELS = 1 << 22  # 4 Mi px, a 2048x2048 image: ~120 MB on its way to the comparison
HEADROOM = 2  # the reduced cut's sides, in the comparison's: its antialiased resize still averages 2x2 or more


def _reduction(image: tuple[int, int], cut: tuple[int, int], shape: tuple[int, int]) -> int:
    """The block side r an image of size `image`, cut to `cut`, is averaged over before its comparison with a
    generation of `shape` (1: none, an image up to COMPARE_FULL_PIXELS, or one cut near the comparison's size)."""
    from memex.distances import common_size

    if image[0] * image[1] <= COMPARE_FULL_PIXELS:
        return 1
    h, w = common_size(tuple(shape), tuple(cut))
    if h <= 0 or w <= 0:
        return 1
    return max(1, min(cut[0] // (HEADROOM * h), cut[1] // (HEADROOM * w)))


def _box_reduced(img: np.ndarray, r: int) -> np.ndarray:
    """(H, W, C) uint8 -> (H // r, W // r, C) float32 levels (0-255), each pixel the mean of an r x r block (the
    H % r rows and W % r columns left over split between the edges), ~1 Mi values converted at a time."""
    h, w, c = img.shape[0] // r, img.shape[1] // r, img.shape[2]
    top, left = img.shape[0] % r // 2, img.shape[1] % r // 2
    out = np.empty((h, w, c), np.float32)
    step = max(1, (1 << 20) // (w * r * r * c))  # output rows a strip
    for y in range(0, h, step):
        rows = img[top + y * r: top + min(h, y + step) * r, left: left + w * r].astype(np.float32)
        out[y: y + step] = rows.reshape(-1, r, w, r, c).mean(axis=(1, 3))
    return out


class NotComparable(KeyError):
    """A training image too small to compare with a generation: skipped like an unreadable one
    (`readable`), named in a warning, instead of failing the stage (F.interpolate to 0x0)."""


def relative_distance(l2: np.ndarray, pictures: list[int], n: int, alpha: float) -> tuple[float, int]:
    """The CIFAR-10 relative distance over the n nearest *distinct pictures* by exact pixel l2.

    l2 (p,): plain l2 of the generation to p proposed training rows; pictures (p,): the picture
    (near-duplicate group) of each row. A picture stored 33 times enters the reference set once,
    so the most duplicated images are not held to a stricter test. Returns (d, proposal index of
    the nearest picture's nearest row)."""
    import torch

    from memex.distances import relative_ratios

    best: dict[int, int] = {}  # picture -> its nearest row
    for j in np.argsort(l2, kind="stable"):
        best.setdefault(pictures[j], int(j))
    chosen = list(best.values())[:n]  # ascending l2: the n nearest distinct pictures
    if len(chosen) < n and _first_time("relative l2 reference set"):  # a small index, unreadable neighbours
        log.warning("match: relative l2 compared a generation with the mean of %d distinct pictures, fewer than "
                    "match.n_neighbors=%d (the index holds fewer, or some neighbours were unreadable): its "
                    "reference set is smaller than the setting says, and its ratios are not the paper's",
                    len(chosen), n)
    r = relative_ratios(torch.tensor(l2[chosen], dtype=torch.float64)[None], alpha)[0]
    return float(r[0]), chosen[0]  # chosen[0] has the smallest l2, hence the smallest ratio


def verify_all(samples: pa.Table, D: np.ndarray, I: np.ndarray, pixels: dict, meta: dict, m: MatchConfig,
               metric: str, preprocess: str, picture: dict[int, int], compared: Compared | None = None) -> list[dict]:
    """One MATCHES_SCHEMA row per candidate that has a readable neighbour: its best match.

    tiled_l2: the nearest of the k embedding neighbours by tiled l2. relative_l2: the embedding
    search proposes, pixels decide: relative_distance over the proposals' distinct pictures.
    compared: the stage's cache of training images as compared (None: one for this call)."""

    from memex.distances import tile_detail, within

    rows, luma = [], Luma(pixels)
    compared = compared if compared is not None else Compared(preprocess)
    caches: dict[bool, tuple[dict, dict]] = {False: ({}, {}), True: ({}, {})}  # tile detail, same picture
    for j, (sid, pid, text, png) in enumerate(zip(*(samples[c].to_pylist()
                                                    for c in ("sample_id", "prompt_id", "prompt", "image")))):
        gen = decode(png)
        # a grayscale model's generation against colour training images: compared with their luma
        # (its gray copied into 3 channels was ~0.47 RMS from a pure red it reproduces exactly)
        gray = is_grayscale(png)
        px, (detail, same) = luma if gray else pixels, caches[gray]
        shape = gen.shape[:2]

        def cut(x: int, px=px, gray=gray, shape=shape):  # training image x as compared with this generation
            # (decoded, and its luma taken, on a miss)
            return compared.get(x, gray, lambda: pixels_for(px, x, shape), shape,
                                str(meta[x][0]) if x in meta else None)

        nb, cuts = readable(I[j], cut)
        if not nb:
            continue
        d = pixel_distances(gen, cuts, m.distance, preprocess)
        if m.distance == DistanceKind.relative_l2:
            dist, best = relative_distance(d, [picture.get(g, g) for _, g in nb], m.n_neighbors, m.alpha)
        else:
            best = int(np.argmin(d))
            dist = float(d[best])
        rank, g = nb[best]
        if (g, gen.shape[:2]) not in detail:  # the training image as it was compared: the generation's shape and size
            detail[g, gen.shape[:2]] = float(tile_detail(cut(g))[0])
        ed = float(D[j, rank])
        margin = None
        if m.distance == DistanceKind.tiled_l2 and within(dist, m.threshold):
            margin = distinct_margin(d, [g for _, g in nb], best, px, picture, gen.shape[:2], m, preprocess, same,
                                     compare=cut)
        rows.append({"sample_id": sid, "prompt_id": pid, "prompt": text, "train_gid": g, "train_id": meta[g][0],
                     "train_caption": meta[g][1], "distance": dist,
                     "embed_distance": float(np.sqrt(max(ed, 0.0))) if metric == "l2" else ed,
                     "neighbor_rank": rank, "extracted": within(dist, m.threshold),
                     "train_detail": detail[g, gen.shape[:2]], "margin": margin})
    return rows


class Luma(_Derived):
    """Training pixels (gid -> uint8 RGB) as a grayscale generation is compared with them: each one's
    luma (memex/images.py luma_rgb), made at each access and not kept (`Compared` keeps the cut ones);
    gray training images are unchanged by it."""

    def __init__(self, pixels: Mapping):
        self.pixels = pixels

    def __getitem__(self, gid: int) -> np.ndarray:
        return luma_rgb(self.pixels[gid])

    def for_shape(self, gid: int, shape: tuple[int, int]) -> np.ndarray:
        return luma_rgb(pixels_for(self.pixels, gid, shape))

    @property
    def _keys(self) -> Mapping:
        return self.pixels


def distinct_margin(d: np.ndarray, gids: list[int], best: int, pixels: dict, picture: dict[int, int],
                    shape: tuple[int, int], m: MatchConfig, preprocess: str, same: dict,
                    compare: Callable | None = None) -> float | None:
    """d[best] / the distance to the nearest neighbour of another picture: how distinctly the
    generation copies its match (Lowe's ratio test for image matching, 2004). A neighbour within
    match.threshold of the matched image itself is the same picture by the match's own standard
    (a near-duplicate the index did not group), so it is skipped. None: no other picture among the k.
    `same` caches that training-pair test across the generations of a shard (the many copies of one
    memorized picture share their neighbours): about one pixel distance per distinct pair."""
    from memex.distances import tiled_l2, within

    mine = picture.get(gids[best], gids[best])
    for j in np.argsort(d, kind="stable"):
        g = gids[j]
        if j == best or picture.get(g, g) == mine:
            continue
        key = (gids[best], g, shape)
        if key not in same:  # the two training images as the generation was compared with each
            pair = ((compare(x) if compare else as_compared(pixels[x], shape, preprocess)) for x in (gids[best], g))
            same[key] = within(float(tiled_l2(*pair)[0]), m.threshold)
        if same[key]:
            continue
        return float(d[best] / d[j]) if d[j] > 0 else 1.0
    return None


# 5. the training images the report shows ------------------------------------------------------
# The report's training images are kept at most REPORT_SIDE px on their long side: the page shows THUMB (256 px)
# thumbnails of them (memex/report.py), and 1024 px keeps a generation's own size (Stable Diffusion: 512-1024) for
# a reader of the file. Nothing compares with them (re-matches fetch from the index). Kept whole, a 24 MP camera
# photo (LAION holds many of 10-50 MP) was a 46 MB PNG in 2.8 s, 64 of them 2.9 GiB a chunk, past the 2 GiB a
# binary column holds. A chunk is also cut at REPORT_CHUNK_BYTES of PNGs (~20 such 1024 px photos).
REPORT_SIDE = 1024
REPORT_CHUNK_BYTES = 64 << 20


def report_png(pixels: Mapping, gid: int) -> bytes:
    """The training image gid as keep_for_report stores it: a PNG at most REPORT_SIDE px on its long side (a
    large JPEG decoded at its DCT scale first, as the comparison decodes it). KeyError: not readable."""
    from PIL import Image

    image = pixels_for(pixels, gid, (REPORT_SIDE // HEADROOM,) * 2)  # (for_shape: HEADROOM x the side asked)
    if max(image.shape[:2]) > REPORT_SIDE:
        small = Image.fromarray(image)
        small.thumbnail((REPORT_SIDE, REPORT_SIDE), Image.Resampling.BICUBIC)  # (as the report's thumbnails)
        image = np.asarray(small)
    return encode_png(image)


def keep_for_report(layout: RunLayout, info: IndexInfo, storage_options: dict, chunk: int = 64,
                    group: int = 1024, extracted: pa.Table | None = None) -> None:
    """Every extracted match's training image (the report's pairs show them), into
    <run>/matched_train_images.parquet. Only the extracted: candidates=all verifies every sample, and
    50k CIFAR-sized generations would otherwise copy 50k training images here. (The 200 closest
    non-copies were kept too, and no page ever showed them: 200 remote reads a run for nothing.)
    Each is stored at most REPORT_SIDE px on its long side (report_png). `chunk` images (or REPORT_CHUNK_BYTES
    of PNGs, fewer) are re-encoded and written at a time, fetched `group` at a time (held encoded, ~0.3 MB
    each at 1.5 MP): held all at once, the rows of tens of thousands of extracted pictures (uncounted
    look-alikes included), ~3 MB a PNG, ran the driver out of memory on every rerun; fetched 64 at a time,
    each fetch read train_rows.parquet's footer again (6-12 MB at 5M rows). `extracted`: matches/'s extracted rows
    when the caller holds them (`extracted_matches`), else read here."""
    rows = (extracted.select(["train_gid", "train_id"]) if extracted is not None else layout.matches.read(
        columns=["train_gid", "train_id"], filters=[("extracted", "==", True)])).to_pylist()
    matched = sorted({r["train_gid"]: r["train_id"] for r in rows}.items())

    def tables():
        for start in range(0, len(matched), group):
            fetched = matched[start:start + group]
            pixels, _ = fetch_training_images(info, [g for g, _ in fetched], storage_options)
            out, size = [], 0
            for k, (g, i) in enumerate(fetched):  # one decoded at a time: ~4.5 MB each decoded at 1.5 MP
                try:
                    png = report_png(pixels, g)
                    out.append({"train_gid": g, "train_id": i, "image": png})
                    size += len(png)
                except KeyError:  # not readable since the index was built: named in a warning, shown without
                    pass
                if len(out) >= chunk or size >= REPORT_CHUNK_BYTES or k + 1 == len(fetched):
                    yield pa.Table.from_pylist(out, schema=MATCHED_TRAIN_SCHEMA)
                    out, size = [], 0
            del pixels

    layout.store.write_batches(layout.matched_train_path, MATCHED_TRAIN_SCHEMA, tables())


def propose(cfg: AuditConfig, info: IndexInfo, images: list[bytes], nearest: Neighbours) -> tuple:
    """Steps 2-3: each candidate's nearest training rows by embedding, their pixels and pictures.

    tiled_l2 verifies the match.k nearest. relative_l2 needs match.n_neighbors distinct pictures:
    the search starts at 2 x n rows and widens (x4, up to the whole index) for the candidates
    whose proposals hold fewer distinct pictures, as when one image is stored hundreds of times."""
    m, opts = cfg.match, cfg.storage.options
    relative = m.distance == DistanceKind.relative_l2
    k = min(2 * m.n_neighbors if relative else m.k, info.n_indexed)
    D, I = nearest(images, k)
    pixels, meta = fetch_training_images(info, I, opts)
    picture = read_pictures(info, opts, I)
    while relative and k < info.n_indexed:
        short = [j for j in range(len(images)) if len({picture.get(int(g), int(g)) for g in I[j] if g >= 0})
                 < m.n_neighbors]
        if not short:
            break
        k = min(4 * k, info.n_indexed)
        D2, I2 = nearest([images[j] for j in short], k)
        D = np.pad(D, ((0, 0), (0, k - D.shape[1])), constant_values=np.inf if info.metric == "l2" else -np.inf)
        I = np.pad(I, ((0, 0), (0, k - I.shape[1])), constant_values=-1)
        D[short], I[short] = D2, I2
        more_pixels, more_meta = fetch_training_images(info, I2, opts, known=pixels)
        pixels.merge(more_pixels)
        meta.update(more_meta)
        picture.update(read_pictures(info, opts, I2))
    return D, I, pixels, meta, picture


def match_shard(shard: int, cfg: AuditConfig, layout: RunLayout, info: IndexInfo,
                wanted: pa.Array | None, nearest: Neighbours, compared: Compared | None = None) -> pa.Table:
    """The stage's unit: steps 1-4 for samples shard `shard` -> its MATCHES_SCHEMA table, by sample id."""
    samples = select_candidates(layout, shard, wanted)
    if not samples.num_rows:
        return MATCHES_SCHEMA.empty_table()
    D, I, pixels, meta, picture = propose(cfg, info, samples["image"].to_pylist(), nearest)
    rows = verify_all(samples, D, I, pixels, meta, cfg.match, info.metric, cfg.trainset.preprocess.value, picture,
                      compared)
    return pa.Table.from_pylist(sorted(rows, key=lambda r: r["sample_id"]), schema=MATCHES_SCHEMA)


def claim_settings(cfg: AuditConfig, layout: RunLayout, info: IndexInfo) -> None:
    """The settings matches/ is written with (matches/_settings.json), or refuse others.
    candidates=cliques: the cliques' filter settings too (candidates/_settings.json). A filter redone
    with other settings (candidates/ deleted, as its refusal advises) while matches/ was part done kept
    the units matched against the old cliques and matched the rest against the new ones, and the
    summary counted both. A folder matched before they were recorded adopts them (as it was)."""
    settings = redact({"match": plain(cfg.match), "index_key": info.key, "embedder": plain(cfg.embedder)})
    if cfg.match.candidates == CandidateSource.cliques:
        settings["filter"] = layout.store.read_json(layout.candidates.settings_path)
    layout.matches.claim(settings, f"run folder {layout.uri}", added=("filter",))


def match_shards(cfg: AuditConfig, run_name: str) -> int:
    """Match every complete samples shard that has no matches shard yet; returns how many ran.
    An adaptive audit calls this after each round, then `run` once at the end."""
    layout = RunLayout(cfg.storage.root, run_name, cfg.storage.options)
    info = read_info(layout)
    _WARNED.clear()  # each audit's log names its unreadable images (nightly runs many audits in one process)
    cliques = cfg.match.candidates == CandidateSource.cliques
    if cliques and layout.candidates.success() is None:
        raise StorageError(f"run {layout.uri} has no complete candidates/: run the filter (memex audit) first")
    claim_settings(cfg, layout, info)
    done = set(layout.matches.complete())
    todo = [k for k in layout.samples.complete() if k not in done]
    wanted = clique_members(layout) if cliques and todo else None
    # training images as compared, kept across the shards (resources.pixel_cache_mb: ~3 MB each at 512 px)
    compared = Compared(cfg.trainset.preprocess.value, cfg.resources.pixel_cache_mb << 20)
    with Neighbours(cfg, info, store=layout.store) as nearest:  # embedder and index: loaded at the first unit
        runner.run_here(layout.matches, {k: {} for k in todo}, match_shard, cfg=cfg, layout=layout, info=info,
                        wanted=wanted, nearest=nearest, compared=compared)  # one progress line
    return len(todo)


def run(cfg: AuditConfig, run_name: str) -> dict:
    """Match a generated (and, for candidates=cliques, filtered) run; returns the summary written
    to <run>/summary.json."""
    layout = RunLayout(cfg.storage.root, run_name, cfg.storage.options)
    inputs, read_as = upstream(layout), triage_read(cfg)
    if (marker := layout.matches.success()) is not None and (done := layout.read_summary()) is not None and \
            set(layout.samples.complete()) <= set(layout.matches.complete()):
        redone = marker.get("inputs", inputs) != inputs  # (a folder matched before "inputs" was recorded: as it is)
        if redone and cfg.match.candidates == CandidateSource.cliques:  # named before the claim, which refuses too
            raise StorageError(f"{layout.store.uri_of(layout.candidates.path)} (or triage/) was redone since the "
                               "matches were made, and match.candidates=cliques verified the old cliques' members: "
                               f"delete {layout.store.uri_of(layout.matches.path)} too, and rerun to match the new "
                               "ones. Nothing was changed.")
        claim_settings(cfg, layout, read_info(layout))
        # the triage settings are claimed only by a triage stage that runs: a rerun with others (triage=none,
        # triage.seeds=8) read the old summary's scores and cost (a folder summarized before: as it is)
        if not redone and marker.get("triage", read_as) == read_as:
            if layout.matched_train_source() is None:  # lost (a partial copy of the folder): the report's images
                keep_for_report(layout, read_info(layout), cfg.storage.options)
            return done
        log.info("match: candidates/, triage/ or the triage settings changed since summary.json was written: "
                 "summarizing again")
    # else parts lost after the matches completed (a partial copy of the folder, files removed by
    # hand): the missing matches units are redone and summary.json is written again from them all
    match_shards(cfg, run_name)
    info = read_info(layout)
    ext, verified = extracted_matches(layout)
    log.info("match: %d candidates verified against %d indexed training images", verified, info.n_indexed)
    keep_for_report(layout, info, cfg.storage.options, extracted=ext)
    summary = summarize(cfg, layout, info, ext, verified)
    layout.store.write_json(layout.summary_path, summary)
    layout.matches.mark_success({"summary": "../summary.json", "extracted": summary["extracted_unique_train_images"],
                                 "inputs": inputs, "triage": read_as})
    return summary


# matches/ units read at a time by `extracted_matches`: 256 units of 500 generations (sampling=paper) at ~250 bytes a
# row decoded (prompts, ids, captions) are ~32 MB, whatever the run's size
UNITS_PER_READ = 256


def extracted_matches(layout: RunLayout, units_per_read: int | None = None) -> tuple[pa.Table, int]:
    """(matches/'s extracted rows, in unit order, how many rows matches/ holds): what `summarize` reads, in one pass
    of `units_per_read` units at a time. matches/ read whole held every row's prompt, ids and captions, ~250 bytes
    a row: 240 MB in the driver for 1M generations, ~43 GB for candidates=all at the paper's 175M. (A filtered
    read decodes every column anyway, the units' row groups mixing extracted rows and others; and the rows counted
    from the tables read cost no request more, where the units' markers are one each.)"""
    units = [layout.matches.file(i) for i in layout.matches.complete()]
    step = units_per_read or UNITS_PER_READ
    kept, rows = [MATCHES_SCHEMA.empty_table()], 0
    for k in range(0, len(units), step):
        t = layout.store.read_table(units[k:k + step], schema=MATCHES_SCHEMA)
        rows += t.num_rows
        kept.append(t.filter(t["extracted"]))
        del t
    return pa.concat_tables(kept), rows


def triage_read(cfg: AuditConfig) -> dict:
    """How summarize reads the triage: its settings, and whether from triage/ (needs_stage) or the samples."""
    from memex.stages.triage import needs_stage

    return json.loads(json.dumps({**plain(cfg.triage), "stage": needs_stage(cfg)}, default=str))


def upstream(layout: RunLayout) -> str:
    """A hash of what summary.json reads besides matches/: the filter's and triage's settings and
    summaries. Deleting one of those folders to redo it with other settings (as a refusal's message
    advises) changes it, and summary.json is then written again instead of being returned as it was."""
    parts = [layout.store.read_json(f.settings_path) for f in (layout.candidates, layout.triage)]
    parts += [layout.candidates.success(), layout.triage.success()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def count_pictures(ext: pa.Table, picture: dict[int, int], clique_ids: set[str], m: MatchConfig) -> dict[int, dict]:
    """Per picture (near-duplicate group, memex/membership.py) its copying generations, and whether
    it counts as extracted: >= match.min_generations of them, and for a low-complexity picture
    (train_detail below match.threshold) also >= match.low_detail_min_generations, or one in a
    flagged clique, or one closer to it than its own tile mosaic (distance < detail); and in every
    case one copying generation with margin <= match.max_margin (tiled l2; distinct_margin).
    Rows of one picture count once (docs/method.md#3-extracted-pictures)."""
    from memex.distances import within

    out: dict[int, dict] = {}
    for row in ext.to_pylist():
        p = picture.get(row["train_gid"], row["train_gid"])
        e = out.setdefault(p, {"generations": 0, "in_clique": 0, "detail": row["train_detail"],
                               "best": row["distance"], "margin": None, "unmeasured": False, "closer": False})
        # a generation closer to its own row than that row's tile mosaic: per row (rows of one picture,
        # re-encodings, have details of their own; the picture's least detail and best distance could
        # come from two rows)
        e["closer"] |= row["train_detail"] is not None and row["distance"] < row["train_detail"]
        e["generations"] += 1
        e["in_clique"] += row["sample_id"] in clique_ids
        e["best"] = min(e["best"], row["distance"])
        if row.get("margin") is None:  # no other picture among its k neighbours (or relative l2): no test
            e["unmeasured"] = True
        else:
            e["margin"] = row["margin"] if e["margin"] is None else min(e["margin"], row["margin"])
        if row["train_detail"] is not None:
            e["detail"] = row["train_detail"] if e["detail"] is None else min(e["detail"], row["train_detail"])
    for e in out.values():
        e["low_complexity"] = e["detail"] is not None and e["detail"] < m.threshold and \
            m.distance == DistanceKind.tiled_l2
        need = max(m.min_generations, m.low_detail_min_generations) if e["low_complexity"] else m.min_generations
        # a generation closer to the picture than the picture's own tile mosaic reproduces its detail,
        # not just its 16 tile colours: evidence enough on its own (an exact copy of a flat picture)
        closer = e.pop("closer") and e["low_complexity"]  # (popped: internal, not a summary field)
        # and one copying generation must be distinct: at most max_margin of the way to the next picture
        unmeasured = e.pop("unmeasured")  # internal: not a summary field
        # at the margin's float32 precision, as matches/ stores it (and `within` the threshold): a margin of
        # 0.6 reads 0.60000002 in float32, which max_margin=0.6 refused in float64
        e["distinct"] = m.max_margin is None or unmeasured or within(e["margin"], m.max_margin)
        # min_generations holds on every route: the clique and "closer" routes waive only the low-detail count
        e["counted"] = e["distinct"] and e["generations"] >= m.min_generations and (
            e["generations"] >= need or (e["low_complexity"] and e["in_clique"] > 0) or closer)
    return out


def summarize(cfg: AuditConfig, layout: RunLayout, info: IndexInfo, matches: pa.Table,
              verified: int | None = None) -> dict:
    """<run>/summary.json: the headline numbers (extracted pictures, UNet evaluations), the
    pictures, per-prompt results, config. `matches`: matches/'s rows, or only its extracted ones with
    `verified` the number of rows matches/ holds (`extracted_matches`: what `run` passes)."""
    from memex.plan import SamplePlan
    from memex.stages.triage import needs_stage, preview_distances, prompt_scores

    prompts = read_run_prompts(layout).to_pylist()
    filter_summary = layout.candidates.success()  # None: the filter was skipped (unconditional)
    filtered = filter_summary is not None
    # the columns read here only: every prompt's nearest_distances (500 floats each) as Python objects was ~5.5 GB
    # in the driver at the paper's 350,000 prompts (~16 bytes of Arrow a float became ~100)
    cands = {c["prompt_id"]: c for c in layout.candidates.read(
        columns=["prompt_id", "flagged", "clique_size", "sample_ids"]).to_pylist()} if filtered else {}
    clique_ids = {s for c in cands.values() if c["flagged"] for s in c["sample_ids"]}
    triage, previews = prompt_scores(cfg, layout), preview_distances(cfg, layout)
    ext = matches.filter(matches["extracted"]) if matches.num_rows else matches
    verified = matches.num_rows if verified is None else verified
    by_prompt: dict[str, list[dict]] = {}
    for row in ext.to_pylist():
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    # extracted *pictures*: rows of one picture (near-duplicates in the index) count once
    picture = read_pictures(info, cfg.storage.options, ext["train_gid"].to_numpy() if ext.num_rows else [])
    counts = count_pictures(ext, picture, clique_ids, cfg.match)
    plan = SamplePlan.read(layout.generated)
    per_prompt = []
    for k, p in enumerate(prompts):
        c, hits = cands.get(p["prompt_id"], {}), by_prompt.get(p["prompt_id"], [])
        # extracted_samples: generations within the threshold; counted_*: those whose picture counts (not a
        # low-complexity or generic look-alike one), what the report lists as a prompt's extractions
        counted = [h for h in hits if counts[picture.get(h["train_gid"], h["train_gid"])]["counted"]]
        per_prompt.append({"prompt_id": p["prompt_id"], "prompt": p["prompt"], "samples": plan.samples_of(k),
                           "triage_score": triage.get(p["prompt_id"]),
                           "triage_distance": previews.get(p["prompt_id"]), "flagged": c.get("flagged", False),
                           "clique_size": c.get("clique_size"), "extracted_samples": len(hits),
                           "train_ids": sorted({h["train_id"] for h in hits}), "counted_samples": len(counted),
                           "counted_train_ids": sorted({h["train_id"] for h in counted})})
    rows = picture_rows(info, cfg.storage.options, list(counts))
    seen = sorted(({"picture": rows[p][0], "rows": rows[p], **counts[p]} for p in counts),
                  key=lambda x: (-x["generations"], x["picture"]))
    pictures = [x for x in seen if x["counted"]]
    undecided = (filter_summary or {}).get("undecided_prompt_ids", [])
    samples = layout.samples.success()
    # the triage this config read (prompt_scores' rule): a triage/ left by another config's audit of the folder
    # (a triage=preview run stopped, rerun without it) cost this audit nothing, and its scores are not read
    ran = (layout.triage.success() or {}) if needs_stage(cfg) else {}
    evals = samples.get("unet_evaluations", 0) + ran.get("unet_evaluations", 0)
    # a re-match (memex/stages/rematch.py): the generations are that run's, and so is their cost
    source = {"samples_from": redact_urls(layout.generated.uri)} if layout.samples_from is not None else {}
    return {
        "run": redact_urls(layout.uri),
        **source,
        "model": redact({"name": cfg.model.name, "path": cfg.model.path}),
        "samples": samples["rows"],
        "prompts": len(prompts),
        "prompts_sampled": sum(p["samples"] > 0 for p in per_prompt),
        # the budget that ran: an unconditional model's one prompt keeps the fixed one under budget=adaptive
        # (memex nightly's default), which the report called "sampled in rounds"
        "budget": {"kind": "adaptive" if adaptive(cfg) else "fixed",
                   "rounds": [{"prompts": r.n_prompts, "samples": [r.lo, r.hi]} for r in plan.rounds]},
        # every UNet forward pass of the audit, one per batch row (guidance: 2), padding and triage included
        "unet_evaluations": evals,
        "unet_evaluations_triage": ran.get("unet_evaluations", 0),
        "unet_evaluations_padding": samples.get("padded_evaluations", 0) + ran.get("padded_evaluations", 0),
        # the device model or CPU thread count the samples were made with (their bytes depend on it; a run resumed
        # elsewhere lists two); absent for a run whose shards were written before markers kept it
        **({"samples_made_on": samples["made_on"]} if samples.get("made_on") else {}),
        "unet_evaluations_per_extracted_image": round(evals / len(pictures)) if pictures else None,
        "filter": "ran" if filtered else "skipped: an unconditional model's samples share one prompt",
        "prompts_flagged": sum(bool(c["flagged"]) for c in cands.values()),
        "prompts_undecided": len(undecided),
        "undecided_prompt_ids": undecided,
        "candidates": cfg.match.candidates.value,
        "candidates_verified": verified,
        "extracted_generations": ext.num_rows,  # within the threshold, of any picture (counted or not)
        "counted_generations": sum(p["counted_samples"] for p in per_prompt),  # copying a counted picture
        "extracted_unique_train_images": len(pictures),
        "extracted_pictures": pictures,
        # pictures some generation came within the threshold of, not counted: low complexity, too few copies
        "uncounted_pictures": [x for x in seen if not x["counted"]],
        "extracted_train_ids": sorted({r["train_id"] for r in ext.to_pylist()
                                       if counts[picture.get(r["train_gid"], r["train_gid"])]["counted"]}),
        "thresholds": {"filter_edge_tiled_l2": cfg.filter.edge_threshold, "min_clique": cfg.filter.min_clique,
                       "match_distance": cfg.match.distance.value, "match_threshold": cfg.match.threshold,
                       "match_k": cfg.match.k, "min_generations": cfg.match.min_generations,
                       "low_detail_min_generations": cfg.match.low_detail_min_generations,
                       "max_margin": cfg.match.max_margin},
        "index": {"uri": redact_urls(info.layout(cfg.storage.options).uri), "key": info.key, "shards": len(info.shards),
                  "train_images": info.n_train, "indexed": info.n_indexed, "quarantined": info.n_quarantined,
                  # searched among the training images' luma / cut to the generations' aspect
                  **({"luma": True} if info.luma else {}), **({"aspect": info.aspect} if info.aspect else {})},
        "per_prompt": per_prompt,
        "config": redact(plain(cfg)),  # no credential in any output: memex/redact.py
    }
