"""Match stage: join candidates with the training images they copy, and verify on pixels.

    run(cfg, run_name) -> summary   matches/ of a filtered run, against the index in <run>/index.json

One unit (matches/shard-000000, done in the driver through memex/runner.py `do_unit`), in steps:
  1. `select_candidates`: the samples of each flagged prompt's clique (match.candidates=cliques),
     or every sample (=all, the paper's unconditional setting);
  2. `nearest_training_images`: embed them in one Ray task (the embedder is the only model here;
     GPU when resources ask), search every index shard in one Ray task each and merge the top k
     (memex/index.py merge_topk: the same ids and order as one flat index over all vectors);
  3. `fetch_training_images`: the pixels of every training image in some top k (train.parquet);
  4. `verify`: each candidate against its k nearest training images with match.distance: tiled l2
     <= 0.15 (Stable Diffusion style), or relative l2 <= 1 (alpha = 0.5, n = 50; small
     unconditional models); the best (smallest) distance is the candidate's match;
  5. `keep_for_report`: the matched training images copied into matches/train_images.parquet;
then the summary (`summarize`) is written to matches/summary.json and the stage marked complete.
A candidate set is small (the paper: ~1,000s of clique members out of 175M generations), so
verification runs in the driver; the expensive parts (embedding, search) are Ray tasks.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memex import runner
from memex.config import AuditConfig, CandidateSource, DistanceKind, MatchConfig, plain
from memex.images import decode, encode_png, resize
from memex.layout import MATCHED_TRAIN_SCHEMA, MATCHES_SCHEMA, RunLayout, StorageError
from memex.membership import IndexInfo, fetch_train_rows, load_shards, read_info
from memex.models import resolve_device

log = logging.getLogger("memex.match")
REPORT_NEAR_MISSES = 200  # closest non-copies whose training images are kept for the report


# 1. candidates ---------------------------------------------------------------------------------
def select_candidates(layout: RunLayout, m: MatchConfig) -> pa.Table:
    """sample_id, prompt_id, prompt, image of the samples to verify, by sample id."""
    samples = layout.samples.read(columns=["sample_id", "prompt_id", "prompt", "image"])
    if m.candidates == CandidateSource.cliques:
        flagged = layout.candidates.read(columns=["flagged", "sample_ids"])
        flagged = flagged.filter(flagged["flagged"])
        wanted = [s for ids in flagged["sample_ids"].to_pylist() for s in ids]
        samples = samples.filter(pc.is_in(samples["sample_id"], pa.array(wanted, pa.string())))
    return samples.sort_by("sample_id")


# 2. nearest training images by embedding (Ray tasks) -------------------------------------------
def embed_task(images: list[bytes], emb, device: str) -> np.ndarray:
    from memex.embed import make_embedder

    embedder = make_embedder(emb, resolve_device(device))
    return embedder(np.stack([resize(decode(b), emb.size) for b in images]))


def search_task(info: IndexInfo, storage_options: dict, shard: int, queries: np.ndarray, k: int, idx) -> tuple:
    from memex.index import search_shard

    (index,) = load_shards(info.layout(storage_options), [shard])
    return search_shard(index, queries, k, info.spec(idx))


def nearest_training_images(cfg: AuditConfig, info: IndexInfo, images: list[bytes], k: int) -> tuple:
    """(D, I): each image's k nearest indexed training images, (n, k) distances and global ids."""
    from memex.index import merge_topk

    r = cfg.resources
    (q,) = runner.call_all(embed_task, [{"images": images, "emb": cfg.embedder, "device": r.device}], r)
    parts = runner.call_all(search_task, [{"info": info, "storage_options": cfg.storage.options, "shard": s,
                                           "queries": q, "k": k, "idx": cfg.index} for s in range(len(info.shards))],
                            r, gpu=False)
    return merge_topk(parts, k, info.metric)


