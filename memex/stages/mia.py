"""`memex mia`: membership inference on one checkpoint (issue 15; docs/method.md, "Membership inference").

Given a model, a member set (images it was trained on) and a non-member set (held out, same
distribution), score every image with each attack of memex/mia.py and measure how well the scores
tell the two apart (memex/mia_metrics.py). Writes `<storage.root>/<run>/mia/` (memex/layout.py
MiaLayout) and `<run>/report/mia.html`.

    1. check inputs: config, weights, both sets readable; every image decoded once here (the bad
       ones quarantined) so that overlapping sets (same id, or the same picture under two ids) are
       refused before any model work; captions present for a text model
    2. claim the folder (mia/run.json: a rerun resumes, other settings are refused), images.parquet
    3. scores/: units of mia.images_per_unit images on the actor pool (model loaded once per actor); images.parquet
       holds a unit a row group, and each unit reads its own (read_image_rows), as a shadow task reads its images
    4. LiRA (mia.shadow_models > 0): one Ray task per shadow model: train it with `memex train` on
       its half of members + non-members (the target's own recipe, memex_train.json, for as many
       passes over the half as the target made over its set), then its loss on every image ->
       shadows/; the likelihood ratios -> lira.parquet. The halves, steps and seeds are planned and checked
       before step 3, and a shadow with non-finite losses is named before LiRA
    5. metrics per attack -> summary.json, and the report page

A member manifest written by `memex train` (training_manifest.parquet: one row per copy, with
source_id and copies) is read as one image per picture, carrying its number of copies: the report
breaks the AUC down by copies (the most duplicated pictures should be the easiest to tell).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memex import runner
from memex.checkpoints import claim_weights, model_weights_sha256
from memex.config import (
    MEMEX_HOME,
    ArchConfig,
    ArchKind,
    ConfigError,
    DataConfig,
    DType,
    MiaConfig,
    Preprocess,
    TrainConfig,
    TrainerConfig,
    alpha_name,
    check_actor_devices,
    drop_unset_added,
    model_identity,
    plain,
    validate_mia,
)
from memex.images import luma_rgb, to_aspect
from memex.ingest import decode_rows, iter_batches, list_training_set
from memex.layout import MIA_IMAGES_SCHEMA, MIA_LIRA_SCHEMA, MIA_SCORES_SCHEMA, MIA_SHADOW_SCHEMA, MiaLayout
from memex.lease import hold
from memex.manifest import take_rows
from memex.models import ModelError, check_model_inputs, generated_channels, model_json, scheduler_timesteps
from memex.redact import redact
from memex.stages.generate import weight_keys
from memex.storage import StorageError, Store, check_outside, damaged, is_damage, unit_name

log = logging.getLogger("memex.mia")
LIRA = ("lira_online", "lira_offline")
# below this many shadow models LiRA fits one variance for all images (Carlini et al. 2022's advice, under
# 64): an image's own standard deviation from 2 in- and 2 out-losses (mia=lira's 4 shadows) is often near
# 0, and gave random non-members huge ratios where the low-FPR numbers are read (a toy with 4 shadows:
# AUC 0.82 and TPR@1% 0.05 per image, 0.96 and 0.32 global)
LIRA_GLOBAL_BELOW = 64
CHECK_BATCH = 256  # images decoded at a time by the input check
# a non-member within this RMS of a member at 16x16 RGB (area average) is taken for a copy of it: a JPEG
# re-encoding (q=70), a 3/4 resize or a 2-grey-level shift of one picture is 0.008-0.009 there, distinct
# smooth pictures ~0.33 (tests/test_mia_stage.py); 0.02 is ~5 grey levels over the whole thumbnail
NEAR_COPY_RMS = 0.02
THUMB = 16
# a member whose thumbnail varies less than this (std: a near-black night shot, a white card) is not
# matched: distinct pictures of that kind lie within NEAR_COPY_RMS of each other, and dropping them would
# remove the low-loss non-members a loss attack ranks first (its TPR at low FPR read higher)
NEAR_COPY_MIN_STD = 0.05
# a shadow model's training data (shadow_data/): its half's rows, a picture's copies as rows of their own
SHADOW_DATA_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("uri", pa.string()),
                                ("caption", pa.string())])
NEAR_COPY_REASON = "a near copy of member"  # how quarantine.parquet names them (summary.json counts these rows)


# ---- 1. inputs ------------------------------------------------------------------------------
def read_image_set(path: str, caption_column: str, member: bool | None, opts: dict, key: str) -> pa.Table:
    """MIA_IMAGES_SCHEMA rows of one set. A `memex train` manifest (source_id, copies columns) is
    one row per picture: its first row, with its copies."""
    t = list_training_set(path, opts, caption_column, key)  # id, image, uri, caption, stamp (sorted by id)
    copies = pa.nulls(t.num_rows, pa.int32())
    if path.endswith(".parquet"):
        fs, p = fsspec.core.url_to_fs(path, **opts)  # read_manifest checked the file; 3 columns, no image bytes
        if {"source_id", "copies"} <= set(pq.read_schema(p, filesystem=fs).names):
            m = pq.read_table(p, columns=["id", "source_id", "copies"], filesystem=fs)
            m = m.set_column(0, "id", pc.cast(m["id"], pa.string()))
            by_id = dict(zip(m["id"].to_pylist(), zip(m["source_id"].to_pylist(), m["copies"].to_pylist())))
            keep = [i for i, r in enumerate(t["id"].to_pylist()) if by_id[r][0] == r]  # the picture's own row
            t = take_rows(t, keep)
            copies = pa.array([by_id[r][1] for r in t["id"].to_pylist()], pa.int32())
    return pa.table({"image_id": t["id"], "member": pa.array([member] * t.num_rows, pa.bool_()), "image": t["image"],
                     "uri": t["uri"], "caption": t["caption"], "copies": copies}, schema=MIA_IMAGES_SCHEMA)


def is_image_folder(t: pa.Table) -> bool:
    """A set read from a folder of image files (ingest's listing: no bytes, each id its file's path under the
    folder): its ids are file names, not names of pictures."""
    return t.num_rows > 0 and t["image"].null_count == t.num_rows and all(
        u is not None and u.endswith("/" + i) for i, u in zip(t["image_id"].to_pylist(), t["uri"].to_pylist()))


def distinct_folder_ids(sets: list[tuple[str, pa.Table]]) -> list[tuple[str, pa.Table]]:
    """(key, MIA_IMAGES_SCHEMA rows) of each set, where two image folders that name files alike (members/ and
    nonmembers/ both 0000.png, 0001.png, ...: a camera's or an export's numbering) have every id prefixed by
    their set, members/0000.png and nonmembers/0000.png: the file names say nothing of the pictures, and such
    folders were refused as sharing ids. check_sets then compares the pictures: one in both sets is still
    refused. A manifest's ids name its images, and one shared with another set is still refused by id."""
    ids = {n: set(t["image_id"].to_pylist()) for n, t in sets}
    folder = {n: is_image_folder(t) for n, t in sets}
    renamed = {n for n, _ in sets for m, _ in sets if m != n and folder[n] and folder[m] and ids[n] & ids[m]}
    out = []
    for n, t in sets:
        if n in renamed:
            log.info("%s.path and another image folder name files alike (%s): ids read as %s/<file>", n,
                     min(ids[n] & set().union(*(ids[m] for m in renamed if m != n))), n)
            t = t.set_column(0, "image_id", pa.array([f"{n}/{i}" for i in t["image_id"].to_pylist()], pa.string()))
        out.append((n, t))
    return out


