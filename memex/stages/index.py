"""Index stage: training set -> S FAISS shards on storage (+ near-duplicate counts).

    run(cfg) -> IndexInfo    build the index of cfg.trainset, or reuse the one an earlier audit built

The one stage that takes no run name: its folder `<index root>/<key>/` is keyed by content (the
training-set listing, the embedder and the index settings), so every audit of checkpoints trained
on the same data shares it. Its steps are units of memex/runner.py, like every stage's:
  1. list the training set (memex/ingest.py: with each file's size + ETag/mtime) and hash it with
     the settings into the key (an image overwritten in place: a new key, a new index);
  2. write train_rows.parquet + train.pack (memex/train_rows.py; gid = row number, the global id
     every shard and every match uses);
  3. IVF-PQ only: `train_quantizer`, one unit: a coarse quantizer + PQ codebook trained on a sample
     of the whole training set (evenly spaced row groups, index.train_size rows), which every shard copies;
  4. `build_shard`, one unit per shard: decode its gid range (unreadable images go to the shard's
     quarantine table), embed, build the FAISS shard, write shard + vectors + quarantine;
  5. `count_duplicates`, one unit per shard: near-duplicate counts of its images, searched in all
     shards (the same index the match stage uses); they rank "most duplicated captions first".
Units are plain Ray tasks, not Ray Data: a unit is one function call that writes named files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import time
import zipfile
from dataclasses import replace
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memex import runner, train_rows
from memex.config import AuditConfig, EmbedderConfig, IndexConfig, IndexKind, alpha_name, drop_unset_added, plain
from memex.images import PAD_VALUE
from memex.layout import (
    DUPS_SCHEMA,
    LINKS_SCHEMA,
    PICTURES_SCHEMA,
    QUARANTINE_SCHEMA,
    SHARD_LISTINGS,
    TRAIN_SCHEMA,
    IndexLayout,
    StorageError,
)
from memex.lease import hold
from memex.membership import IndexInfo, fetch_train_rows, load_shards
from memex.models import resolve_device
from memex.redact import redact
from memex.storage import Store, damaged, unit_name

if TYPE_CHECKING:
    from memex.index import IndexSpec

log = logging.getLogger("memex.index")
# Part of every index key: folders written by an older layout are never resumed into, only rebuilt.
# 4: quarantine files in quarantine/ (were shards/quarantine-*.parquet, beside the FAISS files)
# Not bumped when JPEGs began to be decoded at a reduced DCT scale (ingest.DRAFT_MIN_SIDE): an index
# built before differs by <= 0.001 RMS a picture in pixels (bench/RESULTS.md, JPEG decode), and a new
# key would rebuild every index and stop every run folder rerun (its matches/ keep the key).
# 5: pictures are connected components of the near-duplicate edges (links/, pictures.parquet); dups/ lost
#    its per-row `picture`, each row's smallest direct neighbour, which split chains a ~ b ~ c in two
LAYOUT_VERSION = 5
QUANTIZER_GROUPS = 1024  # row groups of train_rows.parquet the IVF-PQ sample is drawn from, at least (quantizer_sample)


def alpha_of(cfg: AuditConfig) -> str:
    """trainset.alpha as images.decode takes it (unset: "white")."""
    return alpha_name(cfg.trainset.alpha)


def index_key(listing: pa.Table, cfg: AuditConfig, luma: bool = False, aspect: tuple[int, int] | None = None,
              root_in_key: bool = False) -> str:
    """Hash of what decides the index content: the listing (ids, uris, captions and each image's
    content: a hash of its bytes, or its file's stamp, size + ETag or mtime, from the listing of
    memex/ingest.py), embedder, index settings and how training images are fitted to the
    embedder's input (trainset.preprocess).

    An image overwritten in place changes the key, and the whole index is rebuilt in a new folder.
    Reusing the shards whose rows did not change was weighed and left out, as neither simple nor
    often useful: gids are row numbers of the listing, so one added or removed file shifts
    the range of every later shard; the IVF-PQ quantizer is trained on a sample of all shards, and
    every shard copies it; near-duplicate counts (dups/) search all shards, so they are all redone
    anyway; and it would need a way to find the earlier folder of the same settings. Only an
    in-place overwrite in a flat index would gain (the unchanged shards' decode + embed).

    index.root is where the folder lies, not what it holds: it is hashed as unset, so an index copied to
    another root is found there. `root_in_key`: the key as memex made it before (index.root as given),
    which index.run falls back to for an index built then (earlier_key)."""
    from memex.ingest import IMAGE_SHA256, image_digests, in_order

    # in id order, whatever the listing's (a streamed manifest's is the manifest's own: its gids
    # follow it), so one training set has one key however it was read
    order = pc.sort_indices(listing["id"])
    if not in_order(order):
        listing = listing.take(order)  # only a streamed listing gets here: it holds no image bytes
    h = hashlib.sha256(f"layout {LAYOUT_VERSION}".encode())
    for col in ("id", "uri", "caption"):
        h.update(json.dumps(listing[col].to_pylist()).encode())
    # each image's sha256: a changed image changes the key (a streamed listing made them as it read)
    digests = listing[IMAGE_SHA256] if IMAGE_SHA256 in listing.column_names else image_digests(listing["image"])
    for d in digests.to_pylist():
        h.update(d)
    stamps = listing["stamp"]  # size + ETag/mtime of each uri's file: an overwritten file changes the key
    if stamps.null_count < len(stamps):  # none (all images as bytes, hashed above): nothing to add
        h.update(json.dumps(stamps.to_pylist()).encode())
    # index.train_size unset: left out, so every index built before it keeps its key (an IVF-PQ one built
    # by older code, on 65,536 random rows, is reused as it is: its runs, prompts and names stay theirs)
    # embedder.batch_size and index.decode_batch stay in: a learned embedder's (sscd, clip) float bits depend on
    # its batch shape, as sampling.batch_size's do a generation's (memex/stages/generate.py); lowering one after
    # an out-of-memory re-embeds the set. nprobe and refine_k decide the ivfpq near-duplicate counts (dups/).
    index = drop_unset_added({"index": {**plain(cfg.index), **({} if root_in_key else {"root": None})}})["index"]
    h.update(json.dumps({"embedder": plain(cfg.embedder), "index": index,
                         "preprocess": cfg.trainset.preprocess.value}, sort_keys=True).encode())
    if luma:  # added only when set: the colour indexes built before it keep their keys
        h.update(b"luma")
    if alpha_of(cfg) != "white":  # likewise: trainset.alpha=drop reads other pixels from transparent images
        h.update(f"alpha {alpha_of(cfg)}".encode())
    if aspect is not None:  # likewise: square generations' indexes keep theirs
        h.update(f"aspect {aspect[0]}:{aspect[1]}".encode())
    if cfg.trainset.preprocess.value == "pad":  # the borders were black before: such an index is not reused
        h.update(f"pad {PAD_VALUE}".encode())
    return h.hexdigest()[:16]


def plan_index_shards(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous gid ranges of near-equal size (at least one row each)."""
    shards = max(1, min(shards, n))
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


# ---- unit functions (plain functions: run in Ray tasks by the runner, testable without one) ------
def _embed_rows(batches: Iterable[pa.Table], emb: EmbedderConfig, embedder, storage_options: dict, preprocess: str,
                luma: bool = False, aspect: tuple[int, int] | None = None, alpha: str = "white",
                version: str | None = None):
    """Decode, fit to the embedder's square input (trainset.preprocess) and embed training rows a
    batch (index.decode_batch rows) at a time -> (vectors (n, d), gids (n,), quarantine tables).
    luma: each image's ITU-R 601 luma in its three channels, as a grayscale model's generation (an
    "L" PNG, decoded to RGB) reproduces it. Searched in a colour index, an exact luma copy of a
    demo logo ranked its source first for 70% of the logos, in the top 10 for 93%: the rest were
    never verified. aspect (height, width): the generations', when not square (images.fit). version: the
    index's URI, whose key hashes the listing's stamps: a tar shard rewritten since is scanned again
    (ingest.row_bytes; train.parquet's rows carry no stamp of their own)."""
    from memex.images import luma_rgb
    from memex.ingest import decode_rows

    vecs, gids, quarantine = [], [], []
    for part in batches:  # bounded memory: one batch of encoded and decoded images at a time
        dec = decode_rows(part, emb.size, storage_options, preprocess=preprocess, aspect=aspect, alpha=alpha,
                          version=version)
        quarantine.append(dec.quarantine)
        if dec.ids:
            gid_of = dict(zip(part["id"].to_pylist(), part["gid"].to_pylist()))
            images = np.stack([luma_rgb(im) for im in dec.images]) if luma else dec.images
            vecs.append(embedder(images))
            gids.extend(gid_of[i] for i in dec.ids)
    x = np.concatenate(vecs) if vecs else np.zeros((0, embedder.dim), np.float32)
    return x, np.asarray(gids, np.int64), quarantine


def _embedder(emb: EmbedderConfig, device: str, storage_options: dict):
    from memex.embed import make_embedder

    # storage.options reach an embedder.path on object storage too, like every URI the job reads
    return make_embedder(emb, resolve_device(device), storage_options)


def quantizer_sample(layout: IndexLayout, n_train: int, size: int, seed: int = 0,
                     min_groups: int = QUANTIZER_GROUPS) -> np.ndarray:
    """Sorted gids of `size` training rows for IVF-PQ's k-means, from a systematic sample of train_rows.parquet's
    row groups (evenly spaced from a random start: max(min_groups, the groups `size` rows fill) of them, or
    all), `size` rows drawn at random among theirs. Random rows reached nearly every row group, each read
    whole: 65,536 rows of 5M in groups of 512 read 99.9% of the file (~200 GB at ~40 KB an image) before
    any shard could start. Evenly spaced groups keep the sample spread over a training set in id order
    (an image folder's ids are its paths: one class after another), which a few whole groups were not:
    1,024 groups of a 1.28M-image ImageNet folder meet every one of its 1,000 classes, for ~1/10 of it read.
    A WebDataset set's sampled images (not in train.pack) are ranged reads at the offsets its kept shard listings
    record (memex/shards.py kept_offsets); listings kept before they held offsets scan every shard the sample meets."""
    if size >= n_train:
        return np.arange(n_train, dtype=np.int64)
    rng = np.random.default_rng(seed)
    md = train_rows.open_table(layout, train_rows.table_path(layout)[0]).metadata
    col = md.schema.to_arrow_schema().get_field_index("gid")
    spans = []
    for i in range(md.num_row_groups):
        st = md.row_group(i).column(col).statistics
        if st is None or not st.has_min_max:  # no statistics (not memex's writer): random rows
            return np.sort(rng.choice(n_train, size, replace=False))
        spans.append((st.min, st.max + 1))
    per_group = n_train / len(spans)
    g = min(len(spans), max(min_groups, math.ceil(size / per_group)))
    start = rng.uniform(0, len(spans) / g)
    chosen = np.unique(np.floor(start + np.arange(g) * len(spans) / g).astype(int))
    rows = np.concatenate([np.arange(*spans[k], dtype=np.int64) for k in chosen])
    return np.sort(rng.choice(rows, min(size, len(rows)), replace=False))


def train_quantizer(unit: int, layout: IndexLayout, n_train: int, emb: EmbedderConfig, idx: IndexConfig,
                    device: str, preprocess: str, luma: bool = False, aspect: tuple[int, int] | None = None,
                    alpha: str = "white") -> dict:
    """IVF-PQ only: train one coarse quantizer + PQ codebook on a fixed random sample of the whole
    training set, so every shard shares it (memex/index.py train_index)."""
    from memex.index import IndexSpec, save_index, train_index

    opts = layout.store.options
    embedder = _embedder(emb, device, opts)
    spec = IndexSpec.from_config(idx, embedder.metric)
    pick = quantizer_sample(layout, n_train, spec.train_size)
    rows = train_rows.read_range(layout, int(pick[0]), int(pick[-1]) + 1, idx.decode_batch, gids=pick)
    x, _, quarantine = _embed_rows(rows, emb, embedder, opts, preprocess, luma, aspect, alpha, layout.uri)
    check_quantizer_sample(len(x), len(pick), quarantine, spec, layout)
    save_index(train_index(x, spec), layout.store.uri_of(layout.quantizer_path), opts)
    return {"vectors": int(len(x))}


def check_quantizer_sample(n_read: int, n_sampled: int, quarantine: list[pa.Table], spec: IndexSpec,
                           layout: IndexLayout, shown: int = 3) -> None:
    """Too few of the sampled images read to train IVF-PQ: a StorageError naming how many were quarantined and
    the first reasons, as a flat index's "no training image could be read". The sample's quarantine was
    dropped and train_index said "got 0 training vectors: lower index.nlist", a setting that was never the
    fault (a moved image folder, unreadable files). check_spec has seen that the set itself has enough rows."""
    need = max(spec.nlist, 2 ** spec.pq_nbits)
    bad = (pa.concat_tables([t.cast(QUARANTINE_SCHEMA) for t in quarantine]) if quarantine
           else QUARANTINE_SCHEMA.empty_table())
    if n_read >= need or not bad.num_rows:
        return
    rows = bad.slice(0, shown).to_pylist()  # no quarantine/ file yet: the shards, which write it, come after
    reasons = "; ".join(f"{r['id']} ({r['uri'] or 'image bytes'}): {(r['reason'] or '')[:200]}" for r in rows)
    what = "no training image" if not n_read else f"only {n_read} of the {n_sampled} training images"
    raise StorageError(
        f"{what} sampled to train the IVF-PQ quantizer of index {layout.uri} could be read ({bad.num_rows} "
        f"quarantined; the first {len(rows)} reasons: {reasons}), and it needs at least max(index.nlist, "
        f"2**index.pq_nbits) = {need}. Fix what the reasons name (the images, trainset.path or storage.options)"
        + ("" if not n_read else "; if these are all the readable images, lower index.nlist / index.pq_nbits "
           "or use index=flat") + ".")


def build_shard(shard: int, layout: IndexLayout, start: int, stop: int, emb: EmbedderConfig, idx: IndexConfig,
                device: str, preprocess: str, luma: bool = False, aspect: tuple[int, int] | None = None,
                alpha: str = "white") -> dict:
    """Shard `shard` = training rows [start, stop): FAISS shard, its vectors, its quarantine."""
    from memex.index import IndexSpec, load_index, save_index
    from memex.index import build_shard as build_faiss_shard

    opts, store = layout.store.options, layout.store
    embedder = _embedder(emb, device, opts)
    rows = train_rows.read_range(layout, start, stop, idx.decode_batch)
    x, ids, quarantine = _embed_rows(rows, emb, embedder, opts, preprocess, luma, aspect, alpha, layout.uri)
    trained = load_index(store.uri_of(layout.quantizer_path), opts) if idx.kind == IndexKind.ivfpq else None
    index = build_faiss_shard(x, ids, IndexSpec.from_config(idx, embedder.metric), trained=trained)
    save_index(index, store.uri_of(layout.faiss_path(shard)), opts)
    write_vectors(layout, shard, x, ids)
    q = (pa.concat_tables([t.cast(QUARANTINE_SCHEMA) for t in quarantine]) if quarantine
         else QUARANTINE_SCHEMA.empty_table())
    store.write_table(layout.quarantine_path(shard), q)
    return {"shard": shard, "start": start, "stop": stop, "indexed": int(len(ids)), "quarantined": q.num_rows,
            "dim": embedder.dim, "metric": embedder.metric}


def count_duplicates(shard: int, layout: IndexLayout, n_shards: int, idx: IndexConfig, metric: str) -> pa.Table:
    """Near-duplicate count of each image of `shard` among all shards -> DUPS_SCHEMA rows; the edges found,
    as a forest, go to links/ first (joined into pictures by `write_pictures` once every unit is done)."""
    from functools import partial

    from memex.index import Components, IndexSpec, ShardedIndex, near_duplicates, resolve_dup_threshold

    threshold = resolve_dup_threshold(idx.dup_threshold, metric)  # None: the metric's default; checked first
    x, gids = read_vectors(layout, shard)
    spec, counts, joined = IndexSpec.from_config(idx, metric), np.zeros(len(gids), np.int64), Components()
    # one index shard in memory at a time: counts within the threshold add up over disjoint shards, and
    # the edges' forests join. All shards at once held the whole index in every dups task (IVF-PQ with
    # RFlat keeps the float vectors: 15 GB for 5M CLIP rows, in each of the tasks a node runs at once)
    for s in range(n_shards if len(gids) else 0):
        index = ShardedIndex(load_shards(layout, [s]), spec)
        # exact counts: top dup_k first, then range counts for the images with more near-duplicates than that
        c, found = near_duplicates(index.search, x, gids, threshold, metric=metric, k=idx.dup_k,
                                   range_fn=partial(index.range_neighbors, start_k=2 * idx.dup_k))
        counts += c
        joined.add(found[:, 0], found[:, 1])
        del index
    links = joined.pairs() if len(gids) else np.zeros((0, 2), np.int64)
    layout.store.write_table(layout.links_path(shard), pa.table({"gid": links[:, 0], "root": links[:, 1]},
                                                                schema=LINKS_SCHEMA))
    train = fetch_train_rows(layout, gids.tolist(), columns=["gid", "id", "caption"])
    meta = {g: (i, c) for g, i, c in zip(*(train[n].to_pylist() for n in ("gid", "id", "caption")))}
    return pa.table({"gid": gids, "id": [meta[g][0] for g in gids.tolist()],
                     "caption": [meta[g][1] for g in gids.tolist()], "near_duplicates": counts.astype(np.int32)},
                    schema=DUPS_SCHEMA)


def write_pictures(layout: IndexLayout, n_shards: int) -> int:
    """Join every dups unit's links into pictures (connected components over all shards: a chain of
    near-duplicates a ~ b ~ c is one picture however its rows fall into shards) -> pictures.parquet.
    Returns how many rows belong to a picture of 2+ rows. In the driver: the links are about one pair per
    duplicated row (1M rows, a third duplicated: ~5 MB)."""
    from memex.index import Components

    joined = Components()
    for s in range(n_shards):
        path = layout.links_path(s)
        try:
            t = layout.store.read_table(path, schema=LINKS_SCHEMA)
        except StorageError as e:  # "not readable Parquet ... remove it and its marker": name the marker
            raise StorageError(f"{e} These near-duplicate links are written by dups unit {s}: its marker is "
                               f"{layout.store.uri_of(layout.dups.marker(s))}.") from e
        joined.add(t["gid"].to_numpy(), t["root"].to_numpy())
    pairs = joined.pairs()
    roots = np.unique(pairs[:, 1])  # the roots are rows of their pictures too
    gids, pictures = np.concatenate([pairs[:, 0], roots]), np.concatenate([pairs[:, 1], roots])
    order = np.argsort(gids)
    ids = fetch_train_rows(layout, gids.tolist(), columns=["gid", "id"]).sort_by("gid")
    table = pa.table({"gid": gids[order], "id": ids["id"], "picture": pictures[order]}, schema=PICTURES_SCHEMA)
    layout.store.write_table(layout.pictures_path, table)
    return table.num_rows


def write_vectors(layout: IndexLayout, shard: int, x: np.ndarray, gids: np.ndarray) -> None:
    """A shard's vectors and gids beside its FAISS file (.npz, for the near-duplicate pass), streamed into
    the file: through a BytesIO they were held twice more (savez's buffer, then getvalue's copy), 3 x 3.8
    GB beside the index's own copy for 1.25M CLIP vectors (a quarter of 5M rows)."""
    store = layout.store
    with store.atomic(layout.vectors_path(shard)) as tmp, store.fs.open(tmp, "wb") as f:
        np.savez(f, vectors=x, gids=gids)


def read_vectors(layout: IndexLayout, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, gids) a shards unit kept beside its FAISS file; a damaged or lost file is named."""
    path = layout.vectors_path(shard)
    try:  # read from the file, not from its bytes held whole (2x the vectors at the peak)
        with layout.store.fs.open(path, "rb") as f, np.load(f) as z:
            return z["vectors"], z["gids"]
    except (FileNotFoundError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        # its shards unit's marker too: the file alone removed, the unit stayed complete and nothing wrote it again
        raise StorageError(damaged(layout.store.uri_of(path), "vectors (.npz)", e,
                                   [layout.store.uri_of(layout.shards.marker(shard))])) from e


# ---- driver ------------------------------------------------------------------------------
def run(cfg: AuditConfig, luma: bool = False, aspect: tuple[int, int] | None = None) -> IndexInfo:
    """Build (or reuse) the index of cfg.trainset; returns where it is and its counts. luma: of the
    training images' luma, for a grayscale model's audit; aspect (height, width, reduced): the
    generations' when not square, each training image cut to it first (`_embed_rows`, images.fit).
    Each gives the index a key of its own."""
    if aspect is not None:
        g = math.gcd(*aspect)
        aspect = None if aspect[0] == aspect[1] else (aspect[0] // g, aspect[1] // g)
    from memex.ingest import list_training_set

    opts = cfg.storage.options
    # 1. listing and key
    # images=False: a manifest's embedded images are hashed as read, not held (memex/ingest.py); WebDataset
    # shards' listings kept under the index root by each shard's version (a shard is read whole to list it)
    # a local root made absolute here, on the driver: Ray's workers (and a later audit) may run in another folder
    root = Store(cfg.index.root or cfg.storage.root.rstrip("/") + "/_index", opts).uri
    listing = list_training_set(cfg.trainset.path, opts, cfg.trainset.caption_column, images=False,
                                shard_cache=Store(posixpath.join(root.rstrip("/"), SHARD_LISTINGS), opts))
    check_spec(cfg, listing.num_rows)
    key = index_key(listing, cfg, luma, aspect)
    layout = IndexLayout(root, key, opts)
    keys = "index.root / storage.root and storage.options (endpoint_url, credentials)"
    layout.store.check_reachable("index folder", keys)  # the audit's first request to its storage
    if (earlier := earlier_key(listing, cfg, luma, aspect, layout, root)) is not None:
        log.info("index %s: begun under the key that held index.root (memex before 2026-12-07): using it", earlier)
        key, layout = earlier, IndexLayout(root, earlier, opts)
    ivfpq = cfg.index.kind == IndexKind.ivfpq
    from memex.embed import weights_stamp

    done = layout.store.read_json(layout.success_path)
    stamp = weights_stamp(cfg.embedder, opts)
    if done is not None:
        check_embedder(done, stamp, cfg, layout)
    if done is not None and not (lost := missing_units(layout, len(done["shards"]), ivfpq)):
        log.info("index %s is complete: reusing it", layout.uri)
        # where it was found: the folder is named by its content, and the root it was built under may have
        # been relative to another working folder, or a bucket it was copied from
        return replace(IndexInfo.from_json(done, layout.store.uri_of(layout.success_path)), root=root)
    if done is not None:
        log.warning("index %s is marked complete but parts of it are gone (a partial copy, removed by hand): %s; "
                    "rebuilding only those", layout.uri, ", ".join(lost))
    layout.store.check_writable("index folder", keys)
    # one build at a time (<index>/_lease.json): another audit of the same data waits for it, then reuses it
    with hold(layout.store, cfg.storage, f"index {layout.uri}", wait_s=None):
        done = layout.store.read_json(layout.success_path)
        if done is not None and not missing_units(layout, len(done["shards"]), ivfpq):
            check_embedder(done, stamp, cfg, layout)
            log.info("index %s was completed by another audit: reusing it", layout.uri)
            return replace(IndexInfo.from_json(done, layout.store.uri_of(layout.success_path)), root=root)
        return build(cfg, listing, key, root, layout, luma, aspect, stamp)


def earlier_key(listing: pa.Table, cfg: AuditConfig, luma: bool, aspect: tuple[int, int] | None, layout: IndexLayout,
                root: str) -> str | None:
    """The key an index of this set was built under when the key held index.root (as given), where nothing is
    begun under today's key and that index is: its run folders' matches/ name that key, so they resume
    against it. None otherwise (index.root unset: the two keys are one)."""
    if cfg.index.root is None or any(layout.store.exists(p) for p in (layout.success_path, layout.info_json)):
        return None
    key = index_key(listing, cfg, luma, aspect, root_in_key=True)
    old = IndexLayout(root, key, layout.store.options)
    return key if any(old.store.exists(p) for p in (old.success_path, old.info_json)) else None


def check_embedder(done: dict, stamp: str | None, cfg: AuditConfig, layout: IndexLayout, begun: bool = False) -> None:
    """The embedder's weights as the index was built with them, or refuse: the key holds embedder.path, not
    its weights, so a fine-tuned CLIP saved over the old folder (an SSCD file replaced) reused the index
    and searched its old-space vectors with new-space queries, silently. (An index built before the stamp
    was recorded, or a hub id not cached here, cannot be checked.) `begun`: `done` is the _info.json of a
    build not finished (its finished shards, and IVF-PQ quantizer, hold vectors of the old weights, and the
    rest would be embedded with the new ones: one index of two spaces)."""
    was = done.get("embedder_stamp")
    if was is not None and stamp is not None and was != stamp:
        holds, fix = (("its finished shards hold",
                       "build it with the new weights, or restore the old ones to finish it") if begun else
                      ("the index holds", "rebuild it with the new weights, or restore the old ones"))
        raise StorageError(f"embedder.path={cfg.embedder.path} changed since index {layout.uri} was "
                           f"{'begun' if begun else 'built'} with it (was: {was}; now: {stamp}): {holds} vectors of "
                           f"the old weights. Delete {layout.uri} to {fix}.")


def check_gid_order(done: dict, listing: pa.Table, lost: list[str], layout: IndexLayout) -> str | None:
    """The sha256 of the training ids in gid order (the listing's), recorded in _info.json when the rows are
    copied; returns what to record. The key hashes the rows in id order, so a streamed manifest written again
    in another row order has the same key, and its gids (row numbers) are other rows: harmless while
    train_rows.parquet holds the gids the shards were built with, but a lost copy rewritten from the new
    order would pair every vector in shards/ and dups/ with another row's image and caption, silently."""
    order = hashlib.sha256(json.dumps(listing["id"].to_pylist()).encode()).hexdigest()
    was = done.get("gid_order")
    if not lost:  # the copy in place decides the gids: what was recorded stays (None: an index of before)
        return was
    if was is not None and was != order and (layout.shards.complete() or layout.dups.complete()):
        raise StorageError(f"index {layout.uri} lost {' and '.join(lost)}, and trainset.path lists its rows in "
                           "another order than when the index was built (a manifest written again in another "
                           "row order): copied again in this order, its rows would not be the ones its built "
                           f"shards' vectors hold. Delete {layout.uri} to rebuild it, or restore the lost file. "
                           "Nothing was changed.")
    return order


def check_spec(cfg: AuditConfig, n_rows: int) -> None:
    """The index settings against the data, before anything is written: an IVF-PQ with more lists
    than training vectors, or (pixels, whose dimension the config gives) a pq_m that does not divide
    it, failed in the quantizer task, after train.pack (a copy of a manifest's image bytes) was
    in a new index folder. sscd/clip dimensions are known once the model loads: checked there."""
    from memex.embed import PixelEmbedder
    from memex.index import EMBEDDER_METRIC, IndexSpec

    kind = getattr(cfg.embedder.kind, "value", cfg.embedder.kind)
    spec = IndexSpec.from_config(cfg.index, EMBEDDER_METRIC[kind])
    dim = PixelEmbedder(cfg.embedder.size).dim if kind == "pixels" else None
    spec.validate(dim=dim, n_train=min(n_rows, spec.train_size))


def missing_units(layout: IndexLayout, n_shards: int, ivfpq: bool) -> list[str]:
    """Parts of an index marked complete that are gone: unmarked units, a missing train_rows.parquet or train.pack.
    Reusing such an index would silently leave their training images out of every audit (one
    glob per folder, so a few requests on S3). A unit whose file alone is gone fails where it is
    read, naming the file."""
    out = train_rows.missing(layout) + (["pictures.parquet"] if not layout.store.exists(layout.pictures_path) else [])
    for folder, n in ((layout.quantizer, int(ivfpq)), (layout.shards, n_shards), (layout.dups, n_shards)):
        have = set(folder.complete()) if n else set()
        out += [f"{folder.name}/{unit_name(i, folder.prefix)}" for i in range(n) if i not in have]
    return out


def build(cfg: AuditConfig, listing: pa.Table, key: str, root: str, layout: IndexLayout,
          luma: bool = False, aspect: tuple[int, int] | None = None, stamp: str | None = None) -> IndexInfo:
    """Steps 2-5 of `run`, under the index folder's lease."""
    from memex.ingest import IMAGE_SHA256, iter_train_rows

    r = cfg.resources
    # the temp files of a killed build's writes in the index folder, never reused: its copy of the training set
    # (`_tmp-<uuid>-train.pack`, its full size, and its table), a pictures.parquet (a row per duplicated image: tens
    # of MB at LAION scale), an index.json or _SUCCESS.json. Swept only with a lost pack, the others stayed for
    # good (a finished index never comes back here). Not another audit's write-probe (made outside the lease),
    # nor a lease's temp file: Store.sweep_temp spares both
    layout.store.sweep_temp("")

    # 2. the training table with global ids (written once; a rerun finds it in place)
    plans = plan_index_shards(listing.num_rows, cfg.index.shards)
    # a build resumed after the embedder's weights changed at the same path (the key holds the path)
    done = layout.store.read_json(layout.info_json) or {}
    check_embedder(done, stamp, cfg, layout, begun=True)
    lost = train_rows.missing(layout)
    order = check_gid_order(done, listing, lost, layout)
    # what the folder holds, for people (and the weights' stamp, read above): written by every build, so a kill
    # during the copy below does not leave a folder without it
    layout.store.write_json(layout.info_json, redact({  # no credential in any output: memex/redact.py
        "trainset": cfg.trainset.path, "embedder": plain(cfg.embedder), "index": plain(cfg.index), "luma": luma,
        "aspect": aspect, "shards": plans, "n_train": listing.num_rows, "gid_order": order,
        **({"embedder_stamp": stamp} if stamp is not None else {})}))
    if lost:  # (train.pack gone: both written again, the same rows in the same order: check_gid_order)
        # a lost pack: its table goes first. The table is moved into place after the pack, so a kill between
        # the two moves left the old table, the new pack and the new table's temp file, a whole index that
        # never came back here to sweep it. Now such a kill leaves no table: the next run sweeps and copies.
        if layout.store.exists(layout.rows_path):
            layout.store.fs.rm_file(layout.rows_path)
        group = max(64, cfg.index.decode_batch)
        if IMAGE_SHA256 in listing.column_names:  # a streamed manifest: its images read again, a batch at a
            # time, in its own row order (the listing's: gid = row number, as for every listing)
            rows = iter_train_rows(cfg.trainset.path, cfg.storage.options, listing, batch_rows=4 * group)
        else:
            rows = pa.table({"gid": pa.array(np.arange(listing.num_rows), pa.int64()), "id": listing["id"],
                             "image": listing["image"], "uri": listing["uri"], "caption": listing["caption"]},
                            schema=TRAIN_SCHEMA).to_batches(max_chunksize=4 * group)
            rows = (pa.Table.from_batches([b]) for b in rows)
        train_rows.write(layout.store, layout, rows, row_group_size=group)

    # 3. one shared quantizer (IVF-PQ), 4. the shards, 5. near-duplicate counts, 6. pictures
    t0 = time.perf_counter()
    common = {"layout": layout, "emb": cfg.embedder, "idx": cfg.index, "device": r.device,
              "preprocess": cfg.trainset.preprocess.value, "luma": luma, "aspect": aspect, "alpha": alpha_of(cfg)}
    if cfg.index.kind == IndexKind.ivfpq:
        runner.run_tasks(layout.quantizer, {0: {"n_train": listing.num_rows}}, train_quantizer, r, **common)
    for folder in (layout.quarantine, layout.links):  # written by the shard and dups units: the runner sweeps
        folder.sweep_temp()                          # only the folders it dispatches
    runner.run_tasks(layout.shards, {s: {"start": a, "stop": b} for s, (a, b) in enumerate(plans)}, build_shard, r,
                     **common)
    metas = [layout.shards.read_marker(s) for s in range(len(plans))]
    metric = metas[0]["metric"]
    log.info("index %s: %d shards built in %.1fs", layout.uri, len(plans), time.perf_counter() - t0)
    runner.run_tasks(layout.dups, {s: {} for s in range(len(plans))}, count_duplicates, r, gpu=False,
                     layout=layout, n_shards=len(plans), idx=cfg.index, metric=metric)
    # 6. pictures: the units' links joined (always redone here: cheap, and a rebuilt unit changes them)
    in_groups = write_pictures(layout, len(plans))
    log.info("index %s: %d rows are near-duplicates of another row", layout.uri, in_groups)

    info = IndexInfo(root=root, key=key, shards=plans, metric=metric, dim=metas[0]["dim"], n_train=listing.num_rows,
                     n_indexed=sum(m["indexed"] for m in metas), n_quarantined=sum(m["quarantined"] for m in metas),
                     luma=luma, aspect=None if aspect is None else list(aspect), embedder_stamp=stamp,
                     alpha=None if alpha_of(cfg) == "white" else alpha_of(cfg))
    if info.n_indexed == 0:
        raise StorageError(f"no training image of {cfg.trainset.path} could be read ({info.n_quarantined} quarantined, "
                           f"reasons in {layout.uri}/quarantine/)")
    layout.store.write_json(layout.success_path, info.to_json())
    return info