# 3. training pixels ---------------------------------------------------------------------------
def fetch_training_images(info: IndexInfo, gids: np.ndarray, storage_options: dict) -> tuple[dict, dict]:
    """({gid: (H, W, 3) uint8 training image}, {gid: (id, caption)}) for the ids >= 0 in `gids`."""
    from memex.ingest import decode_rows

    train = fetch_train_rows(info.layout(storage_options), [int(g) for g in np.unique(gids) if g >= 0])
    dec = decode_rows(train, None, storage_options)
    gid_of = dict(zip(train["id"].to_pylist(), train["gid"].to_pylist()))
    pixels = {gid_of[i]: img for i, img in zip(dec.ids, dec.images)}
    meta = {g: (i, c) for g, i, c in zip(*(train[c].to_pylist() for c in ("gid", "id", "caption")))}
    return pixels, meta


# 4. verification on pixels --------------------------------------------------------------------
def verify(gen: np.ndarray, neighbors: list[np.ndarray], kind: DistanceKind, alpha: float) -> np.ndarray:
    """Pixel distances of one generation (H, W, 3) uint8 to each of its neighbours -> (k,) float.

    tiled_l2: per neighbour, the paper's tiled l2 (each pair resized to their smaller common size).
    relative_l2: distances.relative_ratios of the plain l2 to each neighbour (the neighbours are
    the reference set S), so the minimum entry is the paper's d(x_hat, x). One pair at a time:
    training images keep their own sizes.
    """
    import torch

    from memex.distances import l2_pairwise, relative_ratios, tiled_l2, to_unit

    g = to_unit(torch.tensor(gen[None]))
    fn = tiled_l2 if kind == DistanceKind.tiled_l2 else (lambda a, b: l2_pairwise(a, b)[:, 0])
    d = torch.tensor([float(fn(g, to_unit(torch.tensor(n[None])))[0]) for n in neighbors],  # tensor(): copies
                     dtype=torch.float64)
    if kind == DistanceKind.relative_l2:
        d = relative_ratios(d[None], alpha)[0]
    return d.numpy()


def verify_all(samples: pa.Table, D: np.ndarray, I: np.ndarray, pixels: dict, meta: dict, m: MatchConfig,
               metric: str) -> list[dict]:
    """One MATCHES_SCHEMA row per candidate that has a readable neighbour: its best match."""
    rows = []
    for j, (sid, pid, text, png) in enumerate(zip(*(samples[c].to_pylist()
                                                    for c in ("sample_id", "prompt_id", "prompt", "image")))):
        nb = [(rank, int(g)) for rank, g in enumerate(I[j]) if g >= 0 and int(g) in pixels]
        if not nb:
            continue
        d = verify(decode(png), [pixels[g] for _, g in nb], m.distance, m.alpha)
        # relative l2 normalises over all n neighbours, but only the first k are match candidates
        best = int(np.argmin(d[: m.k]))
        rank, g = nb[best]
        ed = float(D[j, rank])
        rows.append({"sample_id": sid, "prompt_id": pid, "prompt": text, "train_gid": g, "train_id": meta[g][0],
                     "train_caption": meta[g][1], "distance": float(d[best]),
                     "embed_distance": float(np.sqrt(max(ed, 0.0))) if metric == "l2" else ed,
                     "neighbor_rank": rank, "extracted": bool(d[best] <= m.threshold)})
    return rows


# 5. the training images the report shows ------------------------------------------------------
def keep_for_report(layout: RunLayout, rows: list[dict], pixels: dict) -> None:
    """Every extracted match's training image, and the closest others up to REPORT_NEAR_MISSES
    (candidates=all verifies every sample: 50k CIFAR-sized generations would otherwise copy 50k
    training images here), into matches/train_images.parquet."""
    by_distance = sorted(rows, key=lambda r: r["distance"])
    keep = ([r for r in by_distance if r["extracted"]]
            + [r for r in by_distance if not r["extracted"]][:REPORT_NEAR_MISSES])
    matched = sorted({r["train_gid"]: r["train_id"] for r in keep}.items())
    layout.store.write_table(layout.matched_train_path, pa.Table.from_pylist(
        [{"train_gid": g, "train_id": i, "image": encode_png(pixels[g])} for g, i in matched],
        schema=MATCHED_TRAIN_SCHEMA))