def check_sets(images: pa.Table, opts: dict, gray: bool = False, preprocess: str | None = None,
               alpha: str = "white") -> tuple[pa.Table, pa.Table, dict[str, str], dict[str, str]]:
    """(images that decode, quarantine, {id: the image whose shadow split it takes}, {id: sha256 of its pixels});
    refuses overlapping sets, naming the ids. A non-member that is a near copy of a member (a re-encoding, a
    resize: NEAR_COPY_RMS) joins the quarantine, with its member: near as stored, or as the model sees both
    (`preprocess`, mia.preprocess: None is the centre crop, as MiaScorer's). Images joined by copies (a query
    holding another image's picture, near copies within a set or across a query) take one split: split_groups.
    `alpha`: transparent pixels as the model is given them (mia.alpha: alpha_of), the pictures compared so."""
    members = images.filter(pc.equal(images["member"], True))["image_id"].to_pylist()
    nonmembers = images.filter(pc.equal(images["member"], False))["image_id"].to_pylist()
    both = sorted(set(members) & set(nonmembers))
    if both:
        raise ConfigError(f"members.path and nonmembers.path share {len(both)} ids ({', '.join(both[:5])}): "
                          "non-members must be held out of training")
    queries = images.filter(pc.is_null(images["member"]))["image_id"].to_pylist()
    clash = sorted(set(queries) & (set(members) | set(nonmembers)))
    if clash:
        raise ConfigError(f"queries.path shares {len(clash)} ids with the labelled sets ({', '.join(clash[:5])}): "
                          "give the questioned images ids of their own")
    # every image decoded once, as stored, CHECK_BATCH at a time, keeping only a hash of its pixels
    # (~1 ms an image at 32 px; 10,000 512-px images would be 7.9 GB if kept)
    digest, thumbs, bad = {}, {}, []
    # the thumbnails of what the model is given (to_aspect 1:1 as images.fit cuts or pads, before its resize), where
    # that is not the whole stored picture (not square, mia.preprocess not resize): a held-out centre square of a
    # wide member is the very input the model trained on under center_crop, yet 0.28 from it as squashed thumbnails.
    # Thumbnails only (an exact digest of each fitted image would cost a resize of every image at the model's size)
    mode = str(getattr(preprocess, "value", preprocess) or "center_crop")
    views: dict[str, np.ndarray] = {}
    pixels: dict[str, str] = {}  # the stored pixels' hash (pixels.json: a resume's check), RGB either way
    for batch in iter_batches(_rows(images), CHECK_BATCH):
        decoded = decode_rows(batch, None, opts, alpha=alpha)
        for i, img in zip(decoded.ids, decoded.images):
            pixels[i] = hashlib.sha256(f"{img.shape}".encode() + img.tobytes()).hexdigest()
            # what the model sees: a 1-channel model scores the luma (memex.mia.to_model_images), so a colour
            # member and its black-and-white copy are one picture to it, and were neither refused nor grouped
            seen = luma_rgb(img) if gray else img
            digest[i] = hashlib.sha256(f"{seen.shape}".encode() + seen.tobytes()).hexdigest() if gray else pixels[i]
            # every image's, a query's too: "is my re-saved image in there?" is the usual question
            thumbs[i] = thumb(seen)
            if mode != "resize" and seen.shape[0] != seen.shape[1]:
                views[i] = thumb(to_aspect(seen, 1, 1, mode))
        bad.append(decoded.quarantine)
    # the views compared: as stored, and as the model sees them where that differs (the same arrays elsewhere)
    spaces = [("", thumbs)] + ([(f" of the model's input (mia.preprocess={mode})", {**thumbs, **views})]
                               if views else [])
    quarantine = pa.concat_tables(bad)
    seen: dict[str, str] = {}
    for i in members:
        if i in digest:
            seen.setdefault(digest[i], i)
    same = [(i, seen[digest[i]]) for i in nonmembers if i in digest and digest[i] in seen]
    if same:
        pairs = ", ".join(f"{n} = {m}" for n, m in same[:5])
        raise ConfigError(f"{len(same)} non-member images are the same picture as a member ({pairs}): "
                          "non-members must be held out of training (nonmembers.path)")
    near, matched = [], set()
    for view, th in spaces:  # near as stored first (its reason as before), then as the model sees them
        for n, m, d in near_copies(th, [i for i in members if i in th],
                                   [i for i in nonmembers if i in th and i not in matched]):
            near.append((n, m, d, view))
            matched.add(n)
    if near:  # held out by id, but the model trained on the picture: scored as non-members they count against
        # the attack (LAION holds many re-encodings of one image). Left out of scoring, and named why.
        log.warning("%d non-member images are near copies of a member (%s): left out, see quarantine.parquet",
                    len(near), ", ".join(f"{n} ~ {m}" for n, m, _, _ in near[:5]))
        uri = dict(zip(images["image_id"].to_pylist(), images["uri"].to_pylist()))
        quarantine = pa.concat_tables([quarantine, pa.table({
            "id": [n for n, _, _, _ in near], "uri": [uri.get(n) for n, _, _, _ in near],
            "reason": [f"{NEAR_COPY_REASON} {m} (RMS {d:.4f} at {THUMB}x{THUMB}{view} <= {NEAR_COPY_RMS}): a "
                       "held-out image the model trained on, not scored" for _, m, d, view in near]},
            schema=quarantine.schema)])
        for n, _, _, _ in near:
            digest.pop(n)
    ok = one_row_per_picture(images.filter(pc.is_in(images["image_id"], pa.array(list(digest), pa.string()))),
                             digest)
    ok_ids = ok["image_id"].to_pylist()
    labels = dict(zip(ok_ids, ok["member"].to_pylist()))
    split_as = split_groups(ok_ids, labels, digest, [th for _, th in spaces])
    for key, ids in (("members.path", members), ("nonmembers.path", nonmembers)):
        if not any(i in digest for i in ids):  # the side that has none is named, with a reason
            reason = quarantine.filter(pc.is_in(quarantine["id"], pa.array(ids, pa.string())))["reason"]
            raise ConfigError(f"none of the {len(ids)} images of {key} is left to score (first reason: "
                              f"{reason[0].as_py() if len(reason) else 'unknown'}): membership inference needs "
                              "at least one member and one non-member image")
    return ok, quarantine, split_as, {i: pixels[i] for i in ok_ids}


def check_demo_nonmembers(cfg: MiaConfig) -> None:
    """conf/mia.yaml's default non-members are the demo's held-out logos (256-511 of the generator the demo
    models trained on 0-255). Beside another model's members they are another distribution, and every attack
    read near-perfect: refused, naming nonmembers.path."""
    demo = Path(MEMEX_HOME) / "demo"
    if cfg.nonmembers.path == str(demo / "data" / "heldout.parquet") and \
            Path(cfg.model.path).resolve().parent != (demo / "models").resolve():
        raise ConfigError(f"nonmembers.path is the demo's held-out logos (the default), and model.path="
                          f"{cfg.model.path} is not a demo model: give the images held out of its training "
                          "(nonmembers.path=...)")


def check_pixels(layout: MiaLayout, pixels: dict[str, str]) -> None:
    """The images' pixels as the folder was first scored with them (pixels.json), or refuse. The settings key
    covers ids, labels and captions only: an image folder written again under the same file names (or a
    manifest's bytes replaced) resumed, its finished units scored on the old pixels and the rest on the new.
    A folder scored before pixels.json was kept takes today's as its record."""
    was = layout.store.read_json(layout.pixels_path)
    if was is None:
        layout.store.write_json(layout.pixels_path, pixels)
        return
    changed = sorted(i for i in pixels if i in was and was[i] != pixels[i])
    if changed:
        raise ConfigError(f"{len(changed)} images changed since mia folder {layout.uri} scored them, under the same "
                          f"ids ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}): resuming would mix "
                          "scores of old and new pixels. Nothing was changed. Use another run.name (or delete the "
                          "folder) to score the new images, or restore the old ones to resume.")


def thumb(img: np.ndarray) -> np.ndarray:
    """(THUMB * THUMB * 3,) float32 in [0, 1]: a decoded picture's (uint8 RGB, images.decode) area average at
    THUMB x THUMB."""
    from PIL import Image

    small = Image.fromarray(img).resize((THUMB, THUMB), Image.BOX)
    return np.asarray(small, np.float32).reshape(-1) / 255


def near_copies(thumbs: dict[str, np.ndarray], members: list[str], nonmembers: list[str]) -> list[tuple]:
    """(non-member id, member id, RMS) for each non-member within NEAR_COPY_RMS of its nearest member's
    thumbnail (members with enough detail only: NEAR_COPY_MIN_STD): exact, by a flat FAISS search
    (10,000 x 10,000 images: ~1 s)."""
    members = [i for i in members if float(thumbs[i].std()) >= NEAR_COPY_MIN_STD]
    if not members or not nonmembers:
        return []
    rms, j = thumb_search(thumbs, members, nonmembers, 1)
    return [(n, members[int(k)], float(r)) for n, k, r in zip(nonmembers, j[:, 0], rms[:, 0]) if r <= NEAR_COPY_RMS]


def thumb_search(thumbs: dict[str, np.ndarray], base: list[str], queries: list[str], k: int) -> tuple:
    """(RMS (n, k), index into `base` (n, k)) of each query's k nearest base thumbnails: exact, a flat FAISS
    search (10,000 x 10,000 images: ~1 s)."""
    import faiss

    index = faiss.IndexFlatL2(THUMB * THUMB * 3)
    index.add(np.stack([thumbs[i] for i in base]))
    d, j = index.search(np.stack([thumbs[i] for i in queries]), k)
    return np.sqrt(np.maximum(d, 0) / (THUMB * THUMB * 3)), j


def near_pairs(thumbs: dict[str, np.ndarray], ids: list[str], loose: set[str] | frozenset = frozenset(),
               anchors: set[str] | None = None) -> list[tuple[str, str]]:
    """(a, b) for the ids whose thumbnails are within NEAR_COPY_RMS of each other, both with enough detail
    (NEAR_COPY_MIN_STD), every such pair (a flat FAISS range search, ~1 s at 10,000 images); and an id of `loose`
    with less detail (a questioned image) within it of one of `anchors` with enough (a labelled image: "is my
    re-saved dark picture in there?"). Pairs, not each image's 8 nearest: a picture stored 9 or more times in
    two tight clusters (re-encodings at two sizes) was two groups."""
    import faiss

    cand = [i for i in ids if i in thumbs and float(thumbs[i].std()) >= NEAR_COPY_MIN_STD]
    low = [i for i in ids if i in loose and i in thumbs and float(thumbs[i].std()) < NEAR_COPY_MIN_STD]
    if not cand or len(cand) + len(low) < 2:
        return []
    x = np.ascontiguousarray(np.stack([thumbs[i] for i in cand]), dtype=np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    out = []
    for ask, keep in ((cand, lambda b: True), (low, lambda b: anchors is None or cand[b] in anchors)):
        if not ask:
            continue
        q = x if ask is cand else np.ascontiguousarray(np.stack([thumbs[i] for i in ask]), dtype=np.float32)
        lims, d, j = index.range_search(q, float(NEAR_COPY_RMS ** 2 * x.shape[1]) * (1 + 1e-6))
        for a in range(len(ask)):
            for dist, b in zip(d[lims[a]:lims[a + 1]], j[lims[a]:lims[a + 1]]):
                # the same test as near_copies', on the RMS (the radius above is its square, a hair wider for
                # float error)
                if cand[b] != ask[a] and keep(int(b)) and np.sqrt(max(float(dist), 0.0) / x.shape[1]) <= NEAR_COPY_RMS:
                    out.append((ask[a], cand[int(b)]))
    return out


def _roots(ids: list[str], edges, rank) -> dict[str, str]:
    """{id: its group's root} for the ids joined by `edges` (pairs of ids), the root the group's smallest rank(id);
    only the ids whose root is another id, in `ids` order. The components are index.Components' (the index's
    near-duplicate pictures): its root is the smallest number, so each id is numbered by its rank."""
    from memex.index import Components

    by_rank = sorted(ids, key=rank)
    number = {i: k for k, i in enumerate(by_rank)}
    pairs = np.array([(number[a], number[b]) for a, b in edges if a in number and b in number], np.int64)
    if not len(pairs):
        return {}
    components = Components()
    components.add(pairs[:, 0], pairs[:, 1])
    root = dict(components.pairs().tolist())
    return {i: by_rank[root[number[i]]] for i in ids if number[i] in root}


def near_groups(thumbs: dict[str, np.ndarray], ids: list[str]) -> dict[str, str]:
    """{id: the first id (in `ids` order) of its group} for the ids of one set in a group of near copies:
    thumbnails within NEAR_COPY_RMS of another's (with enough detail: NEAR_COPY_MIN_STD), joined through
    every pair within it (near_pairs)."""
    order = {i: k for k, i in enumerate(ids)}
    return _roots(ids, near_pairs(thumbs, ids), order.__getitem__)


def split_groups(ids: list[str], member: dict[str, bool | None], digest: dict[str, str],
                 views: list[dict[str, np.ndarray]]) -> dict[str, str]:
    """{id: the image whose LiRA shadow split it takes} for the images (labelled and questioned, `ids` in
    images.parquet order) joined, through any chain, by the same picture (`digest`: a query under its own id) or a
    near copy in any of `views` (thumbnails as stored, as the model sees them; a questioned image of little
    detail joins a labelled one with enough). Each group takes its root's split: its first member, else its first
    non-member, else its first query, as before, so a folder with no chain and no near copy seen only as the
    model sees it keeps its splits (check_trained_shadows compares them; one written before with such near
    copies, non-square images under center_crop or pad, is refused on resume, naming the shadows to train
    again, and its quarantine changes its settings key). Queries were grouped among themselves only when
    neither matched a labelled image: q1 near a member and q2 near q1 alone split the picture, and out-shadows
    of the member and q1 trained on q2."""
    rank = {i: ({True: 0, False: 1}.get(member.get(i), 2), k) for k, i in enumerate(ids)}
    queries = {i for i in ids if member.get(i) is None}
    labelled = set(ids) - queries
    first: dict[str, str] = {}
    edges = []
    for i in ids:  # the same picture: a query's, or a labelled image's (one_row_per_picture merged a set's own)
        edges.append((i, first.setdefault(digest[i], i)))
    for th in views:
        edges += near_pairs(th, ids, loose=queries, anchors=labelled)
    return _roots(ids, edges, rank.__getitem__)


def one_row_per_picture(images: pa.Table, digest: dict[str, str]) -> pa.Table:
    """Rows of one labelled set that hold the same decoded picture (LAION-style duplicates: several
    ids, one image) as one image: its first row (smallest id), their copies summed (a row's copies
    null counts 1). A picture stored k times counted k members (k x its weight in the TPR at low
    FPR, and an empty by-copies table), and LiRA split its copies among shadows independently, so
    half its out-shadows trained on it. Queries stay one row each: each gets its own p-value."""
    ids, member, copies = (images[c].to_pylist() for c in ("image_id", "member", "copies"))
    first: dict[tuple, int] = {}
    keep, total, merged = [], [], 0
    for j, (i, m, c) in enumerate(zip(ids, member, copies)):
        key = (m, digest[i]) if m is not None else (None, i)
        if key in first:
            total[first[key]] += c or 1
            merged += 1
        else:
            first[key] = len(keep)
            keep.append(j)
            total.append(c or 1)
    if not merged:
        return images
    log.info("%d rows hold a picture an earlier row of their set holds: one image each, with its copies", merged)
    out = take_rows(images, keep)
    alone = [copies[j] for j in keep]  # a picture on one row keeps its copies as given (null: not known)
    n = [t if t != (alone[k] or 1) else alone[k] for k, t in enumerate(total)]
    return out.set_column(out.column_names.index("copies"), "copies", pa.array(n, pa.int32()))


def read_image_rows(store: Store, path: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of images.parquet (MIA_IMAGES_SCHEMA): only the row groups that hold them are read
    (the file is written mia.images_per_unit rows a group, so a unit reads one). Each scoring actor and each
    LiRA shadow task read the whole file, every image's bytes, to score its part of it: ~5 GB each at 50,000
    LAION images of 100 KB, times the actors and tasks of a node (bench/bench_mia_memory.py)."""
    try:
        with pq.ParquetFile(path, filesystem=store.fs, pre_buffer=False) as f:
            md, groups, first, at = f.metadata, [], 0, 0
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                if at < stop and at + n > start:
                    first = at if not groups else first
                    groups.append(g)
                at += n
            if not groups:
                return f.schema_arrow.empty_table()
            t = f.read_row_groups(groups)
    except (pa.ArrowInvalid, OSError) as e:  # truncated or removed since: named, with the recovery
        if not is_damage(e):  # a storage failure (a reset, a refused read): re-raised, the table is fine
            raise
        raise StorageError(damaged(store.uri_of(path), "Parquet", e)) from e
    return t.slice(start - first, stop - start)  # (first <= start: the first group read holds row `start`)


def regroup_images(layout: MiaLayout, per: int) -> None:
    """An images.parquet written before it was kept mia.images_per_unit rows a row group (one group for the
    whole set) is written again so, the same rows, once: else each unit of a resume read the whole file."""
    md = pq.read_metadata(layout.images_path, filesystem=layout.store.fs)
    if max((md.row_group(g).num_rows for g in range(md.num_row_groups)), default=0) > per:
        log.info("images.parquet written again %d rows a row group: each unit reads its own rows", per)
        layout.store.write_table(layout.images_path, layout.store.read_table(layout.images_path,
                                                                             schema=MIA_IMAGES_SCHEMA),
                                 row_group_size=per)


def _rows(images: pa.Table) -> pa.Table:
    """images.parquet rows as memex.ingest.decode_rows reads them (id, image, uri)."""
    return images.select(["image_id", "image", "uri"]).rename_columns(["id", "image", "uri"])


def is_text_model(path: str) -> bool | None:
    """True/False from the folder's model_index.json (a text encoder), None when it cannot be read."""
    index = model_json(path, "model_index.json")
    return None if index is None else "text_encoder" in index


def alpha_of(cfg: MiaConfig) -> str:
    """mia.alpha as images.decode takes it (unset: "white")."""
    return alpha_name(cfg.mia.alpha)


def check_alpha(cfg: MiaConfig) -> None:
    """mia.alpha=drop on a `memex train` model (its memex_train.json) is refused: memex train composites
    transparent images onto white, so drop scored its members on pixels it never saw, and LiRA's shadows (memex
    train too) were trained on other pixels than they were scored on."""
    if alpha_of(cfg) != "white" and model_json(cfg.model.path, "memex_train.json") is not None:
        raise ConfigError(f"mia.alpha={alpha_of(cfg)} reads transparent images as a trainer that drops the alpha "
                          f"channel (diffusers' image.convert(\"RGB\")), and model.path={cfg.model.path} was trained "
                          "by `memex train`, which composites them onto white: leave mia.alpha unset")


def with_preprocess(cfg: MiaConfig) -> MiaConfig:
    """mia.preprocess resolved (None: as the model was trained): `memex train` squashes every image to
    its square resolution, so its members are scored squashed (a centre crop of a 3:2 member differed
    from what the model saw by ~70/255 a pixel); any other model gets Stable Diffusion's centre crop.
    The resolved value is what the run folder's settings record."""
    if cfg.mia.preprocess is not None:
        return cfg
    made_by_memex = model_json(cfg.model.path, "memex_train.json") is not None
    return replace(cfg, mia=replace(cfg.mia, preprocess=Preprocess.resize if made_by_memex else Preprocess.center_crop))


def shadow_recipe(model_path: str) -> dict:
    """The target's `memex train` config (memex_train.json): shadows are trained the same way. Its
    "examples" key is the number of rows the target trained on (copies counted), which sets each
    shadow's steps (`shadow_steps`)."""
    info = model_json(model_path, "memex_train.json")
    if info is None:
        raise ConfigError(f"LiRA trains shadow models the way the target was trained, but {model_path} has no "
                          "memex_train.json (not made by `memex train`): set mia.shadow_models=0")
    config = info["config"]
    processes = info.get("processes", 1)
    if processes > 1:  # a shadow trains in one process: the target's examples a step are N x its batch
        config = {**config, "trainer": {**config["trainer"], "batch_size": config["trainer"]["batch_size"] * processes}}
    return {**config, "examples": info.get("examples")}


def shadow_steps(recipe: dict, examples: int, override: int | None) -> int:
    """Training steps for a shadow whose half holds `examples` rows (copies counted): as many passes
    over them as the target made over its own set, at the target's examples a step. Same steps on
    another number of rows would not be the target's recipe: the demo's 4 shadows hold 352-470 rows
    against the target's 560, so 5,000 steps gave each image 1.2-1.6x the target's passes, and
    LiRA's in-losses came from models that had seen their images more often than the target had."""
    if override is not None:
        return override
    target = recipe.get("examples")
    if not target:
        raise ConfigError("LiRA trains each shadow for as many passes over its images as the target made, but the "
                          "target's memex_train.json has no `examples` count: set mia.shadow_steps")
    return max(1, round(recipe["trainer"]["steps"] * examples / target))


def warn_small_shadows(recipe: dict, rows: list[int], override: int | None) -> None:
    """A shadow's half far smaller than the target's training set (members.path a sample of it) trains few
    steps at the target's passes: a weak model beside the target, and LiRA drifts toward chance. Said once."""
    target = recipe.get("examples") or 0
    if override is not None or not target or min(rows) >= target / 4:
        return
    log.warning("LiRA's shadows hold %d-%d training rows each and the target trained on %d: at the target's passes "
                "they train %d-%d steps (the target %d), far weaker models than the target. members.path is a sample "
                "of the training set? Give the whole training set as members.path, or set mia.shadow_steps",
                min(rows), max(rows), target, *(shadow_steps(recipe, r, None) for r in (min(rows), max(rows))),
                recipe["trainer"]["steps"])


def warn_missing_copies(recipe: dict, images: pa.Table) -> None:
    """The target trained on copies (data.duplication) and members.path gives none (the source manifest, not
    the training_manifest.parquet `memex train` wrote): each shadow trains a member once where the target saw
    it up to k times, and LiRA's in-losses come from models that saw the duplicated members far less. Said once."""
    groups = (recipe.get("data") or {}).get("duplication") or []
    members = images.filter(pc.equal(images["member"], True))
    if not groups or members.num_rows == 0 or members["copies"].null_count < members.num_rows:
        return
    most = max(int(g.get("copies", 1)) for g in groups)
    log.warning("the target was trained with data.duplication (up to %d copies of an image) and members.path gives no "
                "copies: LiRA's shadows train each member once. Give the target's training_manifest.parquet (memex "
                "train writes it beside the model) as members.path", most)


def check_trained_shadows(folder, steps: dict[int, int], inside: dict[int, dict[str, bool]] | None = None) -> None:
    """A shadow finished by an earlier run (its marker) with another number of steps than this run
    plans (memex before shadow_steps trained every shadow for the target's steps), or on other images
    (`inside`: image id -> in its half; memex before a questioned copy of a member took the member's
    split), is refused: its losses would sit beside shadows trained another way. shadows/ is read once and
    its rows grouped by shadow (each shadow scanned every row: 2e8 rows looked at on each resume at 64
    shadows of 50,000 images, ~20 s; bench/bench_mia_resume.py)."""
    done = folder.complete()
    rows: dict[int, list[int]] = {}  # shadow -> its rows of shadows/, in file order
    ids: list[str] = []
    was: list[bool] = []
    if inside and done:
        t = folder.read(columns=["shadow", "image_id", "in_training"])
        ids, was = t["image_id"].to_pylist(), t["in_training"].to_pylist()
        shadow = t["shadow"].to_numpy(zero_copy_only=False)
        order = np.argsort(shadow, kind="stable")
        keys, starts = np.unique(shadow[order], return_index=True)
        rows = {int(k): order[a:b].tolist() for k, a, b in zip(keys, starts, [*starts[1:], len(order)])}
    for s in done:
        had = (folder.read_marker(s) or {}).get("training_steps")
        if s in steps and had != steps[s]:
            raise ConfigError(f"shadow model {s} in {folder.store.uri_of(folder.path)} was trained for {had} steps "
                              f"and this run trains it for {steps[s]} (as many passes over its images as the "
                              f"target made): remove {folder.store.uri_of(folder.path)} to train the shadows again")
        if not inside or s not in inside:
            continue
        plan = inside[s]
        other = [ids[j] for j in rows.get(s, ()) if plan.get(ids[j], was[j]) != was[j]]
        if other:
            raise ConfigError(f"shadow model {s} in {folder.store.uri_of(folder.path)} was trained on another half of "
                              f"the images than this run plans ({len(other)} differ, e.g. {other[0]}): remove "
                              f"{folder.store.uri_of(folder.path)} to train the shadows again")


# ---- 3. scoring units (in the actors) --------------------------------------------------------
class ScoreImages:
    """One actor: the model and a MiaScorer, loaded once; a unit reads and scores rows [start, stop) of
    images.parquet, and no other image (read_image_rows)."""

    def __init__(self, cfg: MiaConfig, run_name: str):
        from memex.mia import MiaScorer
        from memex.models import load_model, resolve_device

        self.cfg, self.layout = cfg, MiaLayout(cfg.storage.root, run_name, cfg.storage.options)
        m = cfg.model
        model = load_model(m.path, m.kind, "float32", resolve_device(cfg.resources.device), m.revision, m.unet,
                           m.allow_pickle, m.variant, m.lora, m.text_encoder)
        self.scorer = MiaScorer(model, cfg.mia)

    def __call__(self, index: int, start: int, stop: int) -> tuple[pa.Table, dict]:
        rows = read_image_rows(self.layout.store, self.layout.images_path, start, stop)
        return score_rows(self.scorer, rows, [a.value for a in self.cfg.mia.attacks], self.cfg.storage.options,
                          alpha_of(self.cfg))


def score_rows(scorer, rows: pa.Table, attacks: list[str], opts: dict, alpha: str = "white") -> tuple[pa.Table, dict]:
    """The scores of images.parquet rows, decoded as stored, transparent pixels as `alpha` says (mia.alpha)."""
    decoded = decode_rows(_rows(rows), None, opts, alpha=alpha)
    if decoded.quarantine.num_rows:  # they decoded in step 1: the files changed since
        bad = decoded.quarantine.to_pylist()[0]
        raise ConfigError(f"image {bad['id']} no longer decodes ({bad['reason']}): rerun to re-check the sets")
    before, padded = scorer.unet_evaluations, scorer.padded_evaluations
    caps = rows["caption"].to_pylist()
    raw = scorer.score(decoded.ids, decoded.images, caps if any(c is not None for c in caps) else None, attacks)
    cols = {a: pa.array(raw[a], pa.float32()) if a in raw else pa.nulls(rows.num_rows, pa.float32())
            for a in ("loss", "pia", "secmi")}
    table = pa.table({"image_id": rows["image_id"], "member": rows["member"], "caption": rows["caption"],
                      "copies": rows["copies"], **cols}, schema=MIA_SCORES_SCHEMA)
    return table, {"unet_evaluations": scorer.unet_evaluations - before,
                   "padded_evaluations": scorer.padded_evaluations - padded}


def check_finite(scores: pa.Table, attacks: list[str], model: str) -> None:
    """Every image's score of every attack is a number, before any shadow is trained: a diverged checkpoint
    (NaN weights, fp16 overflow) wrote NaN scores without a word, and the run failed only after training
    every LiRA shadow ("losses must be finite"), or at the metrics with no attack or image named."""
    ids = scores["image_id"].to_pylist()
    for a in (a for a in attacks if a in scores.column_names):
        v = scores[a].to_numpy(zero_copy_only=False).astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(v))
        if len(bad):
            raise ModelError(f"{len(bad):,} of {len(v):,} images have a non-finite {a} score (e.g. "
                             f"{', '.join(ids[k] for k in bad[:3])}): model.path={model} gives noise predictions "
                             "that are not finite there (a diverged checkpoint, NaN weights, float16 overflow). "
                             "Check the checkpoint; no shadow model was trained")


def check_finite_shadows(losses: np.ndarray, ids: list[str], layout: MiaLayout | None = None) -> None:
    """Every shadow's loss (losses: (S, N), shadow_losses) on every image is a number, before LiRA fits anything:
    a shadow that diverged in training (NaN weights) failed LiRA with a bare "losses must be finite" after every
    shadow had trained, naming none, and its marker stayed, so a rerun failed the same way. Names the shadows,
    and (with the layout) what to delete to train them again, as check_finite names the target's images."""
    bad = [s for s in range(losses.shape[0]) if not np.isfinite(losses[s]).all()]
    if not bad:
        return
    k = np.flatnonzero(~np.isfinite(losses[bad[0]]))
    them = "them" if len(bad) > 1 else "it"
    if layout is not None:
        uri = layout.store.uri_of
        delete = [p for s in bad for p in (uri(layout.shadows.marker(s)), uri(layout.shadows.file(s)),
                                           uri(layout.shadow_model(s)))]
    else:  # called as a library: the entries as the mia folder names them
        delete = [p for s in bad for p in (f"shadows/_markers/{unit_name(s)}.json", f"shadows/{unit_name(s)}.parquet",
                                           f"shadow_models/{unit_name(s, 'shadow')}")]
    fix = (f"Delete {', '.join(delete)} and rerun to train {them} again (the other shadows and the target's "
           "scores are kept; the same seed and recipe may diverge again: then another run.name with other "
           "mia.shadow_steps, or mia.shadow_models=0 for the other attacks)")
    raise ModelError(f"LiRA: shadow model{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of "
                     f"{losses.shape[0]} gave non-finite losses (shadow {bad[0]}: {len(k):,} of {len(ids):,} images, "
                     f"e.g. {', '.join(ids[j] for j in k[:3])}): the shadow diverged in training (NaN weights; it "
                     f"trains with the target's memex_train.json recipe) or has no loss there. {fix}")


# ---- 4. LiRA shadow models (one Ray task each) ------------------------------------------------
def train_and_score_shadow(index: int, cfg: MiaConfig, run_name: str, recipe: dict, inside: list[bool],
                           steps: int) -> tuple:
    """Shadow model `index`: trained for `steps` on the images with inside[i] (each repeated as often
    as the target saw it; a picture another image holds, once: repeated_pictures), saved to shadow_models/,
    then its loss on every image (same noise as the target's)."""
    from memex.mia import MiaScorer
    from memex.models import load_model, resolve_device
    from memex.training import train

    layout = MiaLayout(cfg.storage.root, run_name, cfg.storage.options)
    # ids and copies of every image; their bytes mia.images_per_unit rows at a time (read_image_rows), for the half's
    # training data and then for the losses (the task held every image's bytes throughout: ~5 GB a task at 50,000
    # LAION images)
    path, step = layout.images_path, cfg.mia.images_per_unit
    images = layout.store.read_table(path, columns=["image_id", "member", "copies"])
    repeated = repeated_pictures(layout.store.read_json(layout.pixels_path), images["image_id"].to_pylist(),
                                 images["member"].to_pylist())
    examples = sum(max(1, c or 1) for c, i, k in zip(images["copies"].to_pylist(), inside,
                                                     images["image_id"].to_pylist()) if i and k not in repeated)

    def half():
        for a in range(0, images.num_rows, step):
            ids, image, uri, caption = [], [], [], []
            for r in read_image_rows(layout.store, path, a, a + step).filter(pa.array(inside[a:a + step])).to_pylist():
                if r["image_id"] in repeated:  # another image's rows train its picture
                    continue
                for k in range(max(1, r["copies"] or 1)):
                    ids.append(copy_name(r["image_id"], k))
                    image.append(r["image"]), uri.append(r["uri"]), caption.append(r["caption"])
            if ids:
                yield pa.table({"id": ids, "image": image, "uri": uri, "caption": caption}, schema=SHADOW_DATA_SCHEMA)

    layout.store.write_batches(layout.shadow_data(index), SHADOW_DATA_SCHEMA, half())
    arch = dict(recipe["arch"], kind=ArchKind(recipe["arch"]["kind"]))
    trainer = shadow_trainer(recipe, index, steps)
    if arch["kind"] == ArchKind.unconditional:  # text keys it never read: memex train now refuses them set
        for k in ("text_hidden", "text_layers", "max_length"):
            arch.pop(k, None)
    data = DataConfig(path=layout.store.uri_of(layout.shadow_data(index)), caption_column="caption",
                      storage_options=cfg.storage.options)  # the manifest as stored: the record and the input
    with tempfile.TemporaryDirectory(prefix="memex-shadow-") as tmp:
        # the device the task was given: accelerate takes any GPU it sees, and Ray 2.60 shows a worker that asked
        # for none (resources.num_gpus=0) the node's GPUs, which shadows then trained on side by side unreserved
        device = resolve_device(cfg.resources.device)
        out = train(TrainConfig(arch=ArchConfig(**arch), data=data, trainer=TrainerConfig(**trainer),
                                output=str(Path(tmp) / "model")), cpu=device == "cpu",
                    copies_recipe=True)  # the target's recipe, as it was trained
        for f in sorted(p for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts):
            layout.store.write_bytes(layout.store.join(layout.shadow_model(index), str(f.relative_to(out))),
                                     f.read_bytes())
        scorer = MiaScorer(load_model(str(out), device=device), cfg.mia)
        # mia.images_per_unit at a time, as the target's units: score_rows decodes its rows at their stored size,
        # and the whole set at once was ~7.9 GB a shadow task at 10k 512 px images (each image's noise is seeded
        # by its id, so the losses are the same)
        parts = [score_rows(scorer, read_image_rows(layout.store, path, a, a + step), ["loss"], cfg.storage.options,
                            alpha_of(cfg)) for a in range(0, images.num_rows, step)]
        scores = pa.concat_tables([t for t, _ in parts])
        meta = {k: sum(m[k] for _, m in parts) for k in parts[0][1]}
    table = pa.table({"shadow": pa.array([index] * images.num_rows, pa.int32()), "image_id": images["image_id"],
                      "in_training": pa.array(inside), "loss": scores["loss"]}, schema=MIA_SHADOW_SCHEMA)
    return table, {**meta, "training_steps": trainer["steps"], "examples": examples}


def copy_name(image_id: str, k: int) -> str:
    """The id of copy k of an image in a shadow's training data (shadow_data/): the image's own id, then
    <id>#<k>, as memex train names a duplication schedule's copies."""
    return image_id if k == 0 else f"{image_id}#{k}"


def repeated_pictures(pixels: dict[str, str] | None, ids: list[str], member: list[bool | None]) -> set[str]:
    """The ids whose stored pixels another image holds (pixels: pixels.json, {id: its pixels' sha256}): a
    questioned image with a member's exact pixels ("is my re-saved picture in there?"), or another query's. A
    shadow trains each picture once, on its labelled image's rows (with their copies), else its first query's:
    the member's row and the query's gave an in-shadow the picture twice where the target trained on it once.
    They take that image's split (split_groups), so it is in every half they are. None (a folder scored before
    pixels.json was kept, read as a library): none."""
    if not pixels:
        return set()
    first: dict[str, str] = {}
    # labelled first (two labelled images never share pixels: one_row_per_picture merged a set's, and a
    # non-member with a member's is refused)
    for i, _ in sorted(zip(ids, member), key=lambda r: r[1] is None):
        if i in pixels:
            first.setdefault(pixels[i], i)
    return {i for i in ids if i in pixels and first[pixels[i]] != i}


def check_copy_names(images: pa.Table) -> None:
    """No image is named as another image's extra copy in a shadow's training data (copy_name: <id>#<k>): a
    non-member `a#1` beside a member `a` of 2 copies gave the shadow data two rows `a#1`, and every shadow task
    failed in memex train ("ids are not unique") after the target was scored. Refused before, naming both."""
    ids, member, copies = (images[c].to_pylist() for c in ("image_id", "member", "copies"))
    hashed = {i: m for i, m in zip(ids, member) if "#" in i}
    if not hashed:  # (no id holds the separator: the usual case, and nothing to look up)
        return
    taken = [(n, i) for i, c in zip(ids, copies) for k in range(1, max(1, c or 1)) if (n := copy_name(i, k)) in hashed]
    if taken:
        n, i = taken[0]
        key = {True: "members", False: "nonmembers", None: "queries"}[hashed[n]]
        raise ConfigError(f"LiRA's shadow models train on each image's copies named <id>#<k>, and image {n} of "
                          f"{key}.path has the name of copy {n.rsplit('#', 1)[1]} of image {i} ({len(taken)} such "
                          f"ids): rename {'it' if len(taken) == 1 else 'them'} in {key}.path (no '#' in an id), "
                          "or set mia.shadow_models=0")


def shadow_seed(target_seed: int, index: int, steps: int) -> int:
    """trainer.seed of shadow model `index` (training `steps` steps): target_seed x 1000 + index + 1, what every
    shadow was seeded with before (a resumed folder's shadows keep theirs), where memex train takes it
    (training.seed_range); else 31 bits of a hash of (target seed, "shadow", index). A target trained with a
    millisecond timestamp as its seed (1.7e12, which memex train takes) gave its shadows 1.7e15, past the range:
    every shadow task failed with a ConfigError after the target was scored."""
    from memex.sampling import sample_seed
    from memex.training import seed_range

    lo, hi = seed_range(steps)
    seed = target_seed * 1000 + index + 1
    return seed if lo <= seed <= hi else sample_seed(target_seed, "shadow", index) % 2**31


def shadow_trainer(recipe: dict, index: int, steps: int) -> dict:
    """The trainer settings of shadow model `index`: the target's (memex_train.json), with the shadow's own seed
    (shadow_seed), its steps and one checkpoint at the end."""
    trainer = dict(recipe["trainer"], seed=shadow_seed(recipe["trainer"].get("seed", 0), index, steps))
    if ArchKind(recipe["arch"]["kind"]) == ArchKind.unconditional:  # a text key it never read: memex train
        trainer.pop("cond_dropout", None)  # now refuses it set
    trainer.update(steps=steps, warmup_steps=min(trainer.get("warmup_steps", 0), steps))
    trainer["checkpoint_every"] = trainer["steps"]  # one checkpoint: a retried task restarts the shadow
    return trainer


def check_shadow_seeds(recipe: dict, steps: dict[int, int]) -> None:
    """Every shadow's trainer.seed is one memex train takes at its steps (training.seed_range), before the target
    is scored: a seed out of range failed every shadow task, after the scoring, naming no shadow."""
    from memex.training import seed_range

    for s, n in steps.items():
        seed, (lo, hi) = shadow_trainer(recipe, s, n)["seed"], seed_range(n)
        if not lo <= seed <= hi:
            raise ConfigError(f"LiRA's shadow model {s} would train with trainer.seed={seed}, outside {lo}..{hi} at "
                              f"{n} steps (the target's memex_train.json seed is {recipe['trainer'].get('seed')}): "
                              "retrain the target with a seed in that range, or set mia.shadow_models=0")


def splits_of(ids: list[str], split_as: dict[str, str], n_shadows: int, seed: int) -> np.ndarray:
    """(S, N) bool: shadow s trains on image j (memex.mia.shadow_splits), where an image in `split_as` (a copy
    of another image: check_sets) takes that image's row."""
    from memex.mia import shadow_splits

    keys = [split_as.get(i, i) for i in ids]
    distinct = list(dict.fromkeys(keys))
    col = {k: c for c, k in enumerate(distinct)}
    return shadow_splits(distinct, n_shadows, seed)[:, [col[k] for k in keys]]


def check_halves(split: np.ndarray, pictures: int, seed: int) -> None:
    """Every shadow's half holds an image, or refuse naming the fix. Each picture is in a random half of the
    shadows, so a shadow is empty with probability 2^-pictures (3 pictures: 1 in 8; 30: 1e-9): memex train then
    failed on its empty data, after the target was scored. Refused, not redrawn: a picture's split depends on
    (mia.seed, its id) alone, as a resumed folder's shadows and check_trained_shadows expect, and a redraw would
    tie it to the other images."""
    empty = [s for s in range(split.shape[0]) if not split[s].any()]  # (S, N) of splits_of
    if empty:
        raise ConfigError(f"LiRA's shadow model {empty[0]} of {split.shape[0]} would train on none of the "
                          f"{pictures} pictures (each picture is in a random half of the shadows, drawn by "
                          f"mia.seed={seed}: with {pictures} a shadow is empty with probability 1 in "
                          f"{2 ** pictures:,}): give more images, another mia.seed, or fewer mia.shadow_models "
                          "(mia.shadow_models=0: the attacks without LiRA)")


def lira_variance(n_shadows: int) -> str:
    """How LiRA fits each side's spread: "global" (one for all images) below LIRA_GLOBAL_BELOW shadows, else
    "per-image"."""
    return "global" if n_shadows < LIRA_GLOBAL_BELOW else "per-image"


def shadow_losses(ids: list[str], shadows: pa.Table, n_shadows: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, N) raw losses (NaN where a shadow has none) and (S, N) in_training of shadows/ rows, columns in
    the order of `ids`."""
    col = {i: j for j, i in enumerate(ids)}
    losses, inside = np.full((n_shadows, len(ids)), np.nan), np.zeros((n_shadows, len(ids)), bool)
    for r in shadows.to_pylist():
        losses[r["shadow"], col[r["image_id"]]] = r["loss"]
        inside[r["shadow"], col[r["image_id"]]] = r["in_training"]
    return losses, inside


def lira(scores: pa.Table, shadows: pa.Table, n_shadows: int, layout: MiaLayout | None = None) -> pa.Table:
    """LiRA's scores from the target's losses and the shadows' (a shadow with a non-finite or missing loss is
    refused naming it, and with `layout` the files to delete: check_finite_shadows)."""
    from memex.mia import lira_offline, lira_online, lira_statistic

    ids = scores["image_id"].to_pylist()
    losses, inside = shadow_losses(ids, shadows, n_shadows)
    check_finite_shadows(losses, ids, layout)
    target = lira_statistic(scores["loss"].to_numpy(zero_copy_only=False))
    losses = lira_statistic(losses)
    pooled = lira_variance(n_shadows) == "global"
    return pa.table({"image_id": ids,
                     "lira_online": lira_online(target, losses, inside, global_variance=pooled).astype(np.float32),
                     "lira_offline": lira_offline(target, losses, inside, global_variance=pooled).astype(np.float32),
                     "shadows_in": inside.sum(0).astype(np.int32)}, schema=MIA_LIRA_SCHEMA)


# ---- 5. metrics ------------------------------------------------------------------------------
def metrics(raw: np.ndarray, labels: np.ndarray, attack: str) -> dict:
    from memex.mia_metrics import balanced_accuracy, member_score, roc_auc, tpr_at_fpr

    s = member_score(attack, raw)
    at1, at01 = tpr_at_fpr(s, labels, 0.01), tpr_at_fpr(s, labels, 0.001)
    # fpr_at_*: the FPR the threshold reached (<= the target; with 150 non-members "1%" is 1 of them, 0.67%)
    return {"auc": round(roc_auc(s, labels), 4), "tpr_at_1pct_fpr": round(at1.tpr, 4),
            "tpr_at_0.1pct_fpr": round(at01.tpr, 4), "resolved_1pct": at1.resolved,
            "resolved_0.1pct": at01.resolved, "fpr_at_1pct": round(at1.fpr, 6), "fpr_at_0.1pct": round(at01.fpr, 6),
            "balanced_accuracy": round(balanced_accuracy(s, labels), 4)}


def summarize(scores: pa.Table, lira_table: pa.Table | None, attacks: list[str]) -> dict:
    """Per attack: AUC, TPR at 1% and 0.1% FPR, balanced accuracy; AUC per number of copies."""
    from memex.mia_metrics import bh_q_values, member_score, roc_auc

    raw = {a: scores[a].to_numpy(zero_copy_only=False).astype(np.float64) for a in attacks}
    if lira_table is not None:
        order = {i: j for j, i in enumerate(lira_table["image_id"].to_pylist())}
        take = [order[i] for i in scores["image_id"].to_pylist()]
        raw.update({a: lira_table[a].to_numpy(zero_copy_only=False)[take].astype(np.float64) for a in LIRA})
    known = pc.is_valid(scores["member"]).to_numpy(zero_copy_only=False)
    queries = {"ids": [i for i, k in zip(scores["image_id"].to_pylist(), known) if not k]}
    labels = scores["member"].to_numpy(zero_copy_only=False)[known].astype(bool)
    qv = {}
    for a, v in raw.items():  # a query's p-value: the share of non-members scoring at least as member-like
        s = member_score(a, v)
        if not np.isfinite(s[~known]).all():  # searchsorted puts NaN above every non-member: the smallest p
            bad = queries["ids"][int(np.flatnonzero(~np.isfinite(s[~known]))[0])]
            raise ModelError(f"query image {bad} has a non-finite {a} score: the model's output is not finite there "
                             "(check the checkpoint), and its p-value would read as the strongest evidence")
        non = np.sort(s[known][~labels])
        p = (1 + len(non) - np.searchsorted(non, s[~known], "left")) / (1 + len(non))
        # 4 significant figures, not 4 decimals: past 20,000 non-members the smallest p-value, 1/(n0+1), was
        # stored as 0.0 (docs/method.md: at least 1/(n0+1))
        queries[a] = [float(f"{x:.4g}") for x in p]
        qv[a] = [float(f"{x:.4g}") for x in bh_q_values(p)]  # over the queries: many questioned, some small by chance
    raw = {a: v[known] for a, v in raw.items()}
    out = {"attacks": {a: metrics(v, labels, a) for a, v in raw.items()}, "by_copies": {},
           "queries": [{"image_id": i, "p_value": {a: queries[a][j] for a in raw},
                        "q_value": {a: qv[a][j] for a in raw}} for j, i in enumerate(queries["ids"])]}
    copies = [c for c, k in zip(scores["copies"].to_pylist(), known) if k]
    # a plain manifest's copies are known only where one_row_per_picture merged rows holding one picture (their
    # count); its other members are then single copies (else by_copies read "2" and no "1"). A `memex train`
    # manifest gives every member's copies; a set with none known has no by_copies
    if any(c is not None for c, m in zip(copies, labels) if m):
        copies = [1 if c is None else c for c in copies]
    for c in sorted({c for c, m in zip(copies, labels) if m and c is not None}):
        keep = np.array([(not m) or cc == c for cc, m in zip(copies, labels)])
        out["by_copies"][str(c)] = {"members": int((labels & keep).sum()),
                                    "auc": {a: round(roc_auc(member_score(a, v[keep]), labels[keep]), 4)
                                            for a, v in raw.items()}}
    return out


# ---- driver ----------------------------------------------------------------------------------
def run(cfg: MiaConfig) -> dict:
    t0 = time.perf_counter()
    opts = cfg.storage.options
    # 1. inputs, each failing in seconds naming the key to fix
    validate_mia(cfg)
    # resources.device=cuda with Ray actors given no GPU: refused before any work, as the other commands do (it
    # claimed the folder, wrote images.parquet, then failed in every actor); the attacks score in float32
    check_actor_devices(cfg.resources, DType.float32)
    from memex.mia import check_settings

    cfg = with_preprocess(cfg)
    check_settings(cfg.mia)
    check_demo_nonmembers(cfg)
    check_alpha(cfg)
    check_model_inputs(cfg.model.path, cfg.model.unet, cfg.model.allow_pickle, cfg.model.revision, cfg.model.variant,
                       cfg.model.lora, cfg.model.text_encoder)
    # the scheduler's own timesteps: a 100-step `memex train` model and the default mia.pia_timestep=200 failed
    # in the actors, after the folder was claimed and images.parquet written
    check_settings(cfg.mia, scheduler_timesteps(cfg.model.path, cfg.model.revision))
    recipe = shadow_recipe(cfg.model.path) if cfg.mia.shadow_models else None
    sets = [("members", True), ("nonmembers", False)] + ([("queries", None)] if cfg.queries.path else [])
    for n, _ in sets:
        check_outside("storage.root", cfg.storage.root, f"{n}.path", getattr(cfg, n).path, opts)
    images = pa.concat_tables([t for _, t in distinct_folder_ids(
        [(n, read_image_set(getattr(cfg, n).path, getattr(cfg, n).caption_column, member, opts, f"{n}.path"))
         for n, member in sets])])
    images, quarantine, split_as, pixels = check_sets(
        images, opts, generated_channels(cfg.model.path, cfg.model.unet, cfg.model.revision) == 1, cfg.mia.preprocess,
        alpha_of(cfg))
    if is_text_model(cfg.model.path) and images.filter(pc.is_null(images["caption"])).num_rows:
        first = images.filter(pc.is_null(images["caption"])).slice(0, 1).to_pylist()[0]
        key = {True: "members", False: "nonmembers", None: "queries"}[first["member"]]
        raise ConfigError(f"{cfg.model.path} is a text-conditional model and image {first['image_id']} of {key}.path "
                          f"has no caption: set {key}.caption_column to the column that holds its captions")

    if recipe is not None:  # LiRA's halves, before the folder is claimed: the fix (another mia.seed) is a new setting
        ids = images["image_id"].to_pylist()
        check_halves(splits_of(ids, split_as, cfg.mia.shadow_models, cfg.mia.seed),
                     len({split_as.get(i, i) for i in ids}), cfg.mia.seed)

    # 2. the folder: same settings and weights resume, others are refused
    weights = model_weights_sha256(cfg.model.path, cfg.model.unet, cfg.model.lora, cfg.model.text_encoder,
                                   cfg.model.variant)
    digest = hashlib.sha256()
    for r in images.select(["image_id", "member", "caption", "copies"]).to_pylist():
        digest.update(json.dumps(r, sort_keys=True).encode())
    settings = redact({"model": model_identity(cfg.model),
                       # mia.alpha unset is left out: the folders written before it resume
                       "mia": drop_unset_added({"mia": plain(cfg.mia)})["mia"], "images_sha256": digest.hexdigest(),
                       "members": cfg.members.path, "nonmembers": cfg.nonmembers.path, "queries": cfg.queries.path})
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    name = cfg.run.name or f"mia-{cfg.model.name}-{key}"
    layout = MiaLayout(cfg.storage.root, name, opts)
    layout.store.check_writable("mia folder", "storage.root and storage.options (endpoint_url, credentials)")
    runner.init(cfg.resources, cfg.storage)
    with hold(layout.store, cfg.storage, f"mia folder {layout.uri}"):
        # a killed run's writes: a shadow's weights cut short (up to a model each kill), its data, the folder's files
        layout.store.sweep_temp("", deep=True)
        layout.store.claim(layout.run_json, settings, f"mia folder {layout.uri}",
                           "Use another run.name (or storage.root) for a new experiment.")
        claim_weights(layout.store, layout.weights_json, weights, f"mia folder {layout.uri}", weight_keys(cfg.model))
        check_pixels(layout, pixels)
        if not layout.store.exists(layout.images_path):  # quarantine first: images.parquet decides this branch
            layout.store.write_table(layout.quarantine_path, quarantine)
            # a unit's rows are one row group: each actor and shadow task reads only the groups it scores
            layout.store.write_table(layout.images_path, images, row_group_size=cfg.mia.images_per_unit)
        else:
            regroup_images(layout, cfg.mia.images_per_unit)
        summary = _score_and_measure(cfg, name, layout, images, recipe, split_as)
        near = int(pc.sum(pc.cast(pc.starts_with(quarantine["reason"], NEAR_COPY_REASON), pa.int64())).as_py()
                   or 0)
        summary.update({"run": layout.run.uri, "model": cfg.model.path, "quarantined": quarantine.num_rows,
                        "nonmembers_near_copies": near,
                        "seconds": round(time.perf_counter() - t0, 1), "settings": settings})
        layout.store.write_json(layout.summary_path, summary)
        summary["report"] = _report(layout, opts)
    return summary


def _score_and_measure(cfg: MiaConfig, name: str, layout: MiaLayout, images: pa.Table, recipe: dict | None,
                       split_as: dict[str, str] | None = None) -> dict:
    # LiRA's shadows planned (halves, steps, seeds) and checked against those trained before, before the target is
    # scored: a shadow that cannot train (a seed out of range) failed each task only once the scoring was done
    tasks: dict[int, dict] = {}
    if recipe is not None:
        ids = images["image_id"].to_pylist()
        split = splits_of(ids, split_as or {}, cfg.mia.shadow_models, cfg.mia.seed)
        repeated = repeated_pictures(layout.store.read_json(layout.pixels_path), ids, images["member"].to_pylist())
        # a picture's copies are rows, and a picture another image holds trains on that image's (repeated_pictures)
        rows = np.array([0 if i in repeated else max(1, c or 1) for i, c in zip(ids, images["copies"].to_pylist())])
        half = [int(rows[split[s]].sum()) for s in range(cfg.mia.shadow_models)]
        warn_small_shadows(recipe, half, cfg.mia.shadow_steps)
        warn_missing_copies(recipe, images)
        check_copy_names(images)
        tasks = {s: {"inside": split[s].tolist(), "steps": shadow_steps(recipe, half[s], cfg.mia.shadow_steps)}
                 for s in range(cfg.mia.shadow_models)}
        check_shadow_seeds(recipe, {s: t["steps"] for s, t in tasks.items()})
        check_trained_shadows(layout.shadows, {s: t["steps"] for s, t in tasks.items()},
                              {s: dict(zip(ids, t["inside"])) for s, t in tasks.items()})

    # 3. scores on the actor pool
    n, per = images.num_rows, cfg.mia.images_per_unit
    units = {i: {"start": s, "stop": min(s + per, n)} for i, s in enumerate(range(0, n, per))}
    runner.run_actor_pool(layout.scores, units, ScoreImages, {"cfg": cfg, "run_name": name}, cfg.resources)
    scores = layout.scores.read().sort_by("image_id")
    evals = sum(layout.scores.read_marker(i).get("unet_evaluations", 0) for i in units)
    attacks = [a.value for a in cfg.mia.attacks]
    check_finite(scores, attacks, cfg.model.path)

    # 4. LiRA: shadow models, one task each (resumed per shadow by its marker)
    lira_table = None
    if recipe is not None:
        runner.run_tasks(layout.shadows, tasks, train_and_score_shadow, cfg.resources, cfg=cfg, run_name=name,
                         recipe=recipe)
        evals += sum(layout.shadows.read_marker(s).get("unet_evaluations", 0) for s in tasks)
        lira_table = lira(scores, layout.shadows.read(), cfg.mia.shadow_models, layout)
        layout.store.write_table(layout.lira_path, lira_table)

    # 5. metrics
    out = summarize(scores, lira_table, attacks)
    members = int(pc.sum(pc.cast(pc.equal(scores["member"], True), pa.int64())).as_py() or 0)
    nonmembers = int(pc.sum(pc.cast(pc.equal(scores["member"], False), pa.int64())).as_py() or 0)
    for a, m in out["attacks"].items():
        calls = {"loss": cfg.mia.draws, "pia": 2, "secmi": cfg.mia.secmi_k + 2}
        m["unet_evaluations_per_image"] = (calls[a] if a in calls else
                                           cfg.mia.draws * (cfg.mia.shadow_models + 1))  # LiRA: the loss, S + 1 models
    return {"members": members, "nonmembers": nonmembers, "shadow_models": cfg.mia.shadow_models,
            **({"lira_variance": lira_variance(cfg.mia.shadow_models), "lira_statistic": "log loss",
                "shadow_training_steps": [t["steps"] for t in tasks.values()]} if lira_table is not None else {}),
            "unet_evaluations": int(evals), **out}


def _report(layout: MiaLayout, opts: dict) -> str | None:
    try:
        from memex.mia_report import build_mia_report
    except ImportError:  # the page's module is optional for the numbers
        return None
    return build_mia_report(layout.run.uri, opts)


def format_summary(s: dict) -> str:
    lines = [f"memex mia: {s['model']}",
             f"  {s['members']} members, {s['nonmembers']} non-members ({s['quarantined']} quarantined), "
             f"{s['unet_evaluations']} UNet evaluations" + (f", {s['shadow_models']} shadow models"
                                                            if s["shadow_models"] else ""),
             f"  {'attack':<13} {'AUC':>6} {'TPR@1%':>7} {'TPR@0.1%':>9} {'bal.acc':>8}"]
    for a, m in s["attacks"].items():
        flag = lambda k: "" if m[f"resolved_{k}"] else "*"  # noqa: E731
        lines.append(f"  {a:<13} {m['auc']:>6.3f} {m['tpr_at_1pct_fpr']:>6.3f}{flag('1pct'):1} "
                     f"{m['tpr_at_0.1pct_fpr']:>8.3f}{flag('0.1pct'):1} {m['balanced_accuracy']:>8.3f}")
    if any(not m["resolved_0.1pct"] for m in s["attacks"].values()):
        lines.append(f"  * fewer non-members than 1/FPR: only FPR 0 measurable ({s['nonmembers']} non-members)")
    from memex.mia_metrics import p_text  # 3 significant figures below 0.01: 3.33e-05 read 0.000

    for q in s.get("queries", [])[:20]:
        lines.append(f"  query {q['image_id']}: p-value " + ", ".join(f"{a} {p_text(v)}" for a, v in
                                                                      q["p_value"].items())
                     + "  (share of non-members scoring at least as member-like)")
        if len(s["queries"]) > 1 and q.get("q_value"):
            lines.append(f"  {'':>{len(str(q['image_id'])) + 7}} q-value " + ", ".join(
                f"{a} {p_text(v)}" for a, v in q["q_value"].items()) + "  (Benjamini-Hochberg over the queries)")
    for c, b in s.get("by_copies", {}).items():
        lines.append(f"  members with {c} {'copy' if c == '1' else 'copies'} ({b['members']}): AUC " +
                     ", ".join(f"{a} {v:.3f}" for a, v in b["auc"].items()))
    if s.get("report"):
        lines.append(f"  report: {s['report']}")
    lines.append(f"  folder: {s['run'].rstrip('/')}/mia")
    return "\n".join(lines)