def match_candidates(unit: int, cfg: AuditConfig, layout: RunLayout, info: IndexInfo) -> pa.Table:
    """The stage's one unit: steps 1-5 -> the MATCHES_SCHEMA table (the runner writes it)."""
    m = cfg.match
    samples = select_candidates(layout, m)
    log.info("match: %d candidates against %d indexed training images", samples.num_rows, info.n_indexed)
    rows: list[dict] = []
    pixels: dict[int, np.ndarray] = {}
    if samples.num_rows:
        k = min(max(m.k, m.n_neighbors if m.distance == DistanceKind.relative_l2 else m.k), info.n_indexed)
        D, I = nearest_training_images(cfg, info, samples["image"].to_pylist(), k)
        pixels, meta = fetch_training_images(info, I, cfg.storage.options)
        rows = verify_all(samples, D, I, pixels, meta, m, info.metric)
    keep_for_report(layout, rows, pixels)  # first: the report shows them beside the generations
    return pa.Table.from_pylist(rows, schema=MATCHES_SCHEMA)


def run(cfg: AuditConfig, run_name: str) -> dict:
    """Match a filtered run; returns the summary written to matches/summary.json."""
    layout = RunLayout(cfg.storage.root, run_name, cfg.storage.options)
    info = read_info(layout)
    if layout.candidates.success() is None:
        raise StorageError(f"run {layout.uri} has no complete candidates/: run the filter (memex audit) first")
    layout.matches.claim({"match": plain(cfg.match), "index_key": info.key, "embedder": plain(cfg.embedder)},
                         f"run folder {layout.uri}")
    if layout.matches.success() is not None:
        return read_summary(layout)
    runner.do_unit(layout.matches, 0, match_candidates, {"cfg": cfg, "layout": layout, "info": info})
    summary = summarize(cfg, layout, info, layout.candidates.read(), layout.matches.read())
    layout.store.write_json(layout.summary_path, summary)
    layout.matches.mark_success({"summary": "summary.json", "extracted": summary["extracted_unique_train_images"]})
    return summary


def summarize(cfg: AuditConfig, layout: RunLayout, info: IndexInfo, candidates: pa.Table, matches: pa.Table) -> dict:
    ext = matches.filter(matches["extracted"]) if matches.num_rows else matches
    per_prompt = []
    by_prompt: dict[str, list[dict]] = {}
    for row in ext.to_pylist():
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    for c in candidates.to_pylist():
        hits = by_prompt.get(c["prompt_id"], [])
        per_prompt.append({"prompt_id": c["prompt_id"], "prompt": c["prompt"], "flagged": c["flagged"],
                           "clique_size": c["clique_size"], "extracted_samples": len(hits),
                           "train_ids": sorted({h["train_id"] for h in hits})})
    n_samples = layout.samples.success()["rows"]
    train_ids = sorted(set(ext["train_id"].to_pylist())) if ext.num_rows else []
    return {
        "run": layout.uri,
        "model": {"name": cfg.model.name, "path": cfg.model.path},
        "samples": n_samples,
        "prompts": candidates.num_rows,
        "prompts_flagged": int(sum(candidates["flagged"].to_pylist())),
        "candidates_verified": matches.num_rows,
        "extracted_generations": ext.num_rows,
        "extracted_unique_train_images": len(train_ids),
        "extracted_train_ids": train_ids,
        "thresholds": {"filter_edge_tiled_l2": cfg.filter.edge_threshold, "min_clique": cfg.filter.min_clique,
                       "match_distance": cfg.match.distance.value, "match_threshold": cfg.match.threshold,
                       "match_k": cfg.match.k},
        "index": {"uri": info.layout(cfg.storage.options).uri, "key": info.key, "shards": len(info.shards),
                  "train_images": info.n_train, "indexed": info.n_indexed, "quarantined": info.n_quarantined},
        "per_prompt": per_prompt,
        "config": plain(cfg),
    }


def read_summary(layout: RunLayout) -> dict:
    s = layout.store.read_json(layout.summary_path)
    if s is None:
        raise StorageError(f"run {layout.uri} has no matches/summary.json: run `memex audit` to finish it")
    return s
